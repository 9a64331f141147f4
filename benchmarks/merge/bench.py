"""Benchmark `alloy merge` against mergekit 0.1.5 and the I/O floor, writing docs/benchmarks.md.

    python benchmarks/merge/bench.py --sizes 168m 1b --runs 3 \
        --mergekit /path/to/venv/bin/mergekit-yaml

What is measured: whole-process wall time and peak resident memory (per child process, from
wait4's rusage) of one merge, median of --runs runs, with the page cache warm (inputs were just
written and the machine has room to cache them). Inputs are synthetic Llama-layout checkpoints in
bf16, sharded at 1 GB, with seeded random weights, built once under --work (by a child process:
this parent imports neither torch nor alloy, because Linux reports a child's peak RSS as at least
its parent's RSS at fork time).

The floor is the I/O a merge cannot avoid on this machine: reading every input byte (`cat` to
/dev/null) plus writing the output bytes (`dd` with fdatasync), run the same way. For linear, a
bare numpy kernel (numpy_linear.py: no validation, no side files, same output tensors) shows how
close to that floor any Python process can get.

alloy runs twice per round: `alloy` is a first run, which hashes every input for the model card
(`ALLOY_HASH_CACHE=0`); `alloy re-run` finds the digests in its cache (warmed once before timing),
as any later merge of the same inputs does, so it does the same work as mergekit.

mergekit runs in its own virtual environment (its dependencies must not touch ours); pass its
`mergekit-yaml`. Without it, only alloy and the floor are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name -> (vocab, hidden, intermediate, layers, heads, kv_heads)
LAYOUTS = {
    "168m": (36000, 768, 3072, 12, 12, 12),
    "1b": (32000, 2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shapes
}


def llama_specs(layout: str) -> tuple[list, dict]:
    import torch

    from alloy.io import TensorSpec

    vocab, hidden, inter, layers, heads, kv = LAYOUTS[layout]
    head_dim = hidden // heads
    bf16 = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), bf16)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (hidden,), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (hidden, hidden), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * head_dim, hidden), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * head_dim, hidden), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, hidden), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), bf16),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, hidden), bf16),
            TensorSpec(p + "mlp.up_proj.weight", (inter, hidden), bf16),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, inter), bf16),
        ]
    specs += [
        TensorSpec("model.norm.weight", (hidden,), bf16),
        TensorSpec("lm_head.weight", (vocab, hidden), bf16),
    ]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return specs, config


def build_inputs(work: Path, layout: str) -> list[Path]:
    """Base + two fine-tunes (base + seeded noise), bf16, 1 GB shards; reused when present."""
    folders = [work / layout / name for name in ("base", "a", "b")]
    if not all((f / "config.json").is_file() for f in folders):
        command = [sys.executable, __file__, "--build", layout, "--work", str(work)]
        subprocess.run(command, check=True)
    return folders


def _build(work: Path, layout: str) -> None:
    import torch

    from alloy.io import CheckpointWriter

    specs, config = llama_specs(layout)
    folders = [work / layout / name for name in ("base", "a", "b")]
    for k, folder in enumerate(folders):
        if (folder / "config.json").is_file():
            continue
        donor = work / layout / "config-donor"
        donor.mkdir(parents=True, exist_ok=True)
        (donor / "config.json").write_text(json.dumps(config))
        with CheckpointWriter(folder, specs, max_shard_bytes=1_000_000_000, donor=donor) as w:
            for i, spec in enumerate(specs):
                g = torch.Generator().manual_seed(1000 * i)
                base = torch.randn(spec.shape, generator=g) * 0.02
                if k:
                    g.manual_seed(1000 * i + k)
                    base += torch.randn(spec.shape, generator=g) * 0.002
                w.write(spec.name, base.to(spec.dtype))


def recipes(inputs: list[Path]) -> dict[str, str]:
    base, a, b = (str(p) for p in inputs)
    return {
        "linear": (
            f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: {a}\n  - model: {b}\n"
            "parameters:\n  weight: 1.0\ndtype: bfloat16\n"
        ),
        "ties": (
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
            "parameters:\n  weight: 1.0\n  density: 0.5\ndtype: bfloat16\n"
        ),
    }


@dataclass
class Run:
    seconds: float
    peak_mib: float


def measure(command: list[str], env: dict[str, str]) -> Run:
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return Run(seconds, usage.ru_maxrss / 1024)


def floor_command(inputs: list[Path], out_bytes: int, out: Path) -> list[str]:
    files = " ".join(str(f) for p in inputs for f in sorted(p.glob("*.safetensors")))
    count = max(1, out_bytes // (16 << 20))
    write = f"dd if=/dev/zero of={out} bs=16M count={count} conv=fdatasync status=none"
    script = f"cat {files} > /dev/null && {write}"
    return ["bash", "-c", script]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["168m"], choices=sorted(LAYOUTS))
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/alloy-bench"))
    parser.add_argument("--mergekit", type=str, default=None, help="path to mergekit-yaml")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/merge/results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        _build(args.work, args.build)
        return

    alloy = [sys.executable, "-m", "alloy"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first_run = {**env, "ALLOY_HASH_CACHE": "0"}
    re_run = {**env, "ALLOY_HASH_CACHE": "1", "ALLOY_CACHE_DIR": str(args.work / "hash-cache")}
    results: dict[str, dict] = {}
    for size in args.sizes:
        inputs = build_inputs(args.work, size)
        in_bytes = sum(f.stat().st_size for p in inputs for f in p.glob("*.safetensors"))
        for method, text in recipes(inputs).items():
            if method not in args.methods:
                continue
            recipe = args.work / f"{size}-{method}.yaml"
            recipe.write_text(text)
            out = args.work / f"{size}-{method}-out"
            out_bytes = in_bytes // 3
            merge = [*alloy, "merge", str(recipe), str(out), "--force", "-q"]
            tools = {
                "alloy": (merge, first_run),
                "alloy re-run": (merge, re_run),
                "floor": (floor_command(inputs, out_bytes, args.work / "floor.bin"), env),
                "startup": ([sys.executable, "-c", "import alloy.merge.api"], env),
            }
            if method == "linear":
                kernel = [sys.executable, str(ROOT / "benchmarks/merge/numpy_linear.py")]
                tools["numpy"] = (
                    [*kernel, str(args.work / "numpy.safetensors"), *map(str, inputs)],
                    env,
                )
            if args.mergekit:
                tools["mergekit"] = ([args.mergekit, str(recipe), str(out)], env)
            measure(merge, re_run)  # warms the digest cache of the re-runs
            row: dict[str, list[Run]] = {tool: [] for tool in tools}
            for _ in range(args.runs):
                for tool, (command, tool_env) in tools.items():
                    shutil.rmtree(out, ignore_errors=True)
                    row[tool].append(measure(command, tool_env))
                    print(f"{size} {method} {tool}: {row[tool][-1]}", flush=True)
            results[f"{size}/{method}"] = {
                tool: {
                    "seconds": statistics.median(r.seconds for r in runs),
                    "peak_mib": statistics.median(r.peak_mib for r in runs),
                    "runs": [vars(r) for r in runs],
                }
                for tool, runs in row.items()
            }
            results[f"{size}/{method}"]["bytes"] = {"in": in_bytes, "out": out_bytes}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_memory_gib()} GiB, "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "runs": args.runs,
        "command": "python benchmarks/merge/bench.py " + " ".join(sys.argv[1:]),
    }
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(args.markdown, meta, results)
    print(json.dumps(results, indent=2))


def _memory_gib() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return round(pages / 2**30)


BEGIN, END = "<!-- merge:begin -->", "<!-- merge:end -->"


def write_markdown(path: Path, meta: dict, results: dict) -> None:
    """Replace the merge section of docs/benchmarks.md (between its markers) with a table."""
    lines = [
        BEGIN,
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}; median of {meta['runs']} runs, "
        "page cache warm. Regenerate with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| size / method | alloy s (first / re-run) | mergekit s | floor s | startup s "
        "| numpy kernel s | speed-up vs mergekit | alloy / floor | numpy / floor "
        "| alloy peak MiB | mergekit peak MiB | peak ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results.items():
        first, again, floor = row["alloy"], row["alloy re-run"], row["floor"]["seconds"]
        peer, kernel = row.get("mergekit"), row.get("numpy")

        runs = (first["seconds"], again["seconds"])
        seconds = " / ".join(f"{t:.1f}" for t in runs)
        over_floor = " / ".join(f"{t / floor:.1f}" for t in runs) + " x"
        speed = " / ".join(f"{peer['seconds'] / t:.1f}" for t in runs) + " x" if peer else "-"
        cells = [
            key,
            seconds,
            f"{peer['seconds']:.1f}" if peer else "-",
            f"{floor:.2f}",
            f"{row['startup']['seconds']:.1f}",
            f"{kernel['seconds']:.2f}" if kernel else "-",
            speed,
            over_floor,
            f"{kernel['seconds'] / floor:.1f}x" if kernel else "-",
            f"{first['peak_mib']:.0f}",
            f"{peer['peak_mib']:.0f}" if peer else "-",
            f"{first['peak_mib'] / peer['peak_mib']:.2f}" if peer else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", END]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
