"""`dpo`: direct preference optimisation (and IPO) on prompt / chosen / rejected pairs.

The policy scores both answers of every pair of a micro batch in one (2B, T) forward pass
(packing.Collator.pairs), their sequence log-probabilities (summed, or averaged over answer
tokens) are compared with the reference's, and losses.preference_loss turns the difference into
the DPO loss -log σ(β h) (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), its
conservative form with label smoothing, or IPO's (h - 1/(2β))² (https://arxiv.org/abs/2310.12036).

The reference (preference.py says which it is) is read one of three ways: a frozen model in
memory; the policy itself with its adapter switched off (PEFT's `disable_adapter()`); or, with
`precompute_reference`, from a table of every row's reference log-probabilities computed once
before training and kept in the run folder under a key of the reference's weights and every
token of every row, so a resumed run reads it back and changed data computes it again. The
reference runs in eval mode (no dropout), so the three agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloy.train.losses import preference_loss, reward_metrics, sequence_logprobs
from alloy.train.objectives.base import (
    LossParts,
    Objective,
    ObjectiveContext,
    model_inputs,
    objective,
    shifted_labels,
)

CACHE_FOLDER = "reference-logprobs"


def pair_logprobs(model: Any, batch: dict[str, torch.Tensor], *, average: bool) -> torch.Tensor:
    """(2B,) sequence log-probabilities of a pair batch's answers under `model`."""
    logits = model(**model_inputs(batch)).logits  # (2B, T, V)
    return sequence_logprobs(logits, shifted_labels(batch), average=average)


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """`model` in eval mode (no dropout) and without autograd, restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class ReferenceCache:
    """(N, 2) reference log-probabilities of the chosen and rejected answer of each row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values = np.load(path)  # (N, 2) float32

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) row indices -> (2B,): the B chosen values, then the B rejected."""
        rows = torch.from_numpy(self.values[index.cpu().numpy()])  # (B, 2)
        return torch.cat([rows[:, 0], rows[:, 1]])

    @classmethod
    def build(
        cls,
        load: Callable[[], Any],
        rows: Any,
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        *,
        identity: str,
        average: bool,
        folder: Path,
        batch_size: int,
        device: torch.device,
        prune: bool = True,
        say: Callable[[str], None] = print,
    ) -> ReferenceCache:
        """The table for `rows` (a TrainRows), computed now with the model `load()` returns
        unless a table with the same key is already in `folder`; with `prune` (a run's own
        folder), the other tables there are removed when a new one is written."""
        digest = hashlib.sha256(f"{identity}\0{average}".encode())
        for i in range(len(rows)):
            item = rows[i]
            for key in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
                digest.update(item[key].numpy().tobytes())
                digest.update(b"\0")
        path = folder / f"{digest.hexdigest()[:32]}.npy"
        if path.is_file():
            say(f"reference log-probabilities from {path}")
            return cls(path)
        model = load()
        values = np.zeros((len(rows), 2), dtype=np.float32)
        with _evaluating(model):
            for first in range(0, len(rows), batch_size):
                items = [rows[i] for i in range(first, min(first + batch_size, len(rows)))]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                logprobs = pair_logprobs(model, batch, average=average).cpu().numpy()
                values[first : first + len(items)] = logprobs.reshape(2, -1).T
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.npy") if prune else ():  # an earlier data set's table
            old.unlink()
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, values)
        tmp.rename(path)
        say(f"reference log-probabilities of {len(rows)} pairs computed ({path})")
        return cls(path)


class DPO:
    def __init__(self, settings: Any, reference: Any, cache: ReferenceCache | None) -> None:
        from alloy.train.preference import averages_logprobs

        self.settings = settings  # the recipe's PreferenceEntry
        self.reference = reference  # a frozen model; None: the cache or the adapter-less policy
        self.cache = cache
        self.average = averages_logprobs(settings)

    def reference_logprobs(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) the reference's sequence log-probabilities of the batch's answers."""
        if self.cache is not None:
            return self.cache.lookup(batch["index"])
        if self.reference is not None:
            with _evaluating(self.reference):
                return pair_logprobs(self.reference, batch, average=self.average)
        policy = getattr(model, "module", model)  # DDP's wrapper has no disable_adapter
        with _evaluating(policy), policy.disable_adapter():
            return pair_logprobs(policy, batch, average=self.average)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        s = self.settings
        reference = self.reference_logprobs(model, batch).detach()
        policy = pair_logprobs(model, batch, average=self.average)  # (2B,)
        reference = reference.to(policy.device)
        pairs = policy.shape[0] // 2
        losses, chosen, rejected = preference_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            beta=float(s.beta),
            loss=s.loss,
            label_smoothing=float(s.label_smoothing),
        )
        return LossParts(losses.sum(), batch["pairs"].sum(), reward_metrics(chosen, rejected))


def load_reference(folder: Path, device: torch.device) -> Any:
    """A frozen float32 copy of the model in `folder`, on `device`."""
    from transformers import AutoModelForCausalLM

    from alloy.eval.scorer import load_pretrained

    model = load_pretrained(
        folder, AutoModelForCausalLM, f"reference {folder}", dtype=torch.float32
    )
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@objective(
    "dpo",
    summary="direct preference optimisation (sigmoid, conservative, IPO) on chosen/rejected pairs",
    reference="https://arxiv.org/abs/2305.18290",
    rows="pairs",
)
def build_dpo(context: ObjectiveContext) -> Objective:
    from alloy.train.data import cache_root
    from alloy.train.packing import Collator
    from alloy.train.plan import split_batch, world_size
    from alloy.train.preference import averages_logprobs, reference_folder, settings
    from alloy.train.teacher import teacher_identity

    spec = context.recipe.spec
    entry = settings(spec)
    folder = reference_folder(spec)
    if not entry.precompute_reference:
        reference = load_reference(folder, context.device) if folder is not None else None
        return DPO(entry, reference, None)
    assert folder is not None  # a precomputed reference is always read from a folder
    pad = context.tokenizer.pad_token_id
    root = context.run_dir if context.run_dir is not None else cache_root()
    cache = ReferenceCache.build(
        lambda: load_reference(folder, context.device),
        context.rows,
        Collator(0 if pad is None else int(pad)),
        identity=teacher_identity(str(folder)),
        average=averages_logprobs(entry),
        folder=root / CACHE_FOLDER,
        batch_size=split_batch(spec, world_size())[0],
        device=context.device,
        prune=context.run_dir is not None,  # the shared cache folder holds other runs' tables
        say=context.say,
    )
    return DPO(entry, None, cache)
