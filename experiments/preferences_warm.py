"""WARM on the fine-food reviews: a weight-averaged reward model against its members and their
prediction ensemble, in distribution and under a length shift, with 20% of the labels flipped.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/preferences_warm.py
    python experiments/preferences_warm.py --render   # rewrite the section from its JSON
    python experiments/preferences_warm.py --pilot --members 1 --scale 0.3   # prints only

Issue #17 evidence 3 (Ramé et al. 2024, https://arxiv.org/abs/2401.12187). Pairs are made from
runs/lab/corpus/tasks/reviews (Amazon fine-food reviews labelled great / other): the prompt is
"Review:", the chosen answer a great review, the rejected one an other review. Reward models
train on short reviews (at most SHORT characters) with FLIP_SHARE of the training pairs' labels
flipped (seeded, the same flips for every member); they are scored on held-out short pairs (in
distribution) and on pairs of long reviews (LONG characters: a length shift, never trained on).

Every member starts from one shared initialisation: the lab's experiment-size small Llama
(runs/lab/family/experiment/small/base) as a one-score classifier with one seeded score head,
saved once. Members differ in seed (data order) and learning rate. The soup is `alloy soup
--method uniform` over the members; the ensemble is the mean of the members' rewards. The
whole comparison is repeated over --repeats groups of members (other seeds). Writes
experiments/results/preferences_warm.json, docs/results.md section `preferences-warm` and
docs/img/preferences_warm.png; models stay under --root/experiments/preferences/warm/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section
from preferences import run_metrics, timed_train

from train import _header, base_recipe, steps

PROMPT = "Review:"
SHORT = 250  # characters: training and in-distribution reviews
LONG = (500, 1000)  # characters: the shifted reviews (the base reads 256 tokens at most)
TEST_PAIRS = 200  # held-out short pairs
PER_OTHER = 3  # training pairs per rejected (other) review, each with another great review
FLIP_SHARE = 0.2
# (seed, learning rate) of each member: one init, different data orders and learning rates.
MEMBERS = ((0, 5e-4), (1, 1e-3), (2, 7e-4), (3, 1.5e-3))
STEPS, BATCH, SEQ = 150, 8, 128
# Independent groups of members (other seeds, same init, flips and learning rates): the
# comparison is repeated, not read from one draw.
REPEATS = 4


def _pair(great: str, other: str) -> dict[str, str]:
    return {"prompt": PROMPT, "chosen": " " + great.strip(), "rejected": " " + other.strip()}


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def review_pairs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The pair files (seeded): noisy training pairs, held-out short pairs, long pairs, and the
    flipped training pairs as they were trained on (for memorisation)."""
    folder = args.root / "corpus" / "tasks" / "reviews"
    rows = [
        json.loads(line)
        for split in ("train", "test")
        for line in (folder / f"{split}.jsonl").read_text().splitlines()
    ]
    rng = random.Random(0)

    def by_label(pool: list[dict[str, str]]) -> tuple[list[str], list[str]]:
        great = [r["text"] for r in pool if r["label"] == "great"]
        other = [r["text"] for r in pool if r["label"] != "great"]
        rng.shuffle(great)
        rng.shuffle(other)
        return great, other

    great, other = by_label([r for r in rows if len(r["text"]) <= SHORT])
    test = [_pair(g, o) for g, o in zip(great[:TEST_PAIRS], other[:TEST_PAIRS], strict=True)]
    great, other = great[TEST_PAIRS:], other[TEST_PAIRS:]
    train = [
        _pair(great[(k * len(other) + j) % len(great)], o)
        for k in range(PER_OTHER)
        for j, o in enumerate(other)
    ]
    rng.shuffle(train)
    flipped = sorted(rng.sample(range(len(train)), round(FLIP_SHARE * len(train))))
    noisy = list(train)
    for i in flipped:
        noisy[i] = {**train[i], "chosen": train[i]["rejected"], "rejected": train[i]["chosen"]}
    long_great, long_other = by_label([r for r in rows if LONG[0] < len(r["text"]) <= LONG[1]])
    shifted = [_pair(g, o) for g, o in zip(long_great, long_other, strict=False)]
    return {
        "train_noisy": _write(work / "train-noisy.jsonl", noisy),
        # The flipped pairs with their true labels: accuracy here is 1 - memorisation.
        "flipped_true": _write(work / "train-flipped-true.jsonl", [train[i] for i in flipped]),
        "test_short": _write(work / "test-short.jsonl", test),
        "test_long": _write(work / "test-long.jsonl", shifted),
        "counts": {
            "train": len(train),
            "flipped": len(flipped),
            "test_short": len(test),
            "test_long": len(shifted),
        },
    }


