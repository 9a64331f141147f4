"""In-context pre-training order (`order: related`) against random order, to docs/results.md.

    python experiments/train_order.py                    # train, score, write the section
    python experiments/train_order.py --render           # rewrite it from the saved JSON

The lab's small base (runs/lab/family/experiment/small/base, pre-trained on the four domains) is
continued on the same four domains' train splits at equal tokens, steps and seed, with its
documents in `order: random` (shuffled) or `order: related` (Shi et al. 2024: TF-IDF k-NN walk),
each for every seed given, and once in file order (the corpus's own order: consecutive chunks of
one book). Reported: the mean TF-IDF cosine similarity of consecutive training documents in each
order (and how often they are chunks of the same book), perplexity on the held-out test
documents with windows of the sequence length, perplexity of held-out streams (the test
documents laid end to end in related or in random order, cut into windows of the sequence
length: how much a model gains from a related document before), and quiz accuracy
(runs/lab/corpus/tasks/quiz/mc.jsonl). Runs are kept under --root/experiments/train-order/ and
reused when their recipe is unchanged; the JSON is saved after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section, train_once

DOMAINS = ["drama", "scripture", "fiction", "technical"]
SECTION = "train-order"
LENGTH = 256  # the base's context length, the training sequence length and the eval window
NEIGHBOURS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-file", action="store_true", help="skip the file-order run")
    parser.add_argument("--max-tokens", type=int, default=16384, help="eval tokens per set")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--render", action="store_true", help="rewrite the section from JSON")
    args = parser.parse_args()
    quiet()
    path = args.json / "train_order.json"
    if args.render:
        payload = json.loads(path.read_text())
        replace_section(args.docs, SECTION, section(payload, args.docs.parent / "img"))
        return
    started = time.perf_counter()
    work = args.root / "experiments" / "train-order"
    base = args.root / "family" / "experiment" / "small" / "base"
    command = "python experiments/train_order.py"
    if args.steps != 500:
        command += f" --steps {args.steps}"
    if args.seeds != [0, 1]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.no_file:
        command += " --no-file"
    if args.max_tokens != 16384:
        command += f" --max-tokens {args.max_tokens}"
    payload: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "steps": args.steps,
        "tokens": args.steps * 8 * LENGTH,
        "max_tokens": args.max_tokens,
        "neighbours": NEIGHBOURS,
        "orders": order_statistics(args.root, seed=0),
        "runs": {},
    }
    print(json.dumps(payload["orders"], indent=1))
    sets = eval_sets(args.root, work / "eval")
    payload["runs"]["base"] = {"order": None, "seed": None, **score(base, sets, args)}
    cells = [(order, seed) for seed in args.seeds for order in ("random", "related")]
    cells += [] if args.no_file else [("file", args.seeds[0])]
    warmup = max(1, args.steps // 20)
    for order, seed in cells:
        recipe = {
            "name": f"order {order} seed {seed}",
            "objective": "causal_lm",
            "model": str(base),
            "lab": str(args.root),
            "data": [{"corpus": d} for d in DOMAINS],
            "order": {"kind": order, "encoder": "tfidf", "neighbours": NEIGHBOURS}
            if order == "related"
            else order,
            "schedule": {"name": "cosine", "lr": 1e-3, "min_lr": 1e-4, "warmup": warmup},
            "optimizer": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
            "max_steps": args.steps,
            "batch_size": 8,
            "sequence_length": LENGTH,
            "seed": seed,
            "device": "cpu",
            "log_every": 50,
        }
        out = train_once(recipe, work / f"{order}-seed{seed}")
        summary = json.loads((out / "training" / "summary.json").read_text())
        payload["runs"][f"{order}-seed{seed}"] = {
            "order": order,
            "seed": seed,
            "final_loss": summary["final_loss"],
            "train_tokens": summary["tokens"],
            **score(out, sets, args),
        }
        payload["minutes"] = (time.perf_counter() - started) / 60
        args.json.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    replace_section(args.docs, SECTION, section(payload, args.docs.parent / "img"))
    print(f"done in {payload['minutes']:.1f} min")


# ---- data -------------------------------------------------------------------------------------


def _records(root: Path, domain: str, split: str) -> list[dict[str, Any]]:
    path = root / "corpus" / domain / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def order_statistics(root: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Per domain and order: the mean TF-IDF similarity of consecutive training documents and
    the share of consecutive pairs that are chunks of the same book (the plan's orders: the
    same functions on the same texts)."""
    import numpy as np

    from alloy.train.order import neighbour_similarity, random_order, related_order, tfidf

    out = {}
    for j, domain in enumerate(DOMAINS):
        records = _records(root, domain, "train")
        vectors = tfidf([r["text"] for r in records])
        books = np.array([r.get("doc", "") for r in records])
        related, walks = related_order(vectors, NEIGHBOURS)
        orders = {"file": np.arange(len(records)), "random": random_order(len(records), seed, j)}
        orders["related"] = related
        out[domain] = {
            "documents": len(records),
            "walks": walks,
            **{
                name: {
                    "similarity": neighbour_similarity(vectors, order),
                    "same_book": float((books[order[:-1]] == books[order[1:]]).mean()),
                }
                for name, order in orders.items()
            },
        }
    return out


