"""Time one EMA update: alloy's WeightAverager vs torch.optim.swa_utils.AveragedModel.

The model is a randomly initialised Llama (33.5M parameters by default, untied), once in fp32
and once in bf16. Each contender averages the same model; updates are timed one by one,
round-robin between contenders so that load from other processes hits them alike, and the
median is reported. Memory is the bytes each keeps for the average: alloy's fp32 shadow (plus
its bounded staging buffer), AveragedModel's deep copy of the module (in the model's dtype, so a
bf16 model gets a bf16 average that stalls; see docs/average.md).

Physical floor per parameter and update (a memory-bound lerp): fp32 model: read x and s, write
s = 12 bytes for both tools; bf16 model: AveragedModel reads and writes bf16 (6 bytes), alloy
reads bf16 x and the fp32 shadow and writes the shadow (10 bytes, plus the staging chunk, which
stays in cache). So on bf16 alloy cannot match AveragedModel's bytes; the table shows how close
it gets while keeping 2x the precision.

    python benchmarks/average/bench.py                 # writes docs/benchmarks.md's section
    python benchmarks/average/bench.py --no-write --runs 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn
from transformers import LlamaConfig, LlamaForCausalLM

from alloy.average import WeightAverager

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- average:begin -->", "<!-- average:end -->"
DECAY = 0.999


def build_model(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def time_updates(contenders: dict[str, Callable[[], None]], runs: int) -> dict[str, list[float]]:
    """Seconds per update of each contender, `runs` each, interleaved; 3 warm-up updates."""
    for update in contenders.values():
        for _ in range(3):
            update()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, update in contenders.items():
            begin = time.perf_counter()
            update()
            seconds[name].append(time.perf_counter() - begin)
    return seconds


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_dtype(model: LlamaForCausalLM, dtype: torch.dtype, runs: int) -> dict[str, Any]:
    model = model.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    ours = WeightAverager(model, method="ema", decay=DECAY)  # default: compile=None (auto)
    start = time.perf_counter()
    ours.update(model)
    ours.update(model)  # the first update copies; the second compiles where auto turns it on
    compile_seconds = time.perf_counter() - start
    plain = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    buffers = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    contenders = {
        "alloy": lambda: ours.update(model),
        "AveragedModel": lambda: plain.update_parameters(model),
        "AveragedModel+buffers": lambda: buffers.update_parameters(model),
    }
    shadow = None
    if dtype != torch.float32:
        # The only way AveragedModel keeps an fp32 average of a low-precision model: an fp32
        # copy updated per tensor through `avg_fn` (its fused multi-tensor path refuses mixed
        # dtypes: "expected dtype float for `end`").
        shadow = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=False)
        shadow.module.float()
        contenders["AveragedModel fp32 average"] = lambda: shadow.update_parameters(model)
        # The eager path: cast through the staging buffer, then a fused lerp.
        staged = WeightAverager(model, method="ema", decay=DECAY, compile=False)
        contenders["alloy compile=False"] = lambda: staged.update(model)
    seconds = time_updates(contenders, runs)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "compiled": ours._stager.compiled,
        "first_updates_seconds": compile_seconds,
        "ms": {name: 1e3 * value for name, value in medians.items()},
        "runs_ms": {name: [1e3 * v for v in values] for name, values in seconds.items()},
        "bytes": {
            "alloy": ours.nbytes,
            "AveragedModel": module_bytes(plain.module),
            "AveragedModel+buffers": module_bytes(buffers.module),
            **({"AveragedModel fp32 average": module_bytes(shadow.module)} if shadow else {}),
        },
        # minimum memory traffic of one update: read x and s, write s
        "traffic": {
            "alloy": params * (dtype.itemsize + 4 + 4),
            "AveragedModel": params * 3 * dtype.itemsize,
        },
    }


def staged_cells(ms: dict[str, float]) -> str:
    """The compile=False columns: the eager staging path and its speed against AveragedModel."""
    if "alloy compile=False" not in ms:
        return "(same path as alloy) | -"
    staged = ms["alloy compile=False"]
    return f"{staged:.1f} | {ms['AveragedModel'] / staged:.2f}x"


def write_markdown(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Replace the average section of `path` (between its markers), or append it."""
    lines = [
        BEGIN,
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, "
        f"{meta['threads']} torch thread(s). Contenders are interleaved, median of "
        f"{meta['runs']} updates each. Model: Llama, {meta['shape']}. Regenerate with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| model dtype | params | alloy ms | AveragedModel ms | AveragedModel+buffers ms "
        "| AveragedModel with an fp32 average ms "
        "| speed vs AveragedModel | speed vs AveragedModel with an fp32 average "
        "| alloy compile=False ms | compile=False vs AveragedModel "
        "| average dtype (alloy / AveragedModel) "
        "| average MiB (alloy / AveragedModel) | min. traffic MB (alloy / AveragedModel) "
        "| GB/s (alloy / AveragedModel) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms, mib = row["ms"], {k: v / 2**20 for k, v in row["bytes"].items()}
        mb = {k: v / 1e6 for k, v in row["traffic"].items()}
        speed = {k: mb[k] / ms[k] for k in mb}  # MB per ms = GB/s
        fp32_avg = ms.get("AveragedModel fp32 average")
        same_job = (
            (f"{fp32_avg:.1f}", f"{fp32_avg / ms['alloy']:.2f}x")
            if fp32_avg is not None
            else ("(same as AveragedModel)", f"{ms['AveragedModel'] / ms['alloy']:.2f}x")
        )
        lines.append(
            f"| {row['dtype']} | {row['params'] / 1e6:.1f}M | {ms['alloy']:.1f} "
            f"| {ms['AveragedModel']:.1f} | {ms['AveragedModel+buffers']:.1f} "
            f"| {same_job[0]} | {ms['AveragedModel'] / ms['alloy']:.2f}x | {same_job[1]} "
            f"| {staged_cells(ms)} "
            f"| float32 / {row['dtype']} "
            f"| {mib['alloy']:.0f} / {mib['AveragedModel']:.0f} "
            f"| {mb['alloy']:.0f} / {mb['AveragedModel']:.0f} "
            f"| {speed['alloy']:.1f} / {speed['AveragedModel']:.1f} |"
        )
    by_dtype = {row["dtype"]: row for row in rows}
    if "bfloat16" in by_dtype:
        low = by_dtype["bfloat16"]
        traffic = low["traffic"]["alloy"] / low["traffic"]["AveragedModel"]
        speedup = low["ms"]["AveragedModel"] / low["ms"]["alloy"]
        lines += [
            "",
            "Reading the table: on an fp32 model both tools run the same fused lerp over the same "
            "bytes; alloy skips AveragedModel's per-update bookkeeping (a tensor counter read on "
            "the host, per-call regrouping of tensors). On a bf16 model alloy keeps the average "
            "in fp32: it must read the bf16 weights and read and write a 4-byte average "
            f"({traffic:.2f}x AveragedModel's bytes, which reads and writes a bf16 copy). By "
            "default (`compile=None`, on for models with at least 10M low-precision parameters "
            "and a compiler) torch.compile fuses the cast into the lerp, one pass over those "
            f"bytes: {speedup:.2f}x the speed of AveragedModel's fused bf16 path "
            f"({low['first_updates_seconds']:.0f} s for the first two updates, which compile). "
            "The eager path (`compile=False`: cast through a staging buffer, then lerp) takes "
            f"{low['ms']['alloy compile=False'] / low['ms']['AveragedModel']:.2f}x "
            "AveragedModel's time. "
            "AveragedModel's bf16 average moves fewer bytes but does not work: at decay 0.999 "
            "most of its weights never move (see docs/average.md). "
            "Doing the same job as alloy, an fp32 average of the bf16 model, AveragedModel has "
            "to fall back to its per-tensor `avg_fn` path (its fused path refuses mixed dtypes): "
            f"{low['ms']['AveragedModel fp32 average']:.1f} ms, "
            f"{low['ms']['AveragedModel fp32 average'] / low['ms']['alloy']:.1f}x alloy's time. "
            "With `every=N` the cost per optimizer step is divided by N.",
        ]
    lines += ["", END]
    section = "\n".join(lines)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## Average: EMA update, alloy vs torch.optim.swa_utils.AveragedModel\n\n"
            + "One EMA update (decay 0.999) of the same model, timed by\n"
            + "`benchmarks/average/bench.py`; see docs/average.md for the design.\n\n"
            + section
            + "\n"
        )
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed updates per contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (at most 2 here)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "average" / "results.json"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.hidden, args.layers, args.vocab)
    rows = [bench_dtype(model, dtype, args.runs) for dtype in (torch.float32, torch.bfloat16)]
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "shape": f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, untied",
        "command": "python benchmarks/average/bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for row in rows:
        summary = {name: round(value, 2) for name, value in row["ms"].items()}
        print(row["dtype"], f"{row['params'] / 1e6:.1f}M params", summary, "ms/update")
    if not args.no_write:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        write_markdown(args.markdown, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
