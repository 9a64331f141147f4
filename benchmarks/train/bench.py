"""`alloy train` against a bare transformers Trainer; distillation and DPO against their floors.

    python benchmarks/train/bench.py                  # writes docs/benchmarks.md's section
    python benchmarks/train/bench.py --no-write --runs 1 --steps 10
    python benchmarks/train/bench.py --only dpo       # rerun the DPO part; the rest from JSON

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
- **DPO**: seconds per step of `alloy train` (dpo, sigmoid, beta 0.1, 8 pairs a step) with the
  reference log-probabilities precomputed, against the floor: the policy's forward, backward and
  optimizer step on the same (2B, T) chosen+rejected batch with the reference values already in
  memory, timed alone. Also the live reference (a frozen copy's forward every step) and the
  one-off cost of precomputing the table (loading the reference and scoring every row).

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


def dpo_pairs(args: argparse.Namespace, path: Path) -> Path:
    """Preference pairs from the lab corpus, long enough to fill 256-token rows: the prompt is
    a document's first 400 characters, the chosen answer its next 800, the rejected answer the
    next 800 of the following document of another domain (alloy cuts each row to 256 tokens)."""
    docs: list[list[str]] = []
    for domain in DOMAINS:
        lines = (args.root / "corpus" / domain / "train.jsonl").read_text().splitlines()
        texts = (json.loads(line)["text"] for line in lines)
        docs.append([t for t in texts if len(t) >= 1200][: 2 * args.steps * 8])
    records = []
    for i in range(args.steps * 8):
        own, other = docs[i % len(docs)], docs[(i + 1) % len(docs)]
        text, rival = own[i // len(docs)], other[i // len(docs)]
        records.append(
            {"prompt": text[:400], "chosen": text[400:1200], "rejected": rival[400:1200]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_recipe(
    args: argparse.Namespace, model: Path, pairs: Path, precompute: bool
) -> dict[str, Any]:
    return recipe(
        args,
        model,
        objective="dpo",
        data=[{"name": "pairs", "path": str(pairs), "kind": "preference"}],
        preference={"beta": 0.1, "loss": "sigmoid", "precompute_reference": precompute},
        optimizer={
            "name": "adamw",
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "max_grad_norm": None,
        },
    )


def dpo_rows(args: argparse.Namespace, model: Path, pairs: Path) -> tuple[Any, Any]:
    """(the run's pair rows, its collator), from alloy's plan of the precomputed DPO run."""
    from alloy.train import load_train_recipe
    from alloy.train.packing import Collator
    from alloy.train.plan import plan_training

    plan = plan_training(load_train_recipe(dpo_recipe(args, model, pairs, True)))
    pad = plan.tokenizer.pad_token_id
    return plan.rows, Collator(0 if pad is None else int(pad))


def dpo_precompute(args: argparse.Namespace, model: Path, pairs: Path, folder: Path) -> float:
    """Seconds of the one-off reference table: load the reference, score every row (alloy's
    ReferenceCache.build, as `precompute_reference: true` runs it, batches of 8 pairs)."""
    from alloy.train.objectives.dpo import ReferenceCache, load_reference

    rows, collate = dpo_rows(args, model, pairs)
    t = time.perf_counter()
    ReferenceCache.build(
        lambda: load_reference(model, torch.device("cpu")),
        rows,
        collate,
        identity=str(model),
        average=False,
        folder=folder,
        batch_size=8,
        device=torch.device("cpu"),
        say=lambda m: None,
    )
    seconds = time.perf_counter() - t
    for table in folder.glob("*.npy"):
        table.unlink()
    return seconds


def dpo_floor(args: argparse.Namespace, model: Path, pairs: Path) -> float:
    """Seconds per step of the policy's forward, backward and AdamW step on one (16, 256)
    batch of 8 pairs, the reference log-probabilities computed beforehand (not timed)."""
    from transformers import AutoModelForCausalLM

    rows, collate = dpo_rows(args, model, pairs)
    batches = [collate([rows[step * 8 + i] for i in range(8)]) for step in range(args.steps)]

    def logprobs(net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        # Labels shifted left rather than logits sliced: no (2B, T-1, V) copy.
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        picked = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])
        return torch.where(labels != -100, picked.squeeze(-1), 0.0).sum(-1)  # (2B,)

    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        cached = [logprobs(reference, batch) for batch in batches]
    del reference
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).train()
    # alloy's `adamw` is torch's fused kernel: the floor uses the same update.
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True
    )
    times = []
    for batch, ref in zip(batches, cached, strict=True):
        t = time.perf_counter()
        pol = logprobs(policy, batch)
        h = (pol[:8] - pol[8:]) - (ref[:8] - ref[8:])
        loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[args.warmup :])


def run_dpo(args: argparse.Namespace, student: Path, work: Path) -> dict[str, Any]:
    """The DPO part: live reference, precomputed reference, floor and precompute cost, the
    contenders interleaved run by run."""
    pairs = dpo_pairs(args, work / "pairs.jsonl")
    results: dict[str, list[float]] = {
        "dpo_live_s": [],
        "dpo_precomputed_s": [],
        "dpo_floor_s": [],
        "dpo_precompute_once_s": [],
    }
    for run in range(args.runs):
        print(f"dpo run {run + 1}/{args.runs}", flush=True)
        spec = dpo_recipe(args, student, pairs, False)
        results["dpo_live_s"].append(alloy_run(args, spec, work / "dpo-live")[1])
        spec = dpo_recipe(args, student, pairs, True)
        results["dpo_precomputed_s"].append(alloy_run(args, spec, work / "dpo-pre")[1])
        results["dpo_floor_s"].append(dpo_floor(args, student, pairs))
        results["dpo_precompute_once_s"].append(
            dpo_precompute(args, student, pairs, work / "reference-table")
        )
    return {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "pairs": args.steps * 8,
        "results": results,
        "median": {k: statistics.median(v) for k, v in results.items()},
    }


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
    parser.add_argument(
        "--only",
        choices=["dpo"],
        help="run only this part; the other parts' numbers are read from results.json",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(torch.get_num_threads())
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    out = ROOT / "benchmarks" / "train" / "results.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student = save_model("small", work / "student")
        if args.only == "dpo":
            payload = json.loads(out.read_text())
        else:
            payload = run_main(args, work, student)
        payload["dpo"] = run_dpo(args, student, work)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({**payload["median"], **payload["dpo"]["median"]}, indent=2))
    if not args.no_write:
        replace_section(ROOT / "docs" / "benchmarks.md", "train", section(payload))
    return 0


def run_main(args: argparse.Namespace, work: Path, student: Path) -> dict[str, Any]:
    """The causal-LM, distillation and data-loading parts."""
    results: dict[str, list[float]] = {
        "alloy_tokens_per_s": [],
        "trainer_tokens_per_s": [],
        "distill_s": [],
        "distill_cached_s": [],
        "floor_s": [],
        "causal_step_s": [],
        "cache_build_s": [],
    }
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
    return {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "results": results,
        "median": {k: statistics.median(v) for k, v in results.items() if v},
        "data_share": share,
    }


def _threads(part: dict[str, Any]) -> str:
    n = part.get("threads")
    return f"{n} torch thread{'s' if n != 1 else ''}" if n else "torch's default threads"


def section(payload: dict[str, Any]) -> str:
    m = payload["median"]
    ratio = m["alloy_tokens_per_s"] / m["trainer_tokens_per_s"]
    over_floor = m["distill_s"] / m["floor_s"]
    command = "python benchmarks/train/bench.py"
    lines = [
        "## Train: alloy train vs a bare Trainer, distillation and DPO vs their floors",
        "",
        re.sub(r"\s+", " ", __doc__.split("\n\n")[2]).strip(),
        "",
        f"{payload['machine']}, {_threads(payload)}. Median of {payload['runs']} runs of "
        f"{payload['steps']} steps (timed after step {payload['warmup']}). Regenerate with "
        f"`{command}`.",
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
    if "dpo" in payload:
        lines += ["", *dpo_section(payload["dpo"], payload["machine"])]
    return "\n".join(lines)


def dpo_section(d: dict[str, Any], main_machine: str) -> list[str]:
    m = d["median"]
    elsewhere = (
        " This part ran on another machine than the rows above (each ratio compares numbers "
        "of one machine only)."
        if d["machine"] != main_machine
        else ""
    )
    over_floor = m["dpo_precomputed_s"] / m["dpo_floor_s"]
    live = m["dpo_live_s"] / m["dpo_precomputed_s"]
    return [
        "### DPO: seconds per step against the policy's own floor",
        "",
        f"`objective: dpo` (sigmoid, beta 0.1) on the small Llama above, {d['pairs']} preference "
        "pairs built from the lab corpus (prompt: a document's first 400 characters; chosen: "
        "its next 800; rejected: the next 800 of a document of another domain), every row cut "
        "to 256 tokens, 8 pairs a step: one (16, 256) chosen+rejected batch, fp32, fused AdamW, "
        "no clipping. The floor is the policy's forward, backward and optimizer step on the "
        "same batches with the reference log-probabilities already in memory, timed alone. "
        f"{d['machine']}, {_threads(d)}. Median of {d['runs']} runs of {d['steps']} steps "
        f"(timed after step {d['warmup']}), the four measurements interleaved run by run. "
        "Regenerate this part alone with `python benchmarks/train/bench.py --only dpo` (the "
        f"default command reruns it with the rest).{elsewhere}",
        "",
        "| measurement | alloy | reference | ratio |",
        "|---|---|---|---|",
        "| DPO s/step, precomputed reference (vs policy fwd/bwd/step alone) | "
        f"{m['dpo_precomputed_s']:.3f} | {m['dpo_floor_s']:.3f} | {over_floor:.3f} |",
        "| DPO s/step, live reference (vs precomputed) | "
        f"{m['dpo_live_s']:.3f} | {m['dpo_precomputed_s']:.3f} | {live:.3f} |",
        "",
        f"Target: DPO with a precomputed reference within 10% of its floor (ratio <= 1.10): "
        f"{'met' if over_floor <= 1.10 else 'not met'}. Precomputing the reference table for the "
        f"run's {d['pairs']} pairs (loading the reference and one forward over every row) took "
        f"{m['dpo_precompute_once_s']:.1f} s once; the live reference instead costs "
        f"{m['dpo_live_s'] - m['dpo_precomputed_s']:.3f} s every step, so the table pays for "
        "itself after "
        + (
            f"{m['dpo_precompute_once_s'] / (m['dpo_live_s'] - m['dpo_precomputed_s']):.0f} "
            f"steps (this run has {d['steps']})."
            if m["dpo_live_s"] > m["dpo_precomputed_s"]
            else "no step here (the live reference was not slower)."
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
