"""Context distillation (`objective: context_distill`) of a few-shot prompt into SmolLM2-135M.

    OMP_NUM_THREADS=1 python experiments/context_distill.py   # about 45 min on a shared CPU
    python experiments/context_distill.py --render   # rewrite the section from its JSON

The quiz (runs/lab/corpus/tasks/quiz) split by experiments/train.py's `quiz_split` (a hash of the
question, 20% test). A few-shot prefix is built from SHOTS training questions with their answers
(`Question: ...\\nAnswer: ...`, a blank line after each); those questions are left out of the
training data. Scored on the held-out questions as 4-way multiple choice by log-likelihood
(`alloy eval`): the start model zero-shot, the start model with the prefix before every question
(few-shot: the accuracy the context gives), the context-distilled model zero-shot, and a control,
plain SFT on the same prompts and answers for the same steps (no teacher), so a gain can be
attributed to the context. Also the held-out KL from the few-shot teacher to each model reading
no prefix, on the answer tokens: how much of the context's effect moved into the weights.

Writes experiments/results/context_distill.json, the docs/results.md section
`train-context_distill` and docs/img/context_distill.png; trained models are kept under
--root/experiments/context_distill/ and reused when their recipe is unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section
from preferences import run_metrics, timed_train

from adapters import smollm2
from train import _header, base_recipe, quiz_split

SHOTS = 8
EPOCHS = 0.5  # 81 steps: about 10 s each at 1 thread on a shared machine
BATCH, SEQ, LR = 8, 64, 5e-5  # the SFT section's batch, rows and learning rate
SECTION = "train-context_distill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--max-items", type=int, help="score only the first N questions (smoke)")
    parser.add_argument(
        "--test-every", type=int, default=1, help="score every N-th held-out question only"
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--render", action="store_true", help="rewrite the section from JSON")
    args = parser.parse_args()
    quiet()
    saved = args.json / "context_distill.json"
    if args.render:
        payload = json.loads(saved.read_text())
    else:
        t = time.perf_counter()
        payload = run(args)
        payload["minutes"] = (time.perf_counter() - t) / 60
        payload["machine"] = machine()
        payload["command"] = "OMP_NUM_THREADS=1 python experiments/context_distill.py" + "".join(
            f" --{k} {v:g}"
            for k, v in (
                ("shots", args.shots),
                ("epochs", args.epochs),
                ("test-every", args.test_every),
            )
            if v != {"shots": SHOTS, "epochs": EPOCHS, "test-every": 1}[k]
        )
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, args.img / "context_distill.png")
    replace_section(args.docs, SECTION, section(payload))
    print("written", flush=True)


def split(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The quiz files: training prompts (without the prefix's questions), the prefix, and the
    held-out questions without and with the prefix before each."""
    _, mc_test, mc_train = quiz_split(args, work)
    train = [json.loads(line) for line in mc_train.read_text().splitlines()]
    shots = random.Random(0).sample(range(len(train)), args.shots)
    prefix = "".join(
        f"{train[i]['context']}{train[i]['choices'][train[i]['answer']]}\n\n" for i in shots
    )
    files = {
        "prefix": work / f"prefix-{args.shots}shot.txt",
        "train": work / f"quiz-train-{args.shots}shot-excluded.jsonl",
        "test": mc_test,
        "test_fewshot": work / f"quiz-test-mc-{args.shots}shot.jsonl",
    }
    files["prefix"].write_text(prefix)
    kept = [item for i, item in enumerate(train) if i not in set(shots)]
    files["train"].write_text(
        "".join(
            json.dumps({"prompt": i["context"], "completion": i["choices"][i["answer"]]}) + "\n"
            for i in kept
        )
    )
    # The file is in topic order: every N-th question keeps the topics' mix.
    test = [json.loads(line) for line in mc_test.read_text().splitlines()][:: args.test_every]
    files["test"] = work / f"quiz-test-mc-every{args.test_every}.jsonl"
    files["test"].write_text("".join(json.dumps(i) + "\n" for i in test))
    files["test_fewshot"].write_text(
        "".join(json.dumps({**i, "context": prefix + i["context"]}) + "\n" for i in test)
    )
    return {"files": files, "prefix": prefix, "train_items": len(kept), "test_items": len(test)}


