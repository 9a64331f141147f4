"""`alloy train` against a bare transformers Trainer, and distillation against its floor.

    python benchmarks/train/bench.py                  # writes docs/benchmarks.md's section
    python benchmarks/train/bench.py --no-write --runs 1 --steps 10

Models are the lab's `experiment` shapes, randomly initialised from their configs (speed does not
depend on the weights): the student is the small Llama (d=192, 4 layers, 8,192-token vocabulary),
the teacher the large one (d=320, 6 layers). Data: the lab corpus (`alloy lab corpora`), rows of
256 tokens, batch 8, fp32, on this machine's cores.

- **causal LM**: tokens/s of `alloy train` (causal_lm on the four domains) against a bare
  `Trainer` on the same model, the same rows in the same order and the same optimizer and
  schedule, with transformers' own loss. Timed from the end of step `warmup` to the end of the
  last step, so start-up is not counted.
- **distillation**: seconds per step of `alloy train` (distill, forward KL, full distribution)
  against the floor: the teacher's forward pass plus the student's forward, backward and
  optimizer step, timed alone on the same batch. And the same run with the teacher's top-64
  targets read from the cache (the one-off cost of building the cache reported beside it).
- **data loading**: the time to build each batch (dataset rows and collation) as a share of
  the causal-LM step time.

Each number is the median of `--runs` runs, the contenders interleaved run by run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

from common import machine, quiet, replace_section  # noqa: E402

DOMAINS = ["drama", "scripture", "fiction", "technical"]


def recipe(args: argparse.Namespace, model: Path, **changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "objective": "causal_lm",
        "model": str(model),
        "data": [{"name": d, "corpus": d} for d in DOMAINS],
        "lab": str(args.root),
        "schedule": {"name": "cosine", "lr": 1e-3, "warmup": 2},
        "optimizer": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "max_steps": args.steps,
        "batch_size": 8,
        "sequence_length": 256,
        "device": "cpu",
        "log_every": 1000,
    }
    out.update(changes)
    return out


def save_model(size: str, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from alloy.lab.family import _tokenizer, llama_config
    from alloy.lab.presets import PRESETS

    preset = PRESETS["experiment"]
    home = ROOT / "runs" / "lab" / "family" / "experiment"
    home.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(ROOT / "runs" / "lab", home, preset, DOMAINS, lambda m: None)
    settings = llama_config(preset.sizes[size], preset, tokenizer)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def steady_rate(rows: list[dict[str, Any]], warmup: int) -> tuple[float, float]:
    """(tokens/s, seconds/step) from alloy's metrics rows, from step `warmup` on."""
    a, b = rows[warmup - 1], rows[-1]
    seconds = b["seconds"] - a["seconds"]
    return (b["tokens_total"] - a["tokens_total"]) / seconds, seconds / (len(rows) - warmup)


def alloy_run(args: argparse.Namespace, spec: dict[str, Any], out: Path) -> tuple[float, float]:
    from alloy.train import train

    result = train(spec, out, force=True, say=lambda m: None)
    return steady_rate(result.metrics, args.warmup)


def bare_trainer(args: argparse.Namespace, model_dir: Path, work: Path) -> float:
    """tokens/s of a plain Trainer on the same rows (alloy's plan), its own loss and sampler
    turned sequential so the rows match."""
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        get_cosine_schedule_with_warmup,
    )

    from alloy.train import load_train_recipe
    from alloy.train.plan import plan_training

    plan = plan_training(load_train_recipe(recipe(args, model_dir)))

    class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return len(plan.rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            item = plan.rows[i]
            return {"input_ids": item["input_ids"], "labels": item["labels"]}

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=str(work),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        logging_steps=1000,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[Clock()])
    trainer.create_optimizer()
    trainer.lr_scheduler = get_cosine_schedule_with_warmup(trainer.optimizer, 2, args.steps)
    trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return (len(stamps) - args.warmup) * 8 * 256 / seconds


def distill_floor(args: argparse.Namespace, student_dir: Path, teacher_dir: Path) -> float:
    """Seconds per step of: teacher forward (no grad) + student forward/backward/step, alone."""
    from transformers import AutoModelForCausalLM

    from alloy.train import load_train_recipe
    from alloy.train.packing import Collator
    from alloy.train.plan import plan_training

    plan = plan_training(load_train_recipe(recipe(args, student_dir)))
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95)
    )
    collate = Collator(0)
    times = []
    for step in range(args.steps):
        batch = collate([plan.rows[step * 8 + i] for i in range(8)])
        t = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], use_cache=False).logits
        logits = student(input_ids=batch["input_ids"], use_cache=False).logits
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(logits[:, :-1].float(), -1),
            torch.log_softmax(teacher_logits[:, :-1].float(), -1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[args.warmup :])


