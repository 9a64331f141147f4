"""Build the lab's model family with transformers' Trainer: tokenizer, bases, experts, soups.

Everything lands under `<root>/family/<preset>/`:

    tokenizer/                         byte-level BPE trained on the corpus' train splits
    <size>/base/                        Llama base pre-trained on all domains (equal tokens each)
    <size>/experts/<domain>/            the base fine-tuned on one domain
    <size>/soup/<domain>-lr<m>-s<seed>/ more fine-tunes of one domain (soup ingredients)
    <size>/trajectories/<model>/checkpoint-<step>/   intermediate checkpoints (HF folders)
    family.json                         preset, every model's recipe, losses and timings

Every model is an `alloy train` run (causal_lm on lab corpus domains, `job_recipe` writes the
recipe), so the family is trained exactly as a user's recipe would be, on transformers' Trainer.
Every model folder is written atomically and skipped on the next run when its recipe (preset,
seed, parent, trainer version) is unchanged, so experiments reuse the family instead of
retraining it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alloy.errors import InputError, Problem
from alloy.io.atomic import AtomicFolder
from alloy.lab.corpus import build_corpus
from alloy.lab.presets import PRESETS, Preset, Size, Stage
from alloy.lab.tokens import EOT, iter_texts, train_tokenizer

log = logging.getLogger(__name__)
# Part of every model's cache key: a change of how the family is trained retrains it.
TRAINER = "alloy.train/1"


@dataclass(frozen=True)
class Job:
    """One model to train: where it goes, what it starts from, which data and schedule."""

    name: str  # e.g. "small/experts/drama"
    size: str
    parent: str | None  # name of the model it starts from; None: random init
    domains: tuple[str, ...]
    stage: Stage
    seed: int

    def key(self, preset: Preset, seed: int, parent_key: str | None = None) -> str:
        """What the model depends on: the job, the preset's shared settings and its size, the
        parent's own key, the family seed and the trainer. Another model's stage is not in it,
        so retuning the large base leaves the small models cached."""
        shared = {
            k: v
            for k, v in preset.describe().items()
            if k in ("vocab_size", "seq_len", "batch", "gpu_batch", "tokenizer_chars")
        }
        recipe = {
            "job": asdict(self),
            "preset": {**shared, "size": asdict(preset.sizes[self.size])},
            "parent": parent_key,
            "family_seed": seed,
            "trainer": TRAINER,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def plan_jobs(preset: Preset, seed: int) -> list[Job]:
    """Every model of the family, parents before children."""
    from alloy.lab.corpus import DOMAINS

    domains = tuple(DOMAINS)
    jobs: list[Job] = []
    for size in preset.sizes:
        jobs.append(Job(f"{size}/base", size, None, domains, preset.pretrain[size], seed))
    for size in preset.sizes:
        for i, domain in enumerate(domains):
            jobs.append(
                Job(
                    f"{size}/experts/{domain}",
                    size,
                    f"{size}/base",
                    (domain,),
                    preset.expert[size],
                    seed + 100 + i,
                )
            )
    stage = preset.soup_stage
    for multiplier, variant_seed in preset.soup_variants:
        variant = Stage(stage.steps, stage.lr * multiplier, stage.warmup, stage.save_every)
        jobs.append(
            Job(
                f"small/soup/{preset.soup_domain}-lr{multiplier:g}-s{variant_seed}",
                "small",
                "small/base",
                (preset.soup_domain,),
                variant,
                seed + 1000 + variant_seed,
            )
        )
    return jobs


def llama_config(size: Size, preset: Preset, tokenizer: Any) -> dict[str, Any]:
    """The Llama config of `size` as a mapping (a train recipe's `model.config`)."""
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": preset.seq_len,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }


def build_family(
    root: Path,
    preset: str | Preset = "demo",
    *,
    seed: int = 0,
    device: str | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the corpus and the `preset` family under `root`; return family.json."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InputError(
                f"unknown preset {preset!r}",
                [Problem("--preset", f"choose one of {', '.join(PRESETS)}")],
            )
        preset = PRESETS[preset]
    say = on_event or (lambda message: log.info(message))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(root)
    t0 = time.perf_counter()
    manifest = build_corpus(root, seed=seed)
    say(f"corpus ready in {time.perf_counter() - t0:.0f}s: {', '.join(manifest['domains'])}")
    home = root / "family" / preset.name
    home.mkdir(parents=True, exist_ok=True)
    record_path = home / "family.json"
    record: dict[str, Any] = (
        json.loads(record_path.read_text()) if record_path.is_file() else {"models": {}}
    )
    record.update({"preset": preset.describe(), "seed": seed, "root": str(root.absolute())})

    tokenizer = _tokenizer(root, home, preset, list(manifest["domains"]), say)
    keys: dict[str, str] = {}
    for job in plan_jobs(preset, seed):
        key = keys[job.name] = job.key(preset, seed, keys.get(job.parent or ""))
        out = home / job.name
        if record["models"].get(job.name, {}).get("key") == key and (out / "config.json").is_file():
            continue
        say(f"training {job.name} ({job.stage.steps} steps)")
        result = train_job(job, preset, root, tokenizer, device)
        record["models"][job.name] = {"key": key, **asdict(job), **result}
        _write_json(record_path, record)
        say(f"  {job.name}: loss {result['final_loss']:.3f} in {result['seconds']:.0f}s")
    record["models"] = {j.name: record["models"][j.name] for j in plan_jobs(preset, seed)}
    _write_json(record_path, record)
    return record


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _tokenizer(
    root: Path, home: Path, preset: Preset, domains: list[str], say: Callable[[str], None]
) -> Any:
    from transformers import AutoTokenizer

    folder = home / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        t = time.perf_counter()
        texts = (
            text
            for domain in domains
            for text in iter_texts(
                [root / "corpus" / domain / "train.jsonl"], max_chars=preset.tokenizer_chars
            )
        )
        tokenizer = train_tokenizer(texts, preset.vocab_size)
        with AtomicFolder(folder, force=True) as tmp:
            tokenizer.save_pretrained(tmp)
        say(f"tokenizer ({len(tokenizer)} tokens) trained in {time.perf_counter() - t:.0f}s")
    return AutoTokenizer.from_pretrained(folder)


def job_recipe(
    job: Job,
    preset: Preset,
    root: Path,
    tokenizer: Any,
    device: str,
    *,
    data: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `alloy train` recipe of one model of the family.

    Pre-training and fine-tuning share one recipe shape: causal LM on the job's corpus domains
    (equal weights, so equal tokens per domain), AdamW (weight decay 0.1, betas 0.9 / 0.95,
    clipping at 1), linear warm-up then cosine decay to 0. `data` replaces the domains (for
    experiments that fine-tune the family on other text).
    """
    home = root / "family" / preset.name
    stage = job.stage
    model: Any
    if job.parent is None:
        model = {
            "config": llama_config(preset.sizes[job.size], preset, tokenizer),
            "tokenizer": str(home / "tokenizer"),
        }
    else:
        model = str(home / job.parent)
    batch = preset.gpu_batch if device.startswith("cuda") else preset.batch
    return {
        "name": f"lab {preset.name} {job.name}",
        "objective": "causal_lm",
        "model": model,
        "data": data or [{"name": d, "corpus": d} for d in job.domains],
        "lab": str(root),
        "schedule": {"name": "cosine", "lr": stage.lr, "warmup": stage.warmup},
        "optimizer": {
            "name": "adamw",
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "max_grad_norm": 1.0,
        },
        "max_steps": stage.steps,
        "batch_size": batch,
        "sequence_length": preset.seq_len,
        "seed": job.seed,
        "device": device,
        "snapshots": {"every": stage.save_every},
        "log_every": max(1, stage.steps // 20),
    }


def train_job(
    job: Job,
    preset: Preset,
    root: Path,
    tokenizer: Any,
    device: str,
    *,
    data: list[dict[str, Any]] | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Train one model with `alloy train` into `out` (default: its place in the family); its
    snapshots, if any, become the model's trajectory."""
    from alloy.train import train

    home = root / "family" / preset.name
    out = out or home / job.name
    recipe = job_recipe(job, preset, root, tokenizer, device, data=data)
    t = time.perf_counter()
    result = train(recipe, out, force=True)
    trajectory = home / job.size / "trajectories" / job.name.split("/", 1)[1]
    if (out / "snapshots").is_dir():
        with AtomicFolder(trajectory, force=True) as tmp:
            for checkpoint in sorted((out / "snapshots").iterdir()):
                checkpoint.rename(tmp / checkpoint.name)
        shutil.rmtree(out / "snapshots")
    losses = [row["loss"] for row in result.metrics]
    every = max(1, job.stage.steps // 20)
    return {
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "losses": losses[every - 1 :: every],
        "seconds": time.perf_counter() - t,
        "tokens": result.tokens,
        "eos": EOT,
        "trajectory": str(trajectory.relative_to(home)) if job.stage.save_every else None,
    }
