"""Per-token decode time of a K-member ensemble against its floor and against a cacheless loop.

For each configuration (a set of K member folders, a batch size) three things are timed on the
same prompts, greedy, EOS ignored, decode phase only (the prefill is excluded):

- floor: the sum over members of that member's own cached greedy loop (transformers forward with a
  DynamicCache, last-position logits, argmax), which is what running the members one after the
  other would cost at best; and, for reference, transformers' `generate` of each member;
- alloy: `Ensemble.generate` with the configuration's rule;
- no cache: a per-step loop that runs every member over the whole prefix at each step (what
  released research code without a KV cache does), over fewer tokens since it is quadratic.

Target (issue #6): alloy within 1.15x of the floor at batch 1 and 8. A run's time per token is
the median step of its decode (transformers' generate, timed as a whole, is the exception), and
the table shows the median over `--runs` runs, contenders interleaved. Machine and versions are
recorded.

    python benchmarks/ensemble/bench.py                  # writes docs/benchmarks.md's section
    python benchmarks/ensemble/bench.py --no-write --runs 3 --configs lab
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

from common import machine, quiet, replace_section  # noqa: E402

from alloy import Ensemble  # noqa: E402

LAB = ROOT / "runs" / "lab"
FAMILY = LAB / "family" / "experiment"
SMOLLM = LAB / "models" / "smollm2-135m"
PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be"
)
CONFIGS: dict[str, dict[str, Any]] = {
    # proxy-tuning on the lab family: large base + small expert - small base (3 members)
    "lab": {
        "rule": "proxy_tuning",
        "members": [
            (FAMILY / "large" / "base", "base"),
            (FAMILY / "small" / "experts" / "fiction", "expert"),
            (FAMILY / "small" / "base", "anti_expert"),
        ],
    },
    # a 3-member log-linear ensemble of SmolLM2-135M (one model, three caches)
    "smollm2": {
        "rule": "log_linear",
        "members": [(SMOLLM, None), (SMOLLM, None), (SMOLLM, None)],
    },
}


def ensemble_for(config: dict[str, Any]) -> Ensemble:
    members = []
    for path, role in config["members"]:
        members.append({"model": str(path), **({"role": role} if role else {})})
    return Ensemble.from_recipe({"rule": config["rule"], "members": members})


def prompts(batch: int) -> list[str]:
    """`batch` prompts of slightly different lengths (so left padding is exercised)."""
    words = PROMPT.split()
    return [" ".join(words[: len(words) - i]) for i in range(batch)]


def step_time(stamps: list[float]) -> float:
    """Seconds per decoding step: the median of the intervals between step timestamps, robust to
    the odd step a busy shared machine slows down (the mean over all steps is not)."""
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids left-padded with 0 and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# The floor is written with transformers calls only, independently of alloy's members, so that
# it measures what a bare loop costs rather than alloy's own code.
def bare_prefill(member: Any, rows: list[str]) -> tuple[torch.Tensor, list[Any]]:
    """Prefill one member's bare loop: (its argmax token (B,), state [cache, mask, position])."""
    from transformers import DynamicCache

    ids, mask = left_pad([member.encode_prompt(p) for p in rows])
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=member.model.config)
    out = member.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].argmax(-1), [cache, mask, position[:, -1:] + 1]