def data_share(args: argparse.Namespace, model_dir: Path, step_seconds: float) -> float:
    from alloy.train import load_train_recipe
    from alloy.train.packing import Collator
    from alloy.train.plan import plan_training

    plan = plan_training(load_train_recipe(recipe(args, model_dir)))
    collate = Collator(0)
    t = time.perf_counter()
    for step in range(args.steps):
        collate([plan.rows[step * 8 + i] for i in range(8)])
    per_batch = (time.perf_counter() - t) / args.steps
    return per_batch / step_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(torch.get_num_threads())
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    results: dict[str, list[float]] = {
        "alloy_tokens_per_s": [],
        "trainer_tokens_per_s": [],
        "distill_s": [],
        "distill_cached_s": [],
        "floor_s": [],
        "causal_step_s": [],
        "cache_build_s": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student = save_model("small", work / "student")
        teacher = save_model("large", work / "teacher")
        no_clip = {
            "name": "adamw",
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "max_grad_norm": None,
        }
        distill = {
            "objective": "distill",
            "teacher": {"model": str(teacher), "alpha": 1.0},
            "optimizer": no_clip,
        }
        cached = {
            "objective": "distill",
            "optimizer": no_clip,
            "teacher": {
                "model": str(teacher),
                "alpha": 1.0,
                "top_k": 64,
                "cache": str(work / "cache"),
            },
        }
        walls: list[float] = []
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}")
            rate, step = alloy_run(args, recipe(args, student), work / "alloy")
            results["alloy_tokens_per_s"].append(rate)
            results["causal_step_s"].append(step)
            results["trainer_tokens_per_s"].append(bare_trainer(args, student, work / "bare"))
            results["distill_s"].append(
                alloy_run(args, recipe(args, student, **distill), work / "distill")[1]
            )
            results["floor_s"].append(distill_floor(args, student, teacher))
            t = time.perf_counter()
            results["distill_cached_s"].append(
                alloy_run(args, recipe(args, student, **cached), work / "cached")[1]
            )
            walls.append(time.perf_counter() - t)
        # The first cached run built the cache before training; the others read it.
        results["cache_build_s"].append(walls[0] - statistics.median(walls[1:] or walls))
        share = data_share(args, student, statistics.median(results["causal_step_s"]))
    medians = {k: statistics.median(v) for k, v in results.items() if v}
    payload = {
        "machine": machine(),
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "results": results,
        "median": medians,
        "data_share": share,
    }
    out = ROOT / "benchmarks" / "train" / "results.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(medians, indent=2), f"data share {share:.2%}")
    if not args.no_write:
        replace_section(ROOT / "docs" / "benchmarks.md", "train", section(payload))
    return 0


def section(payload: dict[str, Any]) -> str:
    m = payload["median"]
    ratio = m["alloy_tokens_per_s"] / m["trainer_tokens_per_s"]
    over_floor = m["distill_s"] / m["floor_s"]
    command = "python benchmarks/train/bench.py"
    return "\n".join(
        [
            "## Train: alloy train vs a bare Trainer, distillation vs its floor",
            "",
            re.sub(r"\s+", " ", __doc__.split("\n\n")[2]).strip(),
            "",
            f"{payload['machine']}. Median of {payload['runs']} runs of {payload['steps']} steps "
            f"(timed after step {payload['warmup']}). Regenerate with `{command}`.",
            "",
            "| measurement | alloy | reference | ratio |",
            "|---|---|---|---|",
            f"| causal LM tokens/s (vs bare Trainer) | {m['alloy_tokens_per_s']:,.0f} | "
            f"{m['trainer_tokens_per_s']:,.0f} | {ratio:.3f} |",
            "| distillation s/step (vs teacher fwd + student fwd/bwd alone) | "
            f"{m['distill_s']:.3f} | {m['floor_s']:.3f} | {over_floor:.3f} |",
            "| distillation s/step with the top-64 cache (vs uncached) | "
            f"{m['distill_cached_s']:.3f} | {m['distill_s']:.3f} | "
            f"{m['distill_cached_s'] / m['distill_s']:.3f} |",
            f"| data loading s/batch as a share of a causal LM step | | | "
            f"{payload['data_share']:.2%} |",
            "",
            f"Targets: tokens/s within 5% of the bare Trainer (ratio >= 0.95): "
            f"{'met' if ratio >= 0.95 else 'not met'}; distillation within 10% of its floor "
            f"(ratio <= 1.10): {'met' if over_floor <= 1.10 else 'not met'}. Building the top-64 "
            f"cache for the run took {m['cache_build_s']:.1f} s once (a teacher forward over every "
            "row); every later run on the same rows reads it back.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