def eval_sets(root: Path, folder: Path) -> list[Any]:
    """The test documents of every domain, the held-out streams, and the quiz."""
    from alloy.eval import load_eval_sets
    from alloy.train.order import random_order, related_order, tfidf

    folder.mkdir(parents=True, exist_ok=True)
    paths = [root / "corpus" / d / "test.jsonl" for d in DOMAINS]
    for j, domain in enumerate(DOMAINS):
        texts = [r["text"] for r in _records(root, domain, "test")]
        related, _ = related_order(tfidf(texts), NEIGHBOURS)
        for name, order in (("related", related), ("random", random_order(len(texts), 0, j))):
            path = folder / f"{domain}-{name}.jsonl"
            path.write_text(json.dumps({"text": "\n\n".join(texts[i] for i in order)}) + "\n")
            paths.append(path)
    return load_eval_sets([*paths, root / "corpus" / "tasks" / "quiz" / "mc.jsonl"])


def score(model: Path, sets: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from alloy.eval import EvalSettings, evaluate, load_scorer

    settings = EvalSettings(window=LENGTH, stride=LENGTH, batch_size=16, max_tokens=args.max_tokens)
    results = evaluate(load_scorer(model, name=model.name), sets, settings)
    out: dict[str, Any] = {"test": {}, "stream": {}}
    for key, value in results.items():
        folder, _, stem = key.rpartition("/")
        if stem == "test":
            out["test"][folder] = value["perplexity"]
        elif stem.endswith(("-related", "-random")):
            out["stream"][stem] = value["perplexity"]
        elif stem == "mc":
            out["quiz"] = value["accuracy"]
            out["quiz_chance"] = value["chance"]
    nll = sum(results[f"{d}/test"]["nll"] for d in DOMAINS)
    tokens = sum(results[f"{d}/test"]["tokens"] for d in DOMAINS)
    out["test"]["pooled"] = math.exp(nll / tokens)
    print(f"  scored {model.name}: test {out['test']['pooled']:.2f}, quiz {out['quiz']:.3f}")
    return out


# ---- the section ------------------------------------------------------------------------------


def section(payload: dict[str, Any], img: Path) -> str:
    runs, orders = payload["runs"], payload["orders"]
    lines = [
        "## In-context pre-training order: related vs random documents",
        "",
        f"The lab's small base (d=192, 4 layers, context {LENGTH}) continued on the four "
        f"domains' train splits for {payload['steps']} steps ({payload['tokens']:,} tokens, "
        "8 rows of 256 per step, re-warm to 1e-3, cosine to 1e-4), the same tokens, steps and "
        "seed for every order; the documents (chunks of about 2,000 characters, about 500 "
        f"tokens) in random order, in `order: related` (TF-IDF, {payload['neighbours']} "
        "neighbours; Shi et al. 2024) and in the corpus's file order (consecutive chunks of one "
        "book). Blocks are shuffled in every case. Perplexity with windows of the context length "
        f"(stride {LENGTH}), first {payload['max_tokens']:,} tokens per set.",
        "",
        f"{payload['machine']}; {payload.get('minutes', 0):.0f} min. Regenerate with:",
        "",
        "```sh",
        payload["command"],
        "```",
        "",
        "Consecutive training documents in each order: mean TF-IDF cosine similarity "
        "(share of pairs that are chunks of the same book).",
        "",
        "| domain | documents | walks | file | random | related |",
        "|---|---|---|---|---|---|",
    ]
    for domain, s in orders.items():
        cells = [
            f"{s[o]['similarity']:.3f} ({s[o]['same_book']:.0%})"
            for o in ("file", "random", "related")
        ]
        lines.append(
            f"| {domain} | {s['documents']:,} | {s['walks']:,} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| model | test, pooled | " + " | ".join(DOMAINS) + " | stream related | stream random "
        "| related gain | quiz |",
        "|---|" + "---|" * (len(DOMAINS) + 5),
    ]
    for name, run in runs.items():
        related = _pooled_stream(run, "related")
        shuffled = _pooled_stream(run, "random")
        lines.append(
            f"| {name} | {run['test']['pooled']:.2f} | "
            + " | ".join(f"{run['test'][d]:.2f}" for d in DOMAINS)
            + f" | {related:.2f} | {shuffled:.2f} | {1 - related / shuffled:.2%} | "
            f"{run['quiz']:.3f} |"
        )
    lines += ["", *findings(payload)]
    figure = plot(payload, img)
    if figure:
        lines += ["", f"![related vs random order]({figure})"]
    return "\n".join(lines)


def _pooled_stream(run: dict[str, Any], order: str) -> float:
    """Geometric mean over domains of a run's stream perplexity in one order."""
    values = [run["stream"][f"{d}-{order}"] for d in DOMAINS]
    return math.exp(sum(math.log(v) for v in values) / len(values))


def findings(payload: dict[str, Any]) -> list[str]:
    runs, orders = payload["runs"], payload["orders"]
    seeds = sorted({r["seed"] for r in runs.values() if r["order"] == "related"})
    pairs = [
        (runs[f"related-seed{s}"], runs[f"random-seed{s}"])
        for s in seeds
        if f"random-seed{s}" in runs
    ]
    if not pairs:
        return ["No related/random pair finished."]
    test = [a["test"]["pooled"] - b["test"]["pooled"] for a, b in pairs]
    gain = [
        (1 - _pooled_stream(a, "related") / _pooled_stream(a, "random"))
        - (1 - _pooled_stream(b, "related") / _pooled_stream(b, "random"))
        for a, b in pairs
    ]
    quiz = [a["quiz"] - b["quiz"] for a, b in pairs]
    random_runs = [r["test"]["pooled"] for r in runs.values() if r["order"] == "random"]
    seed_gap = max(random_runs) - min(random_runs) if len(random_runs) > 1 else None
    sim = {
        o: sum(s[o]["similarity"] for s in orders.values()) / len(orders)
        for o in ("file", "random", "related")
    }
    text = [
        f"Seen: the related order's consecutive documents are more similar than random ones in "
        f"every domain (mean over domains {sim['related']:.3f} vs {sim['random']:.3f}; file "
        f"order {sim['file']:.3f}). Related minus random, per seed ({', '.join(map(str, seeds))}): "
        f"pooled test perplexity {', '.join(f'{d:+.2f}' for d in test)}; gain from a related "
        f"stream {', '.join(f'{d:+.2%}' for d in gain)}; quiz accuracy "
        f"{', '.join(f'{d:+.3f}' for d in quiz)} (chance {pairs[0][0]['quiz_chance']:.2f}).",
    ]
    if seed_gap is not None:
        text.append(
            f"The random-order seeds differ by {seed_gap:.2f} in pooled test perplexity, "
            "the scale of noise to read the differences against."
        )
    return [" ".join(text)]


def plot(payload: dict[str, Any], img: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs, orders = payload["runs"], payload["orders"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.25
    for k, order in enumerate(("file", "random", "related")):
        left.bar(
            [i + (k - 1) * width for i in range(len(DOMAINS))],
            [orders[d][order]["similarity"] for d in DOMAINS],
            width,
            label=order,
        )
    left.set_xticks(range(len(DOMAINS)), DOMAINS)
    left.set_ylabel("similarity of consecutive documents")
    left.legend(fontsize=8)
    names = [n for n in runs if n != "base"]
    for k, name in enumerate(names):
        run = runs[name]
        left_of = (k - (len(names) - 1) / 2) * 0.8 / len(names)
        right.bar(
            [i + left_of for i in range(len(DOMAINS))],
            [run["test"][d] / runs["base"]["test"][d] for d in DOMAINS],
            0.8 / len(names),
            label=name,
        )
    right.set_xticks(range(len(DOMAINS)), DOMAINS)
    right.set_ylabel("test perplexity / base's")
    ratios = [runs[n]["test"][d] / runs["base"]["test"][d] for n in names for d in DOMAINS]
    right.set_ylim(min(ratios) - 0.03, max(ratios) + 0.03)
    right.legend(fontsize=7)
    fig.tight_layout()
    img.mkdir(parents=True, exist_ok=True)
    fig.savefig(img / "train_order.png", dpi=120)
    plt.close(fig)
    return "img/train_order.png"


if __name__ == "__main__":
    main()
