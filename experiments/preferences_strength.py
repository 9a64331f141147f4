"""Preference strength on the quiz: flipped labels found by an out-of-bag reward ensemble.

    python experiments/preferences_strength.py            # SmolLM2-135M reward models
    python experiments/preferences_strength.py --render   # rewrite the section from its JSON

The quiz's train pairs (experiments/preferences.py's split, so the test pairs are the DPO
section's) with 20% of their labels flipped on purpose (seeded). `alloy prefs strength --train 4`
trains four SmolLM2-135M reward models, each scoring only the pairs it held out; the flipped
pairs should have the lowest strength (AUROC). Then one reward model per training set: the true
labels, the noisy set, the noisy set without the flagged pairs, and with the pairs flagged
mislabelled flipped back, each scored by preference accuracy on the test pairs. Writes
experiments/results/preferences_strength.json, docs/results.md section `preferences-strength`
and docs/img/preferences_strength.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section
from preferences import SEQ, preference_split, timed_train

from adapters import smollm2
from train import _header, base_recipe, steps

FLIP_SHARE, ENSEMBLE, RM_STEPS, RM_BATCH, RM_LR = 0.2, 4, 80, 8, 1e-5


def rm_recipe(args: argparse.Namespace, model: Path, data: Path, steps_: int) -> dict[str, Any]:
    """A SmolLM2 reward model (Bradley-Terry, new score head) on `data`, one budget for all."""
    n = steps(args, steps_)
    return base_recipe(
        args,
        objective="reward",
        model=str(model),
        data=[{"name": "pairs", "path": str(data), "kind": "preference"}],
        schedule={"name": "cosine", "lr": RM_LR, "warmup": max(1, n // 10)},
        optimizer={"name": "adamw", "weight_decay": 0.0},
        max_steps=n,
        batch_size=RM_BATCH,
        sequence_length=SEQ,
        log_every=10,
    )


def part_strength(args: argparse.Namespace) -> dict[str, Any]:
    """Flip FLIP_SHARE of the train pairs; find them with an out-of-bag ensemble of reward models
    (`alloy prefs strength --train`); then train a reward model on the noisy pairs, on the pairs
    flagged clean, with flagged pairs relabelled, and on the true labels, and score each on the
    test pairs."""
    import random

    import yaml

    from alloy.cli.main import main as alloy
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.prefs import auroc, filter_records

    work = args.root / "experiments" / "preferences" / "strength"
    files = preference_split(args, work)
    model = smollm2(args.root)
    records = [json.loads(line) for line in files["pairs_train"].read_text().splitlines()]
    rng = random.Random(0)
    flipped = set(rng.sample(range(len(records)), round(FLIP_SHARE * len(records))))
    noisy = [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flipped else r
        for i, r in enumerate(records)
    ]
    noisy_file = work / "train-noisy.jsonl"
    noisy_file.write_text("".join(json.dumps(r) + "\n" for r in noisy))
    # Each ensemble member trains on about half the pairs: half the steps of a full run.
    bag_recipe = work / "rm-bag.yaml"
    bag_recipe.write_text(yaml.safe_dump(rm_recipe(args, model, noisy_file, RM_STEPS // 2)))
    out = work / "strength"
    t = time.perf_counter()
    argv = ["prefs", "strength", str(noisy_file), str(out), "--force", "-q"]
    code = alloy([*argv, "--train", str(ENSEMBLE), "--recipe", str(bag_recipe)])
    if code != 0:
        raise SystemExit(f"alloy prefs strength exited {code}")
    ensemble_seconds = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "strength.jsonl").read_text().splitlines()]
    flags = [r["flag"] for r in rows]
    is_flipped = [i in flipped for i in range(len(rows))]
    detection = {
        "auroc": auroc([-float(r["mean"]) for r in rows], is_flipped),
        "flagged_mislabelled": flags.count("mislabelled"),
        "flagged_ambiguous": flags.count("ambiguous"),
        "flipped": len(flipped),
        "mislabelled_precision": _share(flags, is_flipped, "mislabelled"),
        "flipped_caught": sum(
            f == "mislabelled" and p for f, p in zip(flags, is_flipped, strict=True)
        )
        / max(1, len(flipped)),
    }
    variants = {
        "true labels": records,
        "noisy (20% flipped)": noisy,
        "noisy, flagged pairs dropped": filter_records(
            noisy, flags, mislabelled="drop", ambiguous="drop"
        )[0],
        "noisy, mislabelled flipped back": filter_records(
            noisy, flags, mislabelled="flip", ambiguous="keep"
        )[0],
    }
    sets = load_eval_sets([files["pairs_test"]])
    settings = EvalSettings(batch_size=16)
    cells: dict[str, Any] = {}
    for k, (name, data) in enumerate(variants.items()):
        path = work / f"variant-{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        folder = work / f"rm-variant-{k}"
        seconds = timed_train(rm_recipe(args, model, path, RM_STEPS), folder)
        scores = evaluate(load_scorer(folder, name=name), sets, settings)
        (value,) = (v for key, v in scores.items() if "accuracy" in v)
        cells[name] = {"pairs": len(data), "test_accuracy": value["accuracy"], "seconds": seconds}
        print(f"  {name}: {cells[name]}", flush=True)
    return {
        "detection": detection,
        "cells": cells,
        "ensemble": ENSEMBLE,
        "ensemble_seconds": ensemble_seconds,
        "flip_share": FLIP_SHARE,
        "train_pairs": len(records),
        "test_pairs": len(sets[0].items),
        "rm_steps": steps(args, RM_STEPS),
        "rm_lr": RM_LR,
        "rm_batch": RM_BATCH,
        "summary": json.loads((out / "summary.json").read_text()),
    }


def _share(flags: list[str], truth: list[bool], flag: str) -> float:
    hits = [t for f, t in zip(flags, truth, strict=True) if f == flag]
    return sum(hits) / len(hits) if hits else 0.0


def plot_strength(payload: dict[str, Any], path: Path) -> None:
    """Held-out accuracy of the reward model per training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = payload["cells"]
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    names = list(cells)
    ax.barh(names, [cells[n]["test_accuracy"] for n in names], color="#4c72b0")
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("preference accuracy on the test pairs")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_strength(p: dict[str, Any]) -> str:
    d, cells = p["detection"], p["cells"]
    lines = [
        "## Preference strength: finding flipped labels with an out-of-bag reward ensemble",
        "",
        *_header(p, ""),
        f"The quiz's {p['train_pairs']:,} train pairs (the split of the DPO section) with "
        f"{p['flip_share']:.0%} of their labels flipped on purpose (seeded). `alloy prefs strength "
        f"--train {p['ensemble']}` trains {p['ensemble']} SmolLM2-135M reward models "
        "(`objective: reward`, Bradley-Terry, a new score head), each on the pairs it does not "
        "hold out, every pair held out by two of them and scored only by those two "
        f"({p['ensemble_seconds'] / 60:.0f} min). Then one reward model ({p['rm_steps']} steps of "
        f"{p['rm_batch']} pairs, LR {p['rm_lr']:g}, the same for every row) per training set, "
        f"scored by preference accuracy on the {p['test_pairs']} test pairs (chance 0.5). "
        "![reward model accuracy per training set](img/preferences_strength.png)",
        "",
        f"Detection: AUROC of the negated mean strength for the flipped pairs {d['auroc']:.3f}; "
        f"{d['flagged_mislabelled']} pairs flagged mislabelled "
        f"({d['mislabelled_precision']:.0%} of them truly flipped, "
        f"{d['flipped_caught']:.0%} of the {d['flipped']} flips caught), "
        f"{d['flagged_ambiguous']} ambiguous.",
        "",
        "| reward model trained on | pairs | test preference accuracy |",
        "|---|---:|---:|",
    ]
    for name, cell in cells.items():
        lines.append(f"| {name} | {cell['pairs']:,} | {cell['test_accuracy']:.3f} |")
    acc = {name: cell["test_accuracy"] for name, cell in cells.items()}
    noise = 2 * (0.25 / p["test_pairs"]) ** 0.5  # two standard errors of a coin at chance
    if abs(acc["true labels"] - 0.5) < noise:
        lines += [
            "",
            f"Seen: at this budget the reward models did not learn the task: even the one "
            f"trained on the true labels scores {acc['true labels']:.3f}, within two standard "
            f"errors ({noise:.3f}) of chance, and the ensemble's detection AUROC is "
            f"{d['auroc']:.3f}. The differences between the rows are noise; the claim that "
            "cleaning low-strength pairs helps is not tested by this run.",
        ]
        return "\n".join(lines)
    noisy = acc["noisy (20% flipped)"]
    better = [n for n in acc if n.startswith("noisy,") and acc[n] > noisy]
    lines += [
        "",
        "Seen: "
        + (
            f"cleaning helped: {', '.join(better)} beat{'s' if len(better) == 1 else ''} the "
            f"noisy set ({noisy:.3f})"
            if better
            else f"cleaning did not help here: no cleaned set beats the noisy one ({noisy:.3f})"
        )
        + f"; the true labels give {acc['true labels']:.3f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--render", action="store_true", help="rewrite the section from JSON")
    args = parser.parse_args()
    quiet()
    saved = args.json / "preferences_strength.json"
    if args.render:
        payload = json.loads(saved.read_text())
    else:
        t = time.perf_counter()
        payload = part_strength(args)
        payload["minutes"] = (time.perf_counter() - t) / 60
        payload["machine"] = machine()
        payload["command"] = "python experiments/preferences_strength.py" + (
            f" --scale {args.scale:g}" if args.scale != 1 else ""
        )
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(payload, indent=2) + "\n")
    plot_strength(payload, args.img / "preferences_strength.png")
    replace_section(args.docs, "preferences-strength", section_strength(payload))
    print("strength: written", flush=True)


if __name__ == "__main__":
    main()
