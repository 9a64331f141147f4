"""Distillation teachers: a model folder or an alloy ensemble recipe, and a top-k target cache.

A teacher turns a collated batch into next-token scores at every position, (B, T, V). A model
folder gives its logits; an ensemble recipe gives its rule applied to its members' logits at each
position (`Ensemble.distribution`), so a student can learn from a mixture of experts, a
proxy-tuned pair or any other rule `alloy generate` decodes with (seed 002: ensemble -> student).

A teacher must share the student's tokenizer (the same token for every id); anything else is
refused before its weights are loaded.

`TopKCache` runs the teacher once over every row of the run and keeps, per position, the top-k
log-probabilities and their ids in two memory-mapped arrays, (N, T-1, k) each, under the alloy
cache folder; the key covers the teacher's weights, k and every token of every row, so a second
student, a resumed run or a second epoch reads the targets instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from alloy.errors import IncompatibleModelsError, Problem
from alloy.train.objectives.base import model_inputs


class Teacher(Protocol):
    name: str
    vocab: int

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) batch -> (B, T, V) fp32 logits or log-probabilities (no autograd graph)."""
        ...


class ModelTeacher:
    def __init__(self, model: Any, name: str, vocab: int) -> None:
        self.model, self.name, self.vocab = model, name, vocab

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            device = next(self.model.parameters()).device
            inputs = {
                k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()
            }
            return self.model(**inputs).logits[..., : self.vocab].float()


class EnsembleTeacher:
    def __init__(self, ensemble: Any, name: str) -> None:
        self.ensemble, self.name, self.vocab = ensemble, name, ensemble.vocab

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.ensemble.distribution(
            batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
        )
        return out.clone()  # a normal tensor: inference tensors cannot enter autograd


def teacher_tokenizer_folder(model: str) -> Path:
    """Where the teacher's tokenizer lives: the folder, or an ensemble's first member."""
    from alloy.ensemble.recipe import is_recipe_path, load_ensemble_recipe

    if is_recipe_path(model):
        return Path(load_ensemble_recipe(model).member_specs()[0].model)
    return Path(model)


def check_same_tokenizer(student: Any, teacher: Any, teacher_name: str) -> None:
    """Raise unless both tokenizers give every id the same token."""
    n, m = len(student), len(teacher)
    a = student.convert_ids_to_tokens(list(range(n)))
    b = teacher.convert_ids_to_tokens(list(range(m)))
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
    if differ or n != m:
        shown = ", ".join(f"id {i}: {a[i]!r} vs {b[i]!r}" for i in differ[:3])
        raise IncompatibleModelsError(
            "the teacher does not share the student's tokenizer",
            [
                Problem(
                    f"teacher {teacher_name}",
                    f"{n} vs {m} tokens" + (f"; {shown}" if shown else ""),
                    "distil from a model of the student's family (token-level distillation "
                    "compares distributions id by id)",
                )
            ],
        )


def load_teacher(model: str, *, device: torch.device, dtype: str, vocab: int) -> Teacher:
    from alloy.ensemble.recipe import is_recipe_path

    if is_recipe_path(model):
        from alloy.ensemble import Ensemble

        ensemble = Ensemble.from_recipe(model, device=str(device))
        return EnsembleTeacher(ensemble, model)
    from transformers import AutoModelForCausalLM

    from alloy.eval.scorer import load_pretrained

    loaded = load_pretrained(
        Path(model), AutoModelForCausalLM, f"teacher {model}", dtype=getattr(torch, dtype)
    )
    loaded.eval().to(device)
    for p in loaded.parameters():
        p.requires_grad_(False)
    return ModelTeacher(loaded, model, vocab)


def teacher_identity(model: str) -> str:
    """A digest of what the teacher computes: its weights (or the recipe and its members')."""
    from alloy.ensemble.recipe import is_recipe_path, load_ensemble_recipe
    from alloy.io.digest import files_sha256

    def folder_digest(folder: Path) -> list[str]:
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        config = (folder / "config.json").read_text() if (folder / "config.json").is_file() else ""
        return [hashlib.sha256(config.encode()).hexdigest(), *files_sha256(files)]

    if is_recipe_path(model):
        recipe = load_ensemble_recipe(model)
        parts: list[Any] = [recipe.model_dump(mode="json")]
        parts += [folder_digest(Path(s.model)) for s in recipe.member_specs()]
    else:
        parts = [folder_digest(Path(model))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class TopKCache:
    """Top-k teacher log-probabilities of every row of a run, memory-mapped from disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.values = np.load(folder / "values.npy", mmap_mode="r")  # (N, T-1, k) float32
        self.indices = np.load(folder / "indices.npy", mmap_mode="r")  # (N, T-1, k) int32
        self.meta = json.loads((folder / "meta.json").read_text())

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes)

    def lookup(self, index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices -> ((B, width, k) log-probs, (B, width, k) ids)."""
        rows = index.cpu().numpy()
        values = torch.from_numpy(np.ascontiguousarray(self.values[rows, :width]))
        ids = torch.from_numpy(np.ascontiguousarray(self.indices[rows, :width]).astype(np.int64))
        return values, ids

    @classmethod
    def build(
        cls,
        teacher: Teacher,
        rows: Any,
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        *,
        k: int,
        identity: str,
        root: Path,
        batch_size: int,
        width: int,
        say: Callable[[str], None] = print,
    ) -> TopKCache:
        """The cache for `rows` (a TrainRows), computed now unless an identical one exists."""
        digest = hashlib.sha256(f"{identity}\0{k}\0{width}".encode())
        for i in range(len(rows)):
            digest.update(rows[i]["input_ids"].numpy().tobytes())
            digest.update(b"\0")
        folder = root / "teacher-topk" / digest.hexdigest()[:32]
        if (folder / "meta.json").is_file():
            say(f"teacher top-{k} targets from the cache ({folder})")
            return cls(folder)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            shape = (len(rows), width, k)
            values = np.lib.format.open_memmap(tmp / "values.npy", "w+", np.float32, shape)
            indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", np.int32, shape)
            t = time.perf_counter()
            for first in range(0, len(rows), batch_size):
                items = [rows[i] for i in range(first, min(first + batch_size, len(rows)))]
                batch = collate(items)
                logprobs = torch.log_softmax(teacher.scores(batch)[:, :-1], dim=-1)  # (B, T-1, V)
                top = logprobs.topk(k, dim=-1)
                n = top.values.shape[1]
                values[first : first + len(items), :n] = top.values.cpu().numpy()
                indices[first : first + len(items), :n] = top.indices.cpu().numpy()
            values.flush()
            indices.flush()
            del values, indices
            seconds = time.perf_counter() - t
            meta = {
                "k": k,
                "rows": len(rows),
                "width": width,
                "teacher": teacher.name,
                "seconds": seconds,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"teacher top-{k} targets of {len(rows)} rows cached in {seconds:.0f}s ({folder})")
        return cls(folder)
