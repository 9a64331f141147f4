"""Preference optimisation (`objective: dpo`) on SmolLM2-135M and the quiz, to docs/results.md.

    python experiments/preferences.py --parts dpo --cells sft dpo   # about 35 min on 2 cores
    python experiments/preferences.py --parts dpo            # and the LoRA cell: about 15 more
    python experiments/preferences.py --parts dpo --render   # rewrite the section from its JSON

Parts (each writes experiments/results/preferences_<part>.json, a docs/results.md section
`preferences-<part>` and a plot under docs/img/; trained models are kept under
--root/experiments/preferences/ and reused when their recipe is unchanged):

- dpo: the quiz (runs/lab/corpus/tasks/quiz) split by experiments/train.py's `quiz_split`
  (the same hash of the question, so the numbers compare with the SFT section). Cells: the start
  model; SFT on the chosen answers of the train split; DPO (sigmoid, beta 0.1) on the train pairs
  from the start model; the same DPO as a LoRA adapter (reference: the adapter-disabled base);
  IPO with `--cells sft dpo dpo_lora ipo`. Scored by preference accuracy on the test pairs
  and multiple-choice accuracy on the test and train questions (`alloy eval`, by
  log-likelihood), with each run's logged reward margin and accuracy and its wall time.

A new part is a `part_<name>(args) -> payload`, a `section_<name>(payload) -> str` and a
`plot_<name>(payload, path)` here (its name added to PARTS); `main` does the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section, train_once

from adapters import ALL_LINEAR, as_model, smollm2
from train import _header, base_recipe, quiz_split, steps

PARTS = ("dpo",)

# One budget for every trained cell: STEPS micro batches of BATCH pairs (a quarter of an epoch
# of the train split: a DPO step takes about 20 s on 2 shared cores); the learning rates are
# customary for each method at this size and step count.
STEPS, BATCH, SEQ = 40, 8, 64
SFT_LR = 5e-5  # experiments/train.py's sft part
DPO_LR = 1e-5  # full DPO: 5 steps at 5e-6 moved the train margin by under 0.01
LORA_LR = 1e-4  # LoRA: 10x the full LR, customary
BETA = 0.1
DEFAULT_CELLS = ("sft", "dpo", "dpo_lora")  # and "ipo" by --cells
TRAIN_SAMPLE = 4
LAST_STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--cells", nargs="+", help="only these trained cells (by key)")
    parser.add_argument("--max-items", type=int, help="score only the first N of each set (smoke)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the parts' sections and plots from JSON"
    )
    args = parser.parse_args()
    quiet()
    for part in args.parts:
        saved = args.json / f"preferences_{part}.json"
        if args.render:
            payload = json.loads(saved.read_text())
        else:
            t = time.perf_counter()
            payload = globals()[f"part_{part}"](args)
            # A part that reuses runs reports its cells' own minutes (training and scoring).
            payload.setdefault("minutes", (time.perf_counter() - t) / 60)
            payload["machine"] = machine()
            payload["command"] = (
                f"python experiments/preferences.py --parts {part}"
                + (f" --scale {args.scale:g}" if args.scale != 1 else "")
                + (f" --cells {' '.join(args.cells)}" if args.cells else "")
            )
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(payload, indent=2) + "\n")
        globals()[f"plot_{part}"](payload, args.img / f"preferences_{part}.png")
        replace_section(args.docs, f"preferences-{part}", globals()[f"section_{part}"](payload))
        print(f"{part}: written", flush=True)


# ---- shared ----------------------------------------------------------------------------------


def preference_split(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The quiz's preference pairs and multiple-choice items, split as `quiz_split` splits them:
    a pair is a test pair when its prompt is the question of a test item."""
    sft, mc_test, mc_train = quiz_split(args, work)
    test_questions = {json.loads(line)["context"] for line in mc_test.read_text().splitlines()}
    pairs = (args.root / "corpus" / "tasks" / "quiz" / "preference.jsonl").read_text()
    train, test = [], []
    for line in pairs.splitlines():
        pair = json.loads(line)
        record = {k: pair[k] for k in ("prompt", "chosen", "rejected")}
        (test if pair["prompt"] in test_questions else train).append(json.dumps(record) + "\n")
    files = {
        "sft": sft,
        "mc_test": mc_test,
        "mc_train": work / "quiz-train-mc-sample.jsonl",
        "pairs_train": work / "quiz-train-pairs.jsonl",
        "pairs_test": work / "quiz-test-pairs.jsonl",
    }
    # Every TRAIN_SAMPLE-th train question: memorisation, at a fraction of the scoring time.
    files["mc_train"].write_text("".join(mc_train.read_text().splitlines(True)[::TRAIN_SAMPLE]))
    files["pairs_train"].write_text("".join(train))
    files["pairs_test"].write_text("".join(test))
    return files


