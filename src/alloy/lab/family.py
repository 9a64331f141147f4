"""Build the lab's model family with transformers' Trainer: tokenizer, bases, experts, soups.

Everything lands under `<root>/family/<preset>/`:

    tokenizer/                         byte-level BPE trained on the corpus' train splits
    tokens/<domain>.npy                 the train split of each domain, tokenised once
    <size>/base/                        Llama base pre-trained on all domains (equal tokens each)
    <size>/experts/<domain>/            the base fine-tuned on one domain
    <size>/soup/<domain>-lr<m>-s<seed>/ more fine-tunes of one domain (soup ingredients)
    <size>/trajectories/<model>/checkpoint-<step>/   intermediate checkpoints (HF folders)
    family.json                         preset, every model's recipe, losses and timings

Training goes through `transformers.Trainer` so the same code runs under accelerate, DDP or FSDP.
Every model folder is written atomically and skipped on the next run when its recipe (preset,
seed, parent) is unchanged, so experiments reuse the family instead of retraining it.
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

import numpy as np
import torch

from alloy.errors import InputError, Problem
from alloy.io.atomic import AtomicFolder
from alloy.lab.corpus import build_corpus
from alloy.lab.presets import PRESETS, Preset, Size, Stage
from alloy.lab.tokens import EOT, PackedBlocks, encode_records, iter_texts, train_tokenizer

log = logging.getLogger(__name__)
# Trainer files that are pickles or optimizer state: not needed to use a checkpoint, and a
# checkpoint folder we hand to users must not invite unpickling.
_DROP = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


@dataclass(frozen=True)
class Job:
    """One model to train: where it goes, what it starts from, which data and schedule."""

    name: str  # e.g. "small/experts/drama"
    size: str
    parent: str | None  # name of the model it starts from; None: random init
    domains: tuple[str, ...]
    stage: Stage
    seed: int

    def key(self, preset: Preset, seed: int) -> str:
        recipe = {"job": asdict(self), "preset": preset.describe(), "family_seed": seed}
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


def llama_config(size: Size, preset: Preset, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=preset.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


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
    streams = _streams(root, home, tokenizer, list(manifest["domains"]), say)
    for job in plan_jobs(preset, seed):
        key = job.key(preset, seed)
        out = home / job.name
        if record["models"].get(job.name, {}).get("key") == key and (out / "config.json").is_file():
            continue
        say(f"training {job.name} ({job.stage.steps} steps)")
        result = _train(job, preset, home, tokenizer, streams, device)
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


def _streams(
    root: Path, home: Path, tokenizer: Any, domains: list[str], say: Callable[[str], None]
) -> dict[str, np.ndarray]:
    streams = {}
    for domain in domains:
        path = home / "tokens" / f"{domain}.npy"
        if not path.is_file():
            t = time.perf_counter()
            ids = encode_records(tokenizer, iter_texts([root / "corpus" / domain / "train.jsonl"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            tmp.replace(path)
            say(f"tokenised {domain}: {len(ids):,} tokens in {time.perf_counter() - t:.0f}s")
        streams[domain] = np.load(path, mmap_mode="r")
    return streams


def _train(
    job: Job,
    preset: Preset,
    home: Path,
    tokenizer: Any,
    streams: dict[str, np.ndarray],
    device: str,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    torch.manual_seed(job.seed)
    if job.parent is None:
        config = llama_config(preset.sizes[job.size], preset, tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(home / job.parent, dtype=torch.float32)
    batch = preset.gpu_batch if device.startswith("cuda") else preset.batch
    stage = job.stage
    data = PackedBlocks(
        [np.asarray(streams[d]) for d in job.domains], preset.seq_len, stage.steps * batch, job.seed
    )
    out = home / job.name
    trajectory = home / job.size / "trajectories" / job.name.split("/", 1)[1]
    t = time.perf_counter()
    with AtomicFolder(out, force=True) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "_trainer"),
            max_steps=stage.steps,
            per_device_train_batch_size=batch,
            learning_rate=stage.lr,
            lr_scheduler_type="cosine",
            warmup_steps=stage.warmup,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=max(1, stage.steps // 20),
            save_strategy="steps" if stage.save_every else "no",
            save_steps=stage.save_every or stage.steps,
            save_only_model=True,
            report_to=[],
            seed=job.seed,
            data_seed=job.seed,
            use_cpu=not device.startswith("cuda"),
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # losses go to family.json, not stdout
        trainer.train()
        trainer.save_model(str(tmp))
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        _keep_trajectory(tmp / "_trainer", trajectory)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        for name in _DROP:
            for path in tmp.glob(f"{name}*"):
                path.unlink()
    return {
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "losses": losses,
        "seconds": time.perf_counter() - t,
        "tokens": stage.steps * batch * preset.seq_len,
        "eos": EOT,
        "trajectory": str(trajectory.relative_to(home)) if stage.save_every else None,
    }


def _keep_trajectory(trainer_dir: Path, trajectory: Path) -> None:
    """Move Trainer's checkpoint-N folders to `trajectory`, without pickles or optimizer state."""
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        return
    with AtomicFolder(trajectory, force=True) as tmp:
        for checkpoint in checkpoints:
            for name in _DROP:
                for path in checkpoint.glob(f"{name}*"):
                    path.unlink()
            checkpoint.rename(tmp / checkpoint.name)