def shared_init(base: Path, folder: Path) -> Path:
    """The base as a one-score classifier with a seeded score head (the members' one start)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:  # as alloy's reward objective does
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def member_recipe(
    args: argparse.Namespace, init: Path, data: Path, seed: int, lr: float
) -> dict[str, Any]:
    n = steps(args, STEPS)
    return base_recipe(
        args,
        objective="reward",
        model=str(init),
        data=[{"name": "pairs", "path": str(data), "kind": "preference"}],
        schedule={"name": "cosine", "lr": lr, "min_lr": lr / 10, "warmup": max(1, n // 10)},
        optimizer={"name": "adamw", "weight_decay": 0.0, "betas": [0.9, 0.95]},
        max_steps=n,
        batch_size=BATCH,
        sequence_length=SEQ,
        seed=seed,
        log_every=25,
    )


def score_model(folder: Path, files: dict[str, Path]) -> dict[str, Any]:
    """Rewards of chosen and rejected of every pair of every set, and the seconds it took."""
    from alloy.eval import load_scorer
    from alloy.eval.choice import reward_scores

    t = time.perf_counter()
    scorer = load_scorer(folder)
    out: dict[str, Any] = {}
    for name, path in files.items():
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
        chosen = reward_scores(scorer, [p["prompt"] + p["chosen"] for p in pairs], 16)
        rejected = reward_scores(scorer, [p["prompt"] + p["rejected"] for p in pairs], 16)
        out[name] = {"chosen": chosen, "rejected": rejected}
    out["seconds"] = time.perf_counter() - t
    return out


def correct(chosen: list[float], rejected: list[float]) -> list[float]:
    """Per pair: 1 right, 0.5 tie, 0 wrong (alloy eval's preference accuracy rule)."""
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over the same pairs and its standard error."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {"diff": statistics.fmean(d), "se": statistics.pstdev(d) / len(d) ** 0.5}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    work = args.root / "experiments" / "preferences" / ("warm-pilot" if args.pilot else "warm")
    base = args.root / "family" / "experiment" / "small" / "base"
    if not (base / "config.json").is_file():
        raise SystemExit(f"{base} is missing: build the lab family first (alloy lab build)")
    data = review_pairs(args, work)
    init = shared_init(base, work / "init")
    sets = {"short": data["test_short"], "long": data["test_long"]}
    sets["flipped"] = data["flipped_true"]
    groups = []
    for g in range(args.repeats):
        print(f"group {g + 1}/{args.repeats}", flush=True)
        groups.append(group(args, g, work, init, data, sets))
    return {
        "counts": data["counts"],
        # The first group's numbers at the top level, every group's under "groups".
        **groups[0],
        "groups": groups,
        "settings": {
            "prompt": PROMPT,
            "short_chars": SHORT,
            "long_chars": list(LONG),
            "flip_share": FLIP_SHARE,
            "steps": steps(args, STEPS),
            "batch": BATCH,
            "sequence_length": SEQ,
            "per_other": PER_OTHER,
        },
    }


def group(
    args: argparse.Namespace,
    g: int,
    work: Path,
    init: Path,
    data: dict[str, Any],
    sets: dict[str, Path],
) -> dict[str, Any]:
    """One WARM group: its members (seeds g * len(MEMBERS) + k, the learning rates of
    MEMBERS), their uniform soup and their ensemble, every model scored on every set."""
    import subprocess

    members: list[dict[str, Any]] = []
    scores: dict[str, dict[str, Any]] = {}
    prefix = f"g{g}-" if g else ""  # group 0's folders keep their first names
    for k, (seed, lr) in enumerate(MEMBERS[: args.members]):
        seed += g * len(MEMBERS)
        out = work / f"{prefix}member-{k}"
        recipe = member_recipe(args, init, data["train_noisy"], seed, lr)
        seconds = timed_train(recipe, out)
        metrics = run_metrics(out)
        last = metrics[-10:]
        members.append(
            {
                "name": f"member {k + 1} (seed {seed}, LR {lr:g})",
                "seed": seed,
                "lr": lr,
                "train_seconds": seconds,
                "steps": len(metrics),
                "train_loss_last10": statistics.fmean(r["loss"] for r in last),
                "train_accuracy_last10": statistics.fmean(r["rewards/accuracy"] for r in last),
            }
        )
        scores[f"member-{k}"] = score_model(out, sets)
        print(f"  {members[-1]['name']}: trained {seconds:.0f}s", flush=True)
    names = [f"member-{k}" for k in range(len(members))]
    if len(members) > 1:
        soup = work / f"{prefix}soup"
        t = time.perf_counter()
        argv = [sys.executable, "-m", "alloy", "soup", "--candidates"]
        argv += [str(work / f"{prefix}{n}") for n in names]
        argv += ["--eval", str(data["test_short"]), "--max-items", "50"]
        argv += ["--method", "uniform", str(soup), "--force", "--quiet"]
        subprocess.run(argv, check=True)
        soup_seconds = time.perf_counter() - t
        scores["soup"] = score_model(soup, sets)
    else:
        soup_seconds = 0.0
    # The prediction ensemble: the mean of the members' rewards of each answer.
    scores["ensemble"] = {
        s: {
            side: [
                statistics.fmean(v) for v in zip(*(scores[n][s][side] for n in names), strict=True)
            ]
            for side in ("chosen", "rejected")
        }
        for s in sets
    }
    scores["ensemble"]["seconds"] = sum(scores[n]["seconds"] for n in names)
    rows: dict[str, Any] = {}
    right: dict[str, dict[str, list[float]]] = {}
    for key, value in scores.items():
        right[key] = {s: correct(value[s]["chosen"], value[s]["rejected"]) for s in sets}
        rows[key] = {
            "accuracy": {s: statistics.fmean(right[key][s]) for s in sets},
            "score_seconds": value["seconds"],
        }
        acc = rows[key]["accuracy"]
        print(f"  {key}: short {acc['short']:.3f} long {acc['long']:.3f}", flush=True)
    for k, member in enumerate(members):
        rows[f"member-{k}"]["name"] = member["name"]
    comparisons: dict[str, Any] = {}
    if "soup" in rows:
        rows["soup"]["name"] = f"WARM soup (uniform, {len(members)} members)"
        for s in sets:
            best = max(names, key=lambda n: rows[n]["accuracy"][s])
            comparisons[s] = {
                "best_member": best,
                "soup_vs_best_member": paired(right["soup"][s], right[best][s]),
                "soup_vs_ensemble": paired(right["soup"][s], right["ensemble"][s]),
                "soup_vs_mean_member": {
                    "diff": rows["soup"]["accuracy"][s]
                    - statistics.fmean(rows[n]["accuracy"][s] for n in names)
                },
            }
    rows["ensemble"]["name"] = f"prediction ensemble (mean reward of {len(members)})"
    return {
        "members": members,
        "rows": rows,
        "comparisons": comparisons,
        "soup_seconds": soup_seconds,
    }


LABELS = {"short": "short (in distribution)", "long": "long (shifted)"}


def plot(payload: dict[str, Any], path: Path) -> None:
    """Accuracy of every model in distribution and under shift, with two standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, counts = payload["rows"], payload["counts"]
    keys = list(rows)
    fig, ax = plt.subplots(figsize=(7.2, 3.4))
    width = 0.38
    for j, (s, color) in enumerate((("short", "#4c72b0"), ("long", "#dd8452"))):
        values = [rows[k]["accuracy"][s] for k in keys]
        n = counts["test_short" if s == "short" else "test_long"]
        errors = [2 * (v * (1 - v) / n) ** 0.5 for v in values]
        x = [i + (j - 0.5) * width for i in range(len(keys))]
        ax.bar(x, values, width, yerr=errors, color=color, label=LABELS[s], capsize=2)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_short_name(rows[k]["name"]) for k in keys], fontsize=8)
    low = min(min(r["accuracy"]["short"], r["accuracy"]["long"]) for r in rows.values())
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("preference accuracy")
    if len(payload.get("groups", [])) > 1:
        ax.set_title(f"group 1 of {len(payload['groups'])} (two standard errors)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_name(name: str) -> str:
    if name.startswith("member"):
        return name.split(" (")[0] + "\n" + name.split(", ")[1].rstrip(")")
    return name.split(" (")[0].replace("prediction ", "").replace("WARM ", "WARM\n")


def section(p: dict[str, Any]) -> str:
    s, c, rows = p["settings"], p["counts"], p["rows"]
    lines = [
        "## Preferences: WARM, weight-averaged reward models under label noise and shift",
        "",
        *_header(p, f"{p['threads']} thread (OMP_NUM_THREADS=1);"),
        "WARM ([Ramé et al. 2024](https://arxiv.org/abs/2401.12187)), issue #17 evidence 3. "
        f"Pairs from the fine-food reviews (`runs/lab/corpus/tasks/reviews`, both splits): the "
        f'prompt "{s["prompt"]}", the chosen answer a review labelled great, the rejected one '
        f"labelled other. {len(p['members'])} reward models (`objective: reward`, Bradley-Terry) "
        "train from one shared initialisation, the lab's experiment-size small Llama (d=192, 4 "
        "layers) as a one-score classifier with one seeded score head, on the same "
        f"{c['train']:,} pairs of short reviews (at most {s['short_chars']} characters) with "
        f"{s['flip_share']:.0%} of their labels flipped (seeded, {c['flipped']} pairs, the same "
        f"for every member); they differ in seed (data order) and learning rate, "
        f"{s['steps']} steps of {s['batch']} pairs each. The soup is `alloy soup --method "
        "uniform` over them; the ensemble is the mean of the members' rewards. Scored by "
        f"preference accuracy (a tie counts half) on {c['test_short']} held-out pairs of short "
        f"reviews (in distribution) and on {c['test_long']} pairs of long reviews "
        f"({s['long_chars'][0]}-{s['long_chars'][1]} characters, never trained on: the shift). "
        "The last column is the share of the flipped training pairs the model scores the "
        "corrupted way (memorisation of the noise; lower is better). "
        "![accuracy in distribution and under shift](img/preferences_warm.png)",
        "",
        "| reward model | short (in distribution) | long (shifted) | shifted minus in "
        "distribution | flipped train pairs scored as corrupted | scoring time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        a = row["accuracy"]
        lines.append(
            f"| {row['name']} | {a['short']:.3f} | {a['long']:.3f} | "
            f"{a['long'] - a['short']:+.3f} | {1 - a['flipped']:.3f} | "
            f"{row['score_seconds']:.1f} s |"
        )
    n_s, n_l = c["test_short"], c["test_long"]
    lines += [
        "",
        f"Two standard errors of one accuracy near 0.75 are about "
        f"{2 * (0.1875 / n_s) ** 0.5:.3f} (short) and {2 * (0.1875 / n_l) ** 0.5:.3f} (long); "
        "the comparisons below are paired (the same pairs), so their standard errors are "
        "smaller. Members' training: "
        + "; ".join(
            f"{m['name'].split(' (')[0]} {m['train_seconds'] / 60:.1f} min, last-10-step train "
            f"accuracy (on noisy labels) {m['train_accuracy_last10']:.2f}"
            for m in p["members"]
        )
        + f". The soup took {p['soup_seconds']:.0f} s to make (scoring 50 held-out pairs per "
        "candidate included).",
        "",
    ]
    if "soup" not in rows:
        return "\n".join([*lines, "Only one member was trained: no soup to compare."])
    several = len(p.get("groups", [])) > 1
    lines += _reading(p, several)
    if several:
        lines += ["", *_groups(p)]
    return "\n".join(lines)


def _reading(p: dict[str, Any], several: bool) -> list[str]:
    rows, comp = p["rows"], p["comparisons"]

    def cmp(item: dict[str, float]) -> str:
        d, se = item["diff"], item["se"]
        verdict = "within noise" if abs(d) <= 2 * se else ("higher" if d > 0 else "lower")
        return f"{d:+.3f} ± {2 * se:.3f} (2 SE, paired): {verdict}"

    lines = ["| soup minus | short (in distribution) | long (shifted) |", "|---|---:|---:|"]
    for label, key in (
        ("best member on that set", "soup_vs_best_member"),
        ("prediction ensemble", "soup_vs_ensemble"),
    ):
        lines.append(f"| {label} | {cmp(comp['short'][key])} | {cmp(comp['long'][key])} |")
    lines.append(
        "| mean member | "
        f"{comp['short']['soup_vs_mean_member']['diff']:+.3f} | "
        f"{comp['long']['soup_vs_mean_member']['diff']:+.3f} |"
    )
    best_short, best_long = (
        comp["short"]["soup_vs_best_member"],
        comp["long"]["soup_vs_best_member"],
    )
    as_good = best_short["diff"] >= -2 * best_short["se"]
    strictly = best_short["diff"] >= 0
    robust = best_long["diff"] > 0 and best_long["diff"] > 2 * best_long["se"]
    robust_point = best_long["diff"] >= 0
    drop = {k: r["accuracy"]["long"] - r["accuracy"]["short"] for k, r in rows.items()}
    member_drops = [drop[k] for k in rows if k.startswith("member-")]
    soup_rows, ens = rows["soup"], rows["ensemble"]
    cost = ens["score_seconds"] / max(soup_rows["score_seconds"], 1e-9)
    held = as_good and robust
    lines += [
        "",
        ("Group 1 alone: the claim" if several else "Seen: the claim")
        + ' "the soup is at least as accurate as the best member and more robust '
        "under shift, at one model's cost\" "
        + ("held" if held else "did not hold in full")
        + " here. In distribution the soup scores "
        f"{soup_rows['accuracy']['short']:.3f} against the best member's "
        f"{rows[comp['short']['best_member']]['accuracy']['short']:.3f} "
        + (
            "(at least as accurate)"
            if strictly
            else "(lower, but within two paired standard errors)"
            if as_good
            else "(lower, beyond two paired standard errors)"
        )
        + f"; under the shift {soup_rows['accuracy']['long']:.3f} against the best member's "
        f"{rows[comp['long']['best_member']]['accuracy']['long']:.3f} "
        + (
            "(higher, beyond two paired standard errors)"
            if robust
            else "(not lower, but the gain is within noise)"
            if robust_point
            else "(lower)"
        )
        + f". Its accuracy changes by {drop['soup']:+.3f} from short to long reviews; the "
        f"members' by {min(member_drops):+.3f} to {max(member_drops):+.3f}, the ensemble's by "
        f"{drop['ensemble']:+.3f}. Against the ensemble of the same members the soup is "
        f"{comp['short']['soup_vs_ensemble']['diff']:+.3f} (short) and "
        f"{comp['long']['soup_vs_ensemble']['diff']:+.3f} (long), while scoring with one model: "
        f"the ensemble's scoring took {cost:.1f}x the soup's time "
        f"({ens['score_seconds']:.1f} s against {soup_rows['score_seconds']:.1f} s). "
        "Training costs the same for both (every member is trained)."
        + (
            ""
            if several
            else " One run of each member, one seed of the data and flips, and a small model: "
            "a single draw, not a distribution."
        ),
    ]
    return lines


def memorised(groups: list[dict[str, Any]], keys: list[str] | None) -> float:
    """Mean share of the flipped training pairs scored the corrupted way by `keys` (None:
    every member) over the groups."""
    return statistics.fmean(
        1 - float(g["rows"][k]["accuracy"]["flipped"])
        for g in groups
        for k in (keys or [k for k in g["rows"] if k.startswith("member-")])
    )


def _groups(p: dict[str, Any]) -> list[str]:
    """The comparison repeated over every group of members, and the verdict from all of them."""
    groups = p["groups"]
    n = len(groups)
    size = len(groups[0]["members"])

    def acc(g: dict[str, Any], key: str, s: str) -> float:
        return float(g["rows"][key]["accuracy"][s])

    def best(g: dict[str, Any], s: str) -> float:
        return acc(g, g["comparisons"][s]["best_member"], s)

    lines = [
        f"### Repeated: {n} independent groups of {size} members",
        "",
        f"The same comparison with {n} groups of {size} members each (group g, from 0, trains "
        f"seeds {size}g to {size}g+{size - 1} with the same learning rates, init, pairs and "
        "flips; group 1 is the table above). The best member is the member best on that test "
        "set, picked on the test set itself: an oracle the soup is not given.",
        "",
        "| group | best member short | soup short | ensemble short | best member long | "
        "soup long | ensemble long | soup minus best member (short / long) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d: dict[str, list[float]] = {"short": [], "long": []}
    e: dict[str, list[float]] = {"short": [], "long": []}
    for i, g in enumerate(groups):
        for s in d:
            d[s].append(acc(g, "soup", s) - best(g, s))
            e[s].append(acc(g, "soup", s) - acc(g, "ensemble", s))
        lines.append(
            f"| {i + 1} | {best(g, 'short'):.3f} | {acc(g, 'soup', 'short'):.3f} | "
            f"{acc(g, 'ensemble', 'short'):.3f} | {best(g, 'long'):.3f} | "
            f"{acc(g, 'soup', 'long'):.3f} | {acc(g, 'ensemble', 'long'):.3f} | "
            f"{d['short'][-1]:+.3f} / {d['long'][-1]:+.3f} |"
        )

    def mean(key: str, s: str) -> float:
        return statistics.fmean(best(g, s) if key == "best" else acc(g, key, s) for g in groups)

    lines.append(
        f"| mean | {mean('best', 'short'):.3f} | {mean('soup', 'short'):.3f} | "
        f"{mean('ensemble', 'short'):.3f} | {mean('best', 'long'):.3f} | "
        f"{mean('soup', 'long'):.3f} | {mean('ensemble', 'long'):.3f} | "
        f"{statistics.fmean(d['short']):+.3f} / {statistics.fmean(d['long']):+.3f} |"
    )

    def interval(values: list[float]) -> tuple[float, float]:
        m = statistics.fmean(values)
        return m, 2 * statistics.stdev(values) / len(values) ** 0.5

    ds, dl = interval(d["short"]), interval(d["long"])
    es, el = interval(e["short"]), interval(e["long"])
    as_good = "held" if ds[0] >= 0 else "not shown either way" if ds[0] + ds[1] >= 0 else "failed"
    robust = "held" if dl[0] - dl[1] > 0 else "not shown" if dl[0] > 0 else "failed"
    wins_short = sum(x >= 0 for x in d["short"])
    wins_long = sum(x > 0 for x in d["long"])

    def drop(keys: Any) -> float:
        return statistics.fmean(
            acc(g, k, "long") - acc(g, k, "short") for g in groups for k in keys(g)
        )

    drops = {
        "soup": drop(lambda g: ["soup"]),
        "members": drop(lambda g: [k for k in g["rows"] if k.startswith("member-")]),
        "ensemble": drop(lambda g: ["ensemble"]),
    }
    cost = statistics.fmean(
        g["rows"]["ensemble"]["score_seconds"] / g["rows"]["soup"]["score_seconds"] for g in groups
    )
    mean_member = {
        s: statistics.fmean(g["comparisons"][s]["soup_vs_mean_member"]["diff"] for g in groups)
        for s in ("short", "long")
    }
    # Memorisation of the flipped labels: 1 - accuracy (true labels) on the flipped train pairs.
    memo = {
        "soup": memorised(groups, ["soup"]),
        "members": memorised(groups, None),
        "ensemble": memorised(groups, ["ensemble"]),
    }
    lower = sum(
        1 - acc(g, "soup", "flipped")
        < statistics.fmean(1 - acc(g, k, "flipped") for k in g["rows"] if k.startswith("member-"))
        for g in groups
    )
    held = as_good == "held" and robust == "held"
    lines += [
        "",
        f"Seen, over the {n} groups (means ± two standard errors across groups): the claim "
        '"the soup is at least as accurate as the best member and more robust under shift, at '
        f"one model's cost\" {'held' if held else 'did not hold'}. At least as accurate as the "
        f"best member in distribution: {as_good} (soup minus best member {ds[0]:+.3f} ± "
        f"{ds[1]:.3f}; the soup was not below it in {wins_short} of {n} groups). More robust "
        f"under shift, i.e. above the best member on the long reviews: {robust} "
        f"({dl[0]:+.3f} ± {dl[1]:.3f}; above it in {wins_long} of {n} groups). From short to "
        f"long reviews the soup's accuracy moves by {drops['soup']:+.3f} on average, a member's "
        f"by {drops['members']:+.3f}, the ensemble's by {drops['ensemble']:+.3f}. Against the "
        f"prediction ensemble of the same members the soup is {es[0]:+.3f} ± {es[1]:.3f} "
        f"(short) and {el[0]:+.3f} ± {el[1]:.3f} (long), at one model's scoring cost (the "
        f"ensemble's scoring took {cost:.1f}x the soup's time). Against the average member the "
        f"soup is {mean_member['short']:+.3f} (short) and {mean_member['long']:+.3f} (long) on "
        f"average. The soup scores {memo['soup']:.3f} of the flipped training pairs the "
        f"corrupted way, a member {memo['members']:.3f} and the ensemble "
        f"{memo['ensemble']:.3f} on average (the soup below its average member in {lower} of "
        f"{n} groups{': it memorised less of the noise' if lower == n else ''}). One small "
        "model, one set of pairs and flips.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--members", type=int, default=len(MEMBERS), choices=range(1, 5))
    parser.add_argument("--repeats", type=int, default=REPEATS, help="groups of members")
    parser.add_argument("--pilot", action="store_true", help="own folder; print, write nothing")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--render", action="store_true", help="rewrite the section from JSON")
    args = parser.parse_args()
    quiet()
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: one core for this experiment
    saved = args.json / "preferences_warm.json"
    if args.render:
        payload = json.loads(saved.read_text())
    else:
        t = time.perf_counter()
        payload = run(args)
        payload["minutes"] = (time.perf_counter() - t) / 60
        payload["machine"] = machine()
        payload["threads"] = torch.get_num_threads()
        payload["command"] = (
            "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/preferences_warm.py"
            + (f" --scale {args.scale:g}" if args.scale != 1 else "")
            + (f" --members {args.members}" if args.members != len(MEMBERS) else "")
            + (f" --repeats {args.repeats}" if args.repeats != REPEATS else "")
        )
        if args.pilot:
            for g in payload["groups"]:
                print(json.dumps({k: v["accuracy"] for k, v in g["rows"].items()}, indent=2))
            return
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, args.img / "preferences_warm.png")
    replace_section(args.docs, "preferences-warm", section(payload))
    print("warm: written", flush=True)


if __name__ == "__main__":
    main()
