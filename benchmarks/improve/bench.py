"""Sampling throughput of `alloy improve` against the decoder's floor and transformers' generate.

A loop's Grow step samples k answers for each prompt through a one-member `alloy.Ensemble`
(the prompts repeated k times, batched). This times, on the same rows (B = prompts x k), with EOS
ignored so every contender makes the same number of tokens:

- loop: the loop's sampling call (`alloy.improve.loop.sample_answers`'s `Ensemble.generate`,
  temperature 1, top-p 0.95), whole (prefill included), as tokens per second;
- floor: the decoder benchmark's bare cached loop of the same model (benchmarks/ensemble:
  transformers forward with a DynamicCache, argmax), per-token step time turned into tokens/s
  at the same batch, prefill excluded (so it is an upper bound on the throughput);
- generate: transformers' `generate(do_sample=True, top_p=0.95)` on the same rows, whole.

    python benchmarks/improve/bench.py                # writes docs/benchmarks.md's section
    python benchmarks/improve/bench.py --no-write --runs 1

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
sys.path.insert(0, str(ROOT / "benchmarks" / "ensemble"))

from bench import left_pad, member_loop  # noqa: E402
from common import machine, quiet, replace_section  # noqa: E402

MODELS = {
    "lab small (experiment)": ROOT / "runs" / "lab" / "family" / "experiment" / "small" / "base",
    "SmolLM2-135M": ROOT / "runs" / "lab" / "models" / "smollm2-135m",
}
PROMPTS = [
    "Review: I bought these",
    "Review: The flavor is",
    "Review: My dog loves",
    "Review: Not what I",
    "Review: These cookies are",
    "Review: I have been",
    "Review: Great price for",
    "Review: The package arrived",
]


def loop_sampling(sampler: Any, rows: list[str], new: int) -> float:
    """Tokens per second of the loop's sampling call over `rows`, whole."""
    start = time.perf_counter()
    out = sampler.generate(
        rows,
        batch_size=len(rows),
        max_new_tokens=new,
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        ignore_eos=True,
        seed=0,
    )
    seconds = time.perf_counter() - start
    return sum(len(g.token_ids) for g in out) / seconds


@torch.inference_mode()
def hf_generate(member: Any, rows: list[str], new: int) -> float:
    ids, mask = left_pad([member.encode_prompt(p) for p in rows])
    torch.manual_seed(0)
    start = time.perf_counter()
    member.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        pad_token_id=0,
    )
    return len(rows) * new / (time.perf_counter() - start)


def bench(name: str, path: Path, k: int, new: int, runs: int) -> dict[str, Any]:
    from alloy.improve.judge import load_policy

    sampler = load_policy(str(path), None, "cpu")
    member = sampler.members[0]
    rows = [p for p in PROMPTS for _ in range(k)]
    loop_sampling(sampler, rows[:2], 4)  # warm-up
    results: dict[str, list[float]] = {"loop": [], "floor": [], "generate": []}
    for _ in range(runs):
        results["loop"].append(loop_sampling(sampler, rows, new))
        results["floor"].append(len(rows) / member_loop(member, rows, new))
        results["generate"].append(hf_generate(member, rows, new))
    median = {key: statistics.median(values) for key, values in results.items()}
    row = {"model": name, "rows": len(rows), "new_tokens": new, **median}
    print(json.dumps(row), flush=True)
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Self-improvement loops: sampling throughput",
        "",
        f"`{meta['command']}`; {meta['machine']}; {meta['threads']} threads; median of "
        f"{meta['runs']} runs, contenders interleaved. Rows: 8 prompts x k = 4 samples, "
        "temperature 1, top-p 0.95, EOS ignored. Tokens per second (higher is better); the "
        "floor is the decoder benchmark's bare cached greedy loop, prefill excluded, so it "
        "bounds the throughput from above.",
        "",
        "| model | rows | new tokens | loop tok/s | floor tok/s | loop / floor | generate tok/s "
        "| loop / generate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['rows']} | {r['new_tokens']} | {r['loop']:.0f} | "
            f"{r['floor']:.0f} | {r['loop'] / r['floor']:.2f} | {r['generate']:.0f} | "
            f"{r['loop'] / r['generate']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--from-json", action="store_true", help="rewrite docs from results.json")
    args = parser.parse_args(argv)
    out = ROOT / "benchmarks" / "improve" / "results.json"
    if args.from_json:
        saved = json.loads(out.read_text())
        replace_section(ROOT / "docs" / "benchmarks.md", "improve", markdown(**saved))
        return 0
    quiet()
    present = {n: p for n, p in MODELS.items() if (p / "config.json").is_file()}
    if not present:
        print("no models: run `alloy lab build --preset experiment` first", file=sys.stderr)
        return 2
    rows = [bench(n, p, args.k, args.new_tokens, args.runs) for n, p in present.items()]
    meta = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "command": "python benchmarks/improve/bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if not args.no_write:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        replace_section(ROOT / "docs" / "benchmarks.md", "improve", markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
