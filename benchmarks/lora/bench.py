"""Benchmark `alloy lora extract` against mergekit 0.1.5's `mergekit-extract-lora`.

    python benchmarks/lora/bench.py --pairs demo 168m --rank 32 --runs 3 \
        --mergekit /path/to/venv/bin/mergekit-extract-lora

Pairs (FINETUNED, BASE):
- `demo`: a real fine-tune, the lab demo family's large base and its fiction expert
  (`alloy lab build --preset demo`; Llama, hidden 128, 4 layers, fp32, tied embeddings).
- `168m`: a synthetic Llama-layout pair in bf16 (vocab 36,000, hidden 768, 12 layers, as in the
  merge benchmark): every linear weight gets ΔW = U·diag(k^-1)·V of rank 128 scaled to 5% of
  the weight's norm plus dense noise at 2% of ΔW; the embeddings, head and norms change too.
  bf16 rounding of the fine-tune adds its own full-rank noise, as in real bf16 fine-tunes.

What is measured: whole-process wall time and peak resident memory of one extraction (from
wait4's rusage of the child), median of --runs runs, page cache warm. alloy runs with its
default SVD (`auto`: randomized for rank <= min dim / 4) and with `--svd exact` (a full SVD per
matrix, as mergekit does). Then both adapters are read back (alloy's PEFT reader) and each
LoRA module's relative error ‖ΔW − B·A‖ / ‖ΔW‖ is computed against the true ΔW = FINETUNED −
BASE of the files, in fp64. mergekit runs in its own virtual environment
(`bash benchmarks/merge/setup_mergekit.sh` installs it; its bin folder holds
mergekit-extract-lora). This parent imports neither torch nor alloy (a child's peak RSS is at
least its parent's at fork).
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "runs" / "lab" / "family" / "demo" / "large"
# name -> (vocab, hidden, intermediate, layers, heads, kv_heads)
LAYOUTS = {"168m": (36000, 768, 3072, 12, 12, 12)}
DELTA_RANK, DELTA_SHARE, NOISE_SHARE = 128, 0.05, 0.02


def _demo_pair() -> tuple[Path, Path]:
    expert, base = DEMO / "experts" / "fiction", DEMO / "base"
    if not (expert / "config.json").is_file():
        raise SystemExit(f"no {expert}: build the lab family with `alloy lab build --preset demo`")
    return expert, base


def pair(name: str, work: Path) -> tuple[Path, Path]:
    """(FINETUNED, BASE) folders, built once under --work (synthetic) or taken from the lab."""
    if name == "demo":
        return _demo_pair()
    folders = (work / name / "ft", work / name / "base")
    if not all((f / "config.json").is_file() for f in folders):
        command = [sys.executable, __file__, "--build", name, "--work", str(work)]
        subprocess.run(command, check=True)
    return folders


def _build(work: Path, layout: str) -> None:
    import torch

    from alloy.io import CheckpointWriter, TensorSpec

    vocab, hidden, inter, layers, heads, kv = LAYOUTS[layout]
    bf16, kv_dim = torch.bfloat16, kv * hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
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
    }
    donor = work / layout / "config-donor"
    donor.mkdir(parents=True, exist_ok=True)
    (donor / "config.json").write_text(json.dumps(config))
    specs = [TensorSpec(n, s, bf16) for n, s in shapes.items()]
    base_dir, ft_dir = work / layout / "base", work / layout / "ft"
    with (
        CheckpointWriter(base_dir, specs, donor=donor, force=True) as base_out,
        CheckpointWriter(ft_dir, specs, donor=donor, force=True) as ft_out,
    ):
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            weight = torch.randn(shape, generator=g) * 0.02
            if len(shape) == 1:
                weight += 1.0
                delta = torch.randn(shape, generator=g) * 0.01
            elif "embed" in name or "lm_head" in name:
                delta = torch.randn(shape, generator=g) * 0.0005
            else:
                scales = torch.arange(1, DELTA_RANK + 1).float().reciprocal()
                left = torch.randn(shape[0], DELTA_RANK, generator=g) * scales
                delta = left @ torch.randn(DELTA_RANK, shape[1], generator=g)
                delta *= DELTA_SHARE * weight.norm() / delta.norm()
                noise = torch.randn(shape, generator=g)
                delta += noise * (NOISE_SHARE * delta.norm() / noise.norm())
            base_out.write(name, weight.to(bf16))
            ft_out.write(name, (weight + delta).to(bf16))


def _errors(ft: Path, base: Path, adapters: list[Path]) -> None:
    """Print, per adapter, each LoRA module's relative error against FINETUNED − BASE (fp64)."""
    import torch

    from alloy.adapters import read_adapter
    from alloy.adapters.delta import delta
    from alloy.io import Checkpoint

    results = {}
    with Checkpoint.open(ft) as tuned, Checkpoint.open(base) as original:
        for folder in adapters:
            adapter = read_adapter(folder)
            errors = {}
            for name, factors in adapter.modules.items():
                true = tuned.read(name).double() - original.read(name).double()
                missed = true - delta(factors).double()
                errors[name] = float(torch.linalg.norm(missed) / torch.linalg.norm(true))
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            results[str(folder)] = {
                "modules": len(errors),
                "median_error": statistics.median(errors.values()),
                "max_error": max(errors.values()),
                "mean_error": statistics.fmean(errors.values()),
                "full_copies": len(adapter.full),
                "adapter_mib": size / 2**20,
            }
    print(json.dumps(results))


def measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    load = os.getloadavg()[0]  # other processes on this machine slow every tool down
    with tempfile.TemporaryFile() as log:  # a pipe could fill up with progress bars and block
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=["demo", "168m"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/alloy-bench-lora"))
    parser.add_argument("--mergekit", default=None, help="path to mergekit-extract-lora")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/lora/results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--errors", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        _build(args.work, args.build)
        return
    if args.errors:
        _errors(args.errors[0], args.errors[1], args.errors[2:])
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    for name in args.pairs:
        ft, base = pair(name, args.work)
        outs = {tool: args.work / f"{name}-{tool}" for tool in ("alloy", "exact", "mergekit")}
        extract = [sys.executable, "-m", "alloy", "lora", "extract", str(ft), str(base)]
        rank = ["--rank", str(args.rank), "--force", "-q"]
        tools = {
            "alloy": [*extract, str(outs["alloy"]), *rank],
            "alloy exact": [*extract, str(outs["exact"]), *rank, "--svd", "exact"],
            "startup": [sys.executable, "-c", "import alloy.adapters.extract"],
        }
        if args.mergekit:
            tools["mergekit"] = [
                args.mergekit,
                *("--model", str(ft), "--base-model", str(base)),
                *("--out-path", str(outs["mergekit"]), "--max-rank", str(args.rank), "--quiet"),
            ]
        runs: dict[str, list[dict[str, float]]] = {tool: [] for tool in tools}
        for _ in range(args.runs):
            for tool, command in tools.items():
                if tool == "mergekit":
                    shutil.rmtree(outs["mergekit"], ignore_errors=True)
                runs[tool].append(measure(command, env))
                print(f"{name} {tool}: {runs[tool][-1]}", flush=True)
        written = [outs["alloy"], outs["exact"]] + ([outs["mergekit"]] if args.mergekit else [])
        check = [sys.executable, __file__, "--errors", str(ft), str(base), *map(str, written)]
        errors = json.loads(subprocess.run(check, check=True, capture_output=True).stdout)
        labels = {str(outs["alloy"]): "alloy", str(outs["exact"]): "alloy exact"}
        labels[str(outs["mergekit"])] = "mergekit"
        results[name] = {
            tool: {
                "seconds": statistics.median(r["seconds"] for r in measured),
                "peak_mib": statistics.median(r["peak_mib"] for r in measured),
                "load": statistics.median(r["load"] for r in measured),
                "runs": measured,
            }
            for tool, measured in runs.items()
        }
        for folder, numbers in errors.items():
            results[name][labels[folder]].update(numbers)
        sizes = sum(f.stat().st_size for p in (ft, base) for f in p.glob("*.safetensors"))
        results[name]["input_mib"] = sizes / 2**20
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_memory_gib()} GiB, "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "runs": args.runs,
        "rank": args.rank,
        "command": "python benchmarks/lora/bench.py " + " ".join(sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(args.markdown, meta, results)
    print(json.dumps(results, indent=2))


def _memory_gib() -> int:
    return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30)


BEGIN, END = "<!-- lora-extract:begin -->", "<!-- lora-extract:end -->"


def write_markdown(path: Path, meta: dict, results: dict) -> None:
    """Replace the extraction section of docs/benchmarks.md (between its markers)."""
    lines = [
        BEGIN,
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}; rank {meta['rank']}; median of "
        f'{meta["runs"]} runs, page cache warm; "load" is the machine\'s 1-minute load average '
        "when each run started (other work shared the two cores). Regenerate with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| pair | tool | wall s | speed-up vs mergekit | peak MiB | peak ratio | load "
        "| LoRA modules | median error | worst error | full copies | adapter MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        peer = row.get("mergekit")
        for tool in ("alloy", "alloy exact", "mergekit"):
            if tool not in row:
                continue
            r = row[tool]
            cells = [
                name,
                tool,
                f"{r['seconds']:.1f}",
                f"{peer['seconds'] / r['seconds']:.1f}x" if peer else "-",
                f"{r['peak_mib']:.0f}",
                f"{r['peak_mib'] / peer['peak_mib']:.2f}" if peer else "-",
                f"{r['load']:.1f}",
                str(r["modules"]),
                f"{r['median_error']:.6f}",
                f"{r['max_error']:.6f}",
                str(r["full_copies"]),
                f"{r['adapter_mib']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(
            f"| {name} | startup | {row['startup']['seconds']:.1f} | - "
            f"| {row['startup']['peak_mib']:.0f} | - | {row['startup']['load']:.1f} "
            "| - | - | - | - | - |"
        )
    lines += ["", END]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN not in text:
        text += "\n" + BEGIN + "\n" + END + "\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
