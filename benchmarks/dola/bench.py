"""DoLa's cost: greedy decoding with `rule: dola` against plain greedy decoding of the same model.

Both run through `alloy.Ensemble.generate` on the same rows (8 prompts, one batch, EOS ignored so
every contender makes the same number of tokens), prefill included, as tokens per second. A DoLa
step is the model's forward with `output_hidden_states`, one final norm and LM-head product per
candidate layer, the per-row Jensen-Shannon divergences over the vocabulary and the contrast; the
benchmark gives `low` and `high` (the paper's two buckets: 7-8 candidates on SmolLM2's 30
layers) and one explicit layer, against the plain loop.

    python benchmarks/dola/bench.py                # writes docs/benchmarks.md's section
    python benchmarks/dola/bench.py --no-write --runs 1

Each number is the median over `--runs` runs, contenders interleaved. Models: the lab's
experiment-preset small base and SmolLM2-135M where they exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

from common import machine, quiet, replace_section  # noqa: E402

MODELS = {
    "lab small (experiment)": ROOT / "runs" / "lab" / "family" / "experiment" / "small" / "base",
    "SmolLM2-135M": ROOT / "runs" / "lab" / "models" / "smollm2-135m",
}
PROMPTS = [
    "The history of the city begins",
    "In this chapter we describe",
    "Question: What is the capital of France? Answer:",
    "The function returns",
    "She opened the door and",
    "Photosynthesis is the process",
    "The results of the experiment show",
    "Once upon a time",
]
CONTENDERS: dict[str, str | list[int] | None] = {
    "plain": None,
    "dola low": "low",
    "dola high": "high",
    "dola [2]": [2],
}


def decoder(path: Path, layers: str | list[int] | None) -> Any:
    from alloy import Ensemble

    if layers is None:
        return Ensemble.from_models([path], rule="linear")
    recipe = {"rule": "dola", "members": [{"model": str(path)}], "layers": layers}
    return Ensemble.from_recipe(recipe)


def tokens_per_second(ensemble: Any, new: int) -> float:
    start = time.perf_counter()
    out = ensemble.generate(PROMPTS, batch_size=len(PROMPTS), max_new_tokens=new, ignore_eos=True)
    seconds = time.perf_counter() - start
    return sum(len(g.token_ids) for g in out) / seconds


def bench(name: str, path: Path, new: int, runs: int) -> dict[str, Any]:
    decoders = {label: decoder(path, layers) for label, layers in CONTENDERS.items()}
    for ensemble in decoders.values():
        tokens_per_second(ensemble, 2)  # warm-up
    results: dict[str, list[float]] = {label: [] for label in decoders}
    for _ in range(runs):
        for label, ensemble in decoders.items():
            results[label].append(tokens_per_second(ensemble, new))
    median = {label: statistics.median(values) for label, values in results.items()}
    candidates = {label: len(e.layers) for label, e in decoders.items() if e.layers}
    row = {"model": name, "new_tokens": new, "tok_s": median, "candidates": candidates}
    print(json.dumps(row), flush=True)
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    labels = list(CONTENDERS)
    lines = [
        "## DoLa: decoding cost against plain greedy decoding",
        "",
        f"`{meta['command']}`; {meta['machine']}; {meta['threads']} threads; median of "
        f"{meta['runs']} runs, contenders interleaved. 8 prompts in one batch, greedy, EOS "
        "ignored, prefill included; tokens per second (higher is better) and, in brackets, the "
        "number of candidate layers. The ratio is DoLa's throughput over plain decoding's.",
        "",
        "| model | new tokens | " + " | ".join(f"{label} tok/s" for label in labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for r in rows:
        plain = r["tok_s"]["plain"]
        cells = []
        for label in labels:
            value = r["tok_s"][label]
            if label == "plain":
                cells.append(f"{value:.0f}")
            else:
                n = r["candidates"][label]
                cells.append(f"{value:.0f} ({n}; {value / plain:.2f}x)")
        lines.append(f"| {r['model']} | {r['new_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--from-json", action="store_true", help="rewrite docs from results.json")
    args = parser.parse_args(argv)
    out = ROOT / "benchmarks" / "dola" / "results.json"
    if args.from_json:
        saved = json.loads(out.read_text())
        replace_section(ROOT / "docs" / "benchmarks.md", "dola", markdown(**saved))
        return 0
    quiet()
    present = {n: p for n, p in MODELS.items() if (p / "config.json").is_file()}
    if not present:
        print("no models: run `alloy lab build --preset experiment` first", file=sys.stderr)
        return 2
    rows = [bench(n, p, args.new_tokens, args.runs) for n, p in present.items()]
    meta = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "command": "python benchmarks/dola/bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if not args.no_write:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        replace_section(ROOT / "docs" / "benchmarks.md", "dola", markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