def run_metrics(out: Path) -> list[dict[str, float]]:
    """Every step's row of the run's training/metrics.csv, as numbers where they parse."""
    rows = []
    with (out / "training" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            parsed: dict[str, float] = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def timed_train(recipe: dict[str, Any], out: Path) -> float:
    """Seconds `train_once` took (near zero when the run is reused; its saved time is kept)."""
    stamp = out / "experiment-seconds.txt"
    t = time.perf_counter()
    train_once(recipe, out)
    seconds = time.perf_counter() - t
    if stamp.is_file() and seconds < 5:
        return float(stamp.read_text())
    stamp.write_text(f"{seconds:.1f}\n")
    return seconds


# ---- DPO ---------------------------------------------------------------------------------------


def dpo_cells(args: argparse.Namespace, files: dict[str, Path], model: Path) -> dict[str, Any]:
    """Key -> (name, recipe) of every trained cell, at one step budget."""
    n = steps(args, STEPS)
    warmup = max(1, round(0.1 * n))

    def recipe(objective: str, data: Any, lr: float, **changes: Any) -> dict[str, Any]:
        return base_recipe(
            args,
            objective=objective,
            model=str(model),
            data=data,
            max_steps=n,
            batch_size=BATCH,
            sequence_length=SEQ,
            log_every=10,
            schedule={"name": "cosine", "lr": lr, "min_lr": lr / 10, "warmup": warmup},
            **changes,
        )

    pairs = [{"path": str(files["pairs_train"]), "kind": "preference"}]
    sigmoid = {"beta": BETA, "loss": "sigmoid"}
    lora = {"type": "lora", "rank": 16, "alpha": 32, "target_modules": ALL_LINEAR}
    return {
        "sft": ("SFT on the chosen answers", recipe("sft", [str(files["sft"])], SFT_LR)),
        "dpo": ("DPO (sigmoid, β 0.1)", recipe("dpo", pairs, DPO_LR, preference=sigmoid)),
        "dpo_lora": (
            "DPO, LoRA r=16 (all linear)",
            recipe("dpo", pairs, LORA_LR, preference=sigmoid, adapter=lora),
        ),
        "ipo": (
            "IPO (β 0.1)",
            recipe("dpo", pairs, DPO_LR, preference={"beta": BETA, "loss": "ipo"}),
        ),
    }


def part_dpo(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    model = smollm2(args.root)
    work = args.root / "experiments" / "preferences" / "dpo"
    files = preference_split(args, work)
    cells = dpo_cells(args, files, model)
    keys = [k for k in cells if k in (args.cells or DEFAULT_CELLS)]
    sets = load_eval_sets([files["pairs_test"], files["mc_test"], files["mc_train"]])
    rows: dict[str, dict[str, Any]] = {}
    for key in ["start", *keys]:
        if key == "start":
            name, path, run = "SmolLM2-135M (start)", model, {}
        else:
            name, recipe = cells[key]
            out = work / key
            seconds = timed_train(recipe, out)
            metrics = run_metrics(out)
            last = metrics[-1]
            run = {
                "recipe": recipe,
                "seconds": seconds,
                "steps": len(metrics),
                "final": {k: v for k, v in last.items() if k.startswith(("loss", "rewards/"))},
                # One step is 8 pairs: the last LAST_STEPS steps' mean is the steadier number.
                "last": {
                    k: sum(r[k] for r in metrics[-LAST_STEPS:]) / len(metrics[-LAST_STEPS:])
                    for k in last
                    if k.startswith(("loss", "rewards/"))
                },
                "curve": [
                    {k: v for k, v in row.items() if k in ("step", "loss", "rewards/margin")}
                    for row in metrics
                ],
            }
            path = as_model(out, model, work / f"{key}-folded")
        # Scores are kept beside the run, keyed by its recipe, so adding a cell rescores nothing.
        cache = work / f"{key}-scores.json"
        stamp = json.dumps([run.get("recipe"), args.max_items, TRAIN_SAMPLE], sort_keys=True)
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
        if saved.get("stamp") != stamp:
            t = time.perf_counter()
            settings = EvalSettings(batch_size=16, max_items=args.max_items)
            scores = evaluate(load_scorer(path, name=name), sets, settings)
            saved = {
                "stamp": stamp,
                "scores": {k.split("/")[-1]: v for k, v in scores.items()},
                "seconds": time.perf_counter() - t,
            }
            cache.write_text(json.dumps(saved) + "\n")
        scores = saved["scores"]
        rows[key] = {"name": name, "scores": scores, "eval_seconds": saved["seconds"], **run}
        print(f"  {name}: { {k: round(v['accuracy'], 3) for k, v in scores.items()} }", flush=True)
    seconds = sum(c.get("seconds", 0.0) + c["eval_seconds"] for c in rows.values())
    return {
        "minutes": seconds / 60,
        "cells": rows,
        "train_pairs": len(files["pairs_train"].read_text().splitlines()),
        "test_pairs": len(files["pairs_test"].read_text().splitlines()),
        "test_items": len(files["mc_test"].read_text().splitlines()),
        "train_items": len(files["mc_train"].read_text().splitlines()),
        "train_sample": TRAIN_SAMPLE,
        "steps": steps(args, STEPS),
        "batch": BATCH,
        "lr": {"sft": SFT_LR, "dpo": DPO_LR, "dpo_lora": LORA_LR, "ipo": DPO_LR},
    }


def plot_dpo(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: c for k, c in payload["cells"].items() if c.get("curve") and k != "sft"}
    if not runs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for cell in runs.values():
        step = [r["step"] for r in cell["curve"]]
        left.plot(step, [r["loss"] for r in cell["curve"]], label=cell["name"], lw=1)
        if any("rewards/margin" in r for r in cell["curve"]):
            margin = [r.get("rewards/margin", float("nan")) for r in cell["curve"]]
            right.plot(step, margin, label=cell["name"], lw=1)
    left.set(xlabel="step", ylabel="loss", title="training loss")
    right.set(xlabel="step", ylabel="reward margin", title="rewards/margin (train pairs)")
    left.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


CELL_TEXT = {
    "sft": "SFT on the train split's chosen answers (lr {lr:g}, the SFT section's)",
    "dpo": "DPO with the sigmoid loss, β 0.1, reference the start model (lr {lr:g}, 10x the "
    "DPO paper's 1e-6: a 5-step check at 5e-6 moved the train reward margin by under 0.01)",
    "dpo_lora": "the same DPO as a LoRA adapter, r=16 on all linear layers, reference the "
    "adapter-disabled base (lr {lr:g}, 10x the full one)",
    "ipo": "IPO, β 0.1 (lr {lr:g})",
}


def section_dpo(payload: dict[str, Any]) -> str:
    cells = payload["cells"]
    lr = payload["lr"]
    lines = [
        "## Preference optimisation: DPO on SmolLM2-135M and the quiz",
        "",
        f"The quiz split as in the SFT section (the same hash of the question): "
        f"{payload['train_pairs']} train pairs (prompt, the right answer as `chosen`, a wrong one "
        f"as `rejected`), {payload['test_pairs']} test pairs, {payload['test_items']} test and "
        f"{payload['train_items']} train multiple-choice questions (every "
        f"{payload['train_sample']}th of the train split; 4-way, chance 0.25). Every "
        f"trained cell starts from SmolLM2-135M and runs {payload['steps']} steps of "
        f"{payload['batch']} examples (cosine, 10% warm-up, AdamW as in the SFT section; "
        f"{payload['steps'] * payload['batch']} examples, a fraction of one epoch): "
        + "; ".join(CELL_TEXT[k].format(lr=lr[k]) for k in cells if k in CELL_TEXT)
        + ". Preference accuracy: the share of test pairs whose chosen answer has the higher "
        "log-likelihood (the policy alone). Margin / reward accuracy: the logged "
        f"`rewards/margin` and `rewards/accuracy` of the last {LAST_STEPS} steps' train pairs, "
        "averaged (the JSON also has the last step's).",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| cell | test pairs: pref. accuracy | test MC accuracy | train MC accuracy "
        f"| margin, last {LAST_STEPS} steps | reward acc., last {LAST_STEPS} steps | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in cells.values():
        s = cell["scores"]
        final = cell.get("last", {})
        margin = final.get("rewards/margin")
        accuracy = final.get("rewards/accuracy")
        lines.append(
            f"| {cell['name']} | {s['quiz-test-pairs']['accuracy']:.3f} | "
            f"{s['quiz-test-mc']['accuracy']:.3f} | {s['quiz-train-mc-sample']['accuracy']:.3f} | "
            + (f"{margin:.3f}" if margin is not None else "–")
            + " | "
            + (f"{accuracy:.2f}" if accuracy is not None else "–")
            + " | "
            + (f"{cell['seconds'] / 60:.1f}" if "seconds" in cell else "–")
            + " |"
        )
    lines += ["", "![DPO loss and reward margin per step](img/preferences_dpo.png)", ""]
    lines.append(seen_dpo(cells))
    return "\n".join(lines)


def seen_dpo(cells: dict[str, Any]) -> str:
    """The "Seen:" sentence, from the numbers alone."""

    def acc(key: str, split: str) -> float:
        return float(cells[key]["scores"][split]["accuracy"])

    parts = []
    start = acc("start", "quiz-test-mc")
    for key in (k for k in cells if k != "start"):
        test, train = acc(key, "quiz-test-mc"), acc(key, "quiz-train-mc-sample")
        pref = acc(key, "quiz-test-pairs")
        parts.append(
            f"{cells[key]['name']} moves test MC accuracy {start:.3f} -> {test:.3f} "
            f"({test - start:+.3f}; train {train:.3f}, a gap of {train - test:+.3f}) and test "
            f"preference accuracy {acc('start', 'quiz-test-pairs'):.3f} -> {pref:.3f}"
        )
    text = "Seen: " + "; ".join(parts) + "."
    if "dpo" in cells and "sft" in cells:
        dpo, sft = acc("dpo", "quiz-test-mc"), acc("sft", "quiz-test-mc")
        verdict = "beats" if dpo > sft else "does not beat" if dpo < sft else "ties"
        text += (
            f" At this budget DPO {verdict} SFT on held-out multiple choice "
            f"({dpo:.3f} vs {sft:.3f})."
        )
    return text


if __name__ == "__main__":
    main()