def held_out_kl(
    model_folder: Path, teacher: Any, tokenizer: Any, prefix: str, test: Path, limit: int | None
) -> float:
    """Mean forward KL per answer token (gold answer + EOS) of the held-out questions, from the
    start model reading the prefix to `model_folder`'s model reading none (the training loss,
    on questions it never trained on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alloy.train.context import ContextEntry
    from alloy.train.data import Item, special_ids, tokenize_items
    from alloy.train.objectives.context_distill import ContextDistill
    from alloy.train.packing import Collator

    items = [json.loads(line) for line in test.read_text().splitlines()][:limit]
    examples = [
        Item("completion", ((i["context"], False), (i["choices"][i["answer"]], True)))
        for i in items
    ]
    source = tokenize_items(examples, tokenizer)
    ids = torch.tensor(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    pad = tokenizer.pad_token_id or 0
    objective = ContextDistill(
        ContextEntry(text=prefix),
        ids,
        start=special_ids(tokenizer)[0],
        pad=pad,
        vocab=len(tokenizer),
        teacher=teacher,
    )
    student = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    total = count = 0.0
    for first in range(0, source.items, 16):
        rows = []
        for i in range(first, min(first + 16, source.items)):
            a, b = int(source.starts[i]), int(source.starts[i + 1])
            row = torch.from_numpy(source.ids[a:b].astype("int64"))
            labels = row.masked_fill(~torch.from_numpy(source.mask[a:b]), -100)
            rows.append({"input_ids": row, "labels": labels, "source": 0, "index": i})
        with torch.no_grad():
            parts = objective.loss(student, Collator(pad)(rows))
        total += float(parts.metrics["kd"])
        count += float(parts.count)
    return total / count


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    model = smollm2(args.root)
    work = args.root / "experiments" / "context_distill"
    data = split(args, work)
    files = data["files"]
    steps = max(2, round(args.epochs * data["train_items"] / BATCH))

    warmup = min(10, max(1, steps // 10))

    def recipe(objective: str, **changes: Any) -> dict[str, Any]:
        return base_recipe(
            args,
            objective=objective,
            model=str(model),
            data=[str(files["train"])],
            max_steps=steps,
            batch_size=BATCH,
            sequence_length=SEQ,
            log_every=10,
            schedule={"name": "cosine", "lr": LR, "min_lr": LR / 10, "warmup": warmup},
            **changes,
        )

    context = {"path": str(files["prefix"]), "loss": "forward_kl", "temperature": 1.0, "alpha": 1.0}
    cells = {
        "context_distill": (
            "context-distilled (KD from the few-shot teacher)",
            recipe("context_distill", context=context),
        ),
        "sft": ("SFT control (same answers, no teacher)", recipe("sft")),
    }
    settings = EvalSettings(batch_size=16, max_items=args.max_items)
    tokenizer = AutoTokenizer.from_pretrained(model)
    teacher = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    zero_shot, few_shot = load_eval_sets([files["test"]]), load_eval_sets([files["test_fewshot"]])
    rows: dict[str, dict[str, Any]] = {}
    for key in ["start", *cells]:
        if key == "start":
            name, path, run_info = "SmolLM2-135M-Instruct (start)", model, {}
        else:
            name, cell_recipe = cells[key]
            out = work / key
            seconds = timed_train(cell_recipe, out)
            metrics = run_metrics(out)
            run_info = {
                "recipe": cell_recipe,
                "seconds": seconds,
                "steps": len(metrics),
                "curve": [
                    {k: r[k] for k in ("step", "loss", "kd", "ce") if k in r} for r in metrics
                ],
            }
            path = out
        t = time.perf_counter()
        scorer = load_scorer(path, name=name)
        scores = {"zero_shot": evaluate(scorer, zero_shot, settings)}
        if key == "start":  # the accuracy the prefix gives (the longest scoring: 1 cell only)
            scores["few_shot"] = evaluate(scorer, few_shot, settings)
        scores = {k: next(iter(v.values())) for k, v in scores.items()}
        kl = held_out_kl(path, teacher, tokenizer, data["prefix"], files["test"], args.max_items)
        rows[key] = {
            "name": name,
            "scores": scores,
            "held_out_kl": kl,
            "eval_seconds": time.perf_counter() - t,
            **run_info,
        }
        print(
            f"  {name}: { {k: round(v['accuracy'], 3) for k, v in scores.items()} }, KL {kl:.4f}",
            flush=True,
        )
    return {
        "cells": rows,
        "shots": args.shots,
        "prefix_tokens": len(tokenizer(data["prefix"], add_special_tokens=False)["input_ids"]),
        "prefix": data["prefix"],
        "train_items": data["train_items"],
        "test_items": args.max_items or data["test_items"],
        "steps": steps,
        "epochs": args.epochs,
        "test_every": args.test_every,
        "batch_size": BATCH,
        "lr": LR,
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = payload["cells"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    labels, values = [], []
    for key, cell in cells.items():
        for mode, score in cell["scores"].items():
            labels.append(f"{key}\n{mode.replace('_', '-')}")
            values.append(score["accuracy"])
    left.bar(range(len(values)), values, color="tab:blue")
    left.axhline(0.25, color="grey", lw=0.8, ls=":")
    left.set_xticks(range(len(values)), labels, fontsize=6)
    left.set(ylabel="held-out accuracy", title="quiz multiple choice")
    for key, cell in cells.items():
        curve = cell.get("curve") or []
        if curve and "kd" in curve[0]:
            right.plot([r["step"] for r in curve], [r["kd"] for r in curve], lw=1, label=key)
    right.set(xlabel="step", ylabel="KL (nats / answer token)", title="training KD")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def section(payload: dict[str, Any]) -> str:
    cells = payload["cells"]
    start, cd, sft = cells["start"], cells["context_distill"], cells["sft"]
    n = payload["test_items"]

    def acc(cell: dict[str, Any], mode: str) -> float:
        return float(cell["scores"][mode]["accuracy"])

    def stderr(p: float) -> float:
        return (p * (1 - p) / n) ** 0.5

    lines = [
        "## Context distillation: a few-shot prompt distilled into SmolLM2-135M",
        "",
        f"`objective: context_distill` (Snell et al. 2022): the teacher is the start model reading "
        f"a prefix of {payload['shots']} training questions with their answers "
        f"({payload['prefix_tokens']} tokens), the student reads the question alone, and learns "
        f"the teacher's next-token distributions on the answer tokens (forward KL, T = 1, no "
        f"cross-entropy). {payload['train_items']} training questions with their gold answers "
        f"(the prefix's left out), {payload['steps']} steps of {payload['batch_size']} "
        f"({payload['epochs']:g} epoch), cosine from {payload['lr']:g}; the SFT control trains "
        f"on the same prompts and answers for the same steps with cross-entropy only. "
        f"{n} held-out questions"
        + (
            f" (one in {payload['test_every']} of the split's, topics kept)"
            if payload.get("test_every", 1) > 1
            else ""
        )
        + ", 4-way multiple choice by log-likelihood (`alloy eval`, chance "
        "0.25); few-shot means the same prefix before every question. Held-out KL: the mean "
        "forward KL per answer token from the few-shot start model to the model reading no "
        "prefix (the training loss, on unseen questions).",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| model | zero-shot accuracy | (per byte) | few-shot accuracy | held-out KL | train min |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells.values():
        zero = cell["scores"]["zero_shot"]
        few = cell["scores"].get("few_shot")
        few_text = f"{few['accuracy']:.3f}" if few else "-"
        minutes = f"{cell['seconds'] / 60:.1f}" if "seconds" in cell else "-"
        lines.append(
            f"| {cell['name']} | {zero['accuracy']:.3f} | {zero['accuracy_norm']:.3f} | "
            f"{few_text} | {cell['held_out_kl']:.4f} | {minutes} |"
        )
    before, fewshot, after = acc(start, "zero_shot"), acc(start, "few_shot"), acc(cd, "zero_shot")
    control = acc(sft, "zero_shot")
    gap = fewshot - before
    closed = (after - before) / gap if gap else float("nan")
    lines += [
        "",
        f"Zero-shot {before:.3f} -> {after:.3f} after context distillation ({after - before:+.3f}; "
        f"standard error of one accuracy about {stderr(before):.3f}); the few-shot accuracy it "
        f"came from is {fewshot:.3f}, so the distilled model closes {closed:.0%} of the "
        f"zero-shot to few-shot gap of {gap:+.3f}. The SFT control reaches {control:.3f} "
        f"({control - before:+.3f}). Held-out KL to the few-shot teacher "
        f"{start['held_out_kl']:.4f} -> {cd['held_out_kl']:.4f} (SFT: {sft['held_out_kl']:.4f}).",
        "",
        "![context distillation](img/context_distill.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