def bare_step(member: Any, state: list[Any], token: torch.Tensor) -> torch.Tensor:
    """Feed one token per row to a bare loop; return its argmax (B,). Updates `state`."""
    cache, mask, position = state
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    out = member.model(
        input_ids=token[:, None],
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    state[1], state[2] = mask, position + 1
    return out.logits[:, -1].argmax(-1)


@torch.inference_mode()
def member_loop(member: Any, rows: list[str], new: int) -> float:
    """Seconds per decoded token of one member's own cached greedy loop (prefill excluded)."""
    token, state = bare_prefill(member, rows)
    stamps = [time.perf_counter()]
    for _ in range(new - 1):
        token = bare_step(member, state, token)
        token.tolist()
        stamps.append(time.perf_counter())
    return step_time(stamps)


@torch.inference_mode()
def member_generate(member: Any, rows: list[str], new: int) -> float:
    """Seconds per decoded token of transformers' generate for one member (prefill excluded by
    timing 1 and `new` tokens)."""
    ids, mask = left_pad([member.encode_prompt(p) for p in rows])
    times = []
    for n in (1, new):
        start = time.perf_counter()
        member.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (new - 1)


@torch.inference_mode()
def interleaved_loop(ensemble: Ensemble, rows: list[str], new: int) -> float:
    """The members' bare cached loops run step by step in turn, as an ensemble must (each step
    needs every member before the next token), with no combination: the member-0 argmax is fed
    to all. The difference from `floor` is the cost of switching models every step (their
    weights no longer stay in the CPU caches between steps)."""
    prefilled = [bare_prefill(member, rows) for member in ensemble.members]
    token, states = prefilled[0][0], [state for _, state in prefilled]
    stamps = [time.perf_counter()]
    for _ in range(new - 1):
        picked = [bare_step(m, s, token) for m, s in zip(ensemble.members, states, strict=True)]
        token = picked[0]
        token.tolist()
        stamps.append(time.perf_counter())
    return step_time(stamps)


def alloy_decode(ensemble: Ensemble, rows: list[str], new: int) -> float:
    stamps: list[float] = []
    ensemble.generate(
        rows,
        batch_size=len(rows),
        max_new_tokens=new,
        ignore_eos=True,
        on_token=lambda n: stamps.append(time.perf_counter()),
    )
    return step_time(stamps)


@torch.inference_mode()
def no_cache_decode(ensemble: Ensemble, rows: list[str], new: int) -> float:
    """Every step recomputes every member over its whole prefix (left-padded, no cache)."""
    prefixes = [[m.encode_prompt(p) for p in rows] for m in ensemble.members]
    tokens: list[list[int]] = [[] for _ in rows]
    start = time.perf_counter()
    for step in range(new):
        if step == 1:
            start = time.perf_counter()  # like the others: time from the first decoded token
        scores = []
        for member, encoded in zip(ensemble.members, prefixes, strict=True):
            ids, mask = left_pad([e + t for e, t in zip(encoded, tokens, strict=True)])
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            out = member.model(input_ids=ids, attention_mask=mask, position_ids=position)
            logits = out.logits[:, -1, : member.vocab]
            scores.append(torch.log_softmax(logits.float(), -1))
        picked = ensemble.combine(scores).argmax(-1).tolist()
        for row, token in zip(tokens, picked, strict=True):
            row.append(token)
    return (time.perf_counter() - start) / (new - 1)


def median_of(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def bench(name: str, batch: int, new: int, new_no_cache: int, runs: int) -> dict[str, Any]:
    ensemble = ensemble_for(CONFIGS[name])
    rows = prompts(batch)
    alloy_decode(ensemble, rows, 4)  # warm-up
    timings: dict[str, list[float]] = {
        "alloy": [],
        "floor": [],
        "interleaved": [],
        "generate": [],
        "no cache": [],
    }
    for _ in range(runs):  # interleaved, so background load hits every contender alike
        timings["alloy"].append(alloy_decode(ensemble, rows, new))
        timings["floor"].append(sum(member_loop(m, rows, new) for m in ensemble.members))
        timings["interleaved"].append(interleaved_loop(ensemble, rows, new))
        timings["generate"].append(sum(member_generate(m, rows, new) for m in ensemble.members))
    timings["no cache"] = [
        no_cache_decode(ensemble, rows, new_no_cache) for _ in range(max(1, runs // 2))
    ]
    ms = {k: 1000 * statistics.median(v) for k, v in timings.items()}
    params = sum(
        p.numel()
        for m in {id(m.model): m.model for m in ensemble.members}.values()
        for p in m.parameters()
    )
    row = {
        "config": name,
        "rule": CONFIGS[name]["rule"],
        "members": [str(Path(p).relative_to(LAB)) for p, _ in CONFIGS[name]["members"]],
        "batch": batch,
        "new_tokens": new,
        "new_tokens_no_cache": new_no_cache,
        "ms_per_token": ms,
        "ratio_to_floor": ms["alloy"] / ms["floor"],
        "ratio_to_interleaved": ms["alloy"] / ms["interleaved"],
        "distinct_params": params,
    }
    print(
        f"{name} batch {batch}: alloy {ms['alloy']:.2f} ms/token, floor {ms['floor']:.2f}, "
        f"interleaved {ms['interleaved']:.2f}, generate {ms['generate']:.2f}, "
        f"no cache {ms['no cache']:.2f} "
        f"-> {row['ratio_to_floor']:.3f}x floor",
        flush=True,
    )
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Ensemble: decode time per token",
        "",
        "`benchmarks/ensemble/bench.py` (issue #6 target: alloy within 1.15x of the floor at "
        "batch 1 and 8); design in docs/ensemble.md.",
        "",
        f"Machine: {meta['machine']}; {meta['threads']} torch threads; median step of each "
        f"decode, median of {meta['runs']} runs, contenders interleaved; greedy, EOS ignored, "
        "decode phase only. Regenerate with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| members (rule) | batch | alloy ms/token | floor ms/token | alloy / floor "
        "| interleaved floor ms/token | alloy / interleaved | members' `generate` ms/token "
        "| alloy / `generate` | no-cache loop ms/token | no cache / alloy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms_per_token"]
        members = " + ".join(r["members"])
        lines.append(
            f"| {members} ({r['rule']}) | {r['batch']} | {ms['alloy']:.2f} | {ms['floor']:.2f} "
            f"| {r['ratio_to_floor']:.3f}x | {ms['interleaved']:.2f} "
            f"| {r['ratio_to_interleaved']:.3f}x | {ms['generate']:.2f} "
            f"| {ms['alloy'] / ms['generate']:.3f}x | {ms['no cache']:.2f} "
            f"| {ms['no cache'] / ms['alloy']:.1f}x |"
        )
    lines += [
        "",
        "Floor: the sum of each member's own cached greedy loop (transformers forward with a "
        "DynamicCache and last-position logits, nothing else), i.e. running the members one after "
        "the other at best. Interleaved floor: the same bare loops advanced one step at a time "
        "in turn, as an ensemble has to (every member's output is needed before the next "
        "token), with no combination; the gap between the two floors is the cost of switching "
        "models every step, whose weights then no longer stay in the CPU caches. `generate`: "
        "the same members through transformers' generate, summed, for reference. No cache: "
        "every step re-runs every member over the whole prefix, over "
        f"{rows[0]['new_tokens_no_cache']} new tokens (its cost grows with length, so its "
        f"per-token time depends on that; the others decode {rows[0]['new_tokens']}). No GPU "
        "was available to this run.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--new-tokens-no-cache", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--from-json", action="store_true", help="rewrite the docs section from results.json"
    )
    args = parser.parse_args(argv)
    out = ROOT / "benchmarks" / "ensemble" / "results.json"
    if args.from_json:
        saved = json.loads(out.read_text())
        replace_section(ROOT / "docs" / "benchmarks.md", "ensemble", markdown(**saved))
        return 0
    quiet()
    missing = [
        str(p) for c in args.configs for p, _ in CONFIGS[c]["members"] if not Path(p).is_dir()
    ]
    if missing:
        print(
            "missing models (build them with `alloy lab build --preset experiment` and "
            f"`alloy lab import-gguf`): {sorted(set(missing))}",
            file=sys.stderr,
        )
        return 2
    rows = [
        bench(c, b, args.new_tokens, args.new_tokens_no_cache, args.runs)
        for c in args.configs
        for b in args.batches
    ]
    meta = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "command": "python benchmarks/ensemble/bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if not args.no_write:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        replace_section(ROOT / "docs" / "benchmarks.md", "ensemble", markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
