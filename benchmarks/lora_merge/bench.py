"""Benchmark merging `BASE+ADAPTER` (a LoRA folded on read) against merging the folded model.

    python benchmarks/lora_merge/bench.py --sizes 168m 1b --runs 5

Inputs are benchmarks/merge's synthetic Llama-layout checkpoints (a base and two fine-tunes,
bf16, 1 GB shards, built once under --work by that harness), plus a LoRA adapter on the base
made with PEFT itself (`get_peft_model`, r=16, alpha=32, on every linear layer: q, k, v, o,
gate, up, down; factors redrawn from a seeded normal so that every update is non-zero; saved as
PEFT saves it, fp32) and that adapter folded into the base on disk, tensor by tensor, through
alloy's own fold (so both merges read the same bytes and must write identical weight files;
the harness checks that they do).

Two recipes per size, each written twice, once naming `BASE+ADAPTER` and once the folded folder:
`linear` averages the adapted model and the two fine-tunes; `ties` merges the adapted model and
one fine-tune onto the base (weight 1, density 0.5). Both say `dtype: bfloat16`.

What is measured, as in benchmarks/merge: whole-process wall time and peak resident memory of
`alloy merge` (per child process, from wait4's rusage), median of --runs runs, page cache warm,
the two variants interleaved. `re-run` warms alloy's digest cache first, so it measures the
merge itself; `first` turns the cache off (`ALLOY_HASH_CACHE=0`), so the model card hashes every
input beside the merge (the adapted variant hashes the base once even where it is read twice).
Target (issue #18): `BASE+ADAPTER` within 1.2x of the pre-folded time, and the same peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "merge"))

import bench as merge_bench  # noqa: E402  (benchmarks/merge/bench.py: inputs, measure)

RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(work: Path, layout: str) -> tuple[Path, Path]:
    """The LoRA adapter on the base and the base with it folded in; reused when present."""
    adapter, folded = work / layout / "lora", work / layout / "lora-folded"
    if not (folded / "config.json").is_file():
        command = [sys.executable, __file__, "--build", layout, "--work", str(work)]
        subprocess.run(command, check=True)
    return adapter, folded


def _build(work: Path, layout: str) -> None:
    """In a child process (the parent must not import torch: its RSS would count in the
    children's peaks)."""
    import logging

    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alloy.adapters import open_model
    from alloy.io import CheckpointWriter, TensorSpec

    base = work / layout / "base"
    adapter, folded = work / layout / "lora", work / layout / "lora-folded"
    if not (adapter / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.copy_(noise * (0.02 if "lora_A" in name else 0.002))
        peft_model.save_pretrained(adapter)
        del model, peft_model
    with open_model(f"{base}+{adapter}") as adapted:
        specs = [TensorSpec(n, info.shape, info.dtype) for n, info in adapted.tensors.items()]
        with CheckpointWriter(folded, specs, max_shard_bytes=1_000_000_000, donor=base) as w:
            for name in adapted:
                w.write(name, adapted.read(name))


def recipes(work: Path, layout: str, model: str) -> dict[str, str]:
    """linear and ties recipes with `model` (BASE+ADAPTER, or the folded folder) among them."""
    base, a, b = (str(work / layout / name) for name in ("base", "a", "b"))
    return {
        "linear": (
            f"merge_method: linear\nmodels:\n  - model: {model}\n  - model: {a}\n"
            f"  - model: {b}\nparameters:\n  weight: 1.0\ndtype: bfloat16\n"
        ),
        "ties": (
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {model}\n"
            f"  - model: {a}\nparameters:\n  weight: 1.0\n  density: 0.5\ndtype: bfloat16\n"
        ),
    }


def weight_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        with file.open("rb") as handle:  # in chunks: the parent's peak RSS is its children's
            while chunk := handle.read(8 << 20):  # floor (Linux copies it into them at fork)
                digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["168m"], choices=sorted(merge_bench.LAYOUTS))
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/alloy-bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/lora_merge/results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        _build(args.work, args.build)
        return

    alloy = [sys.executable, "-m", "alloy"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    envs = {
        "first": {**env, "ALLOY_HASH_CACHE": "0"},
        "re-run": {**env, "ALLOY_HASH_CACHE": "1", "ALLOY_CACHE_DIR": str(args.work / "hashes")},
    }
    results: dict[str, dict] = {}
    for size in args.sizes:
        merge_bench.build_inputs(args.work, size)
        adapter, folded = build_adapter(args.work, size)
        base = args.work / size / "base"
        models = {"adapter": f"{base}+{adapter}", "folded": str(folded)}
        for method in args.methods:
            commands, outs = {}, {}
            for variant, model in models.items():
                recipe = args.work / f"lora-{size}-{method}-{variant}.yaml"
                recipe.write_text(recipes(args.work, size, model)[method])
                outs[variant] = args.work / f"lora-{size}-{method}-{variant}-out"
                commands[variant] = [*alloy, "merge", str(recipe), str(outs[variant]), "--force"]
                merge_bench.measure([*commands[variant], "-q"], envs["re-run"])  # warm caches
            identical = weight_digest(outs["adapter"]) == weight_digest(outs["folded"])
            row: dict[str, list[merge_bench.Run]] = {}
            for _ in range(args.runs):
                for mode, mode_env in envs.items():
                    for variant, command in commands.items():
                        shutil.rmtree(outs[variant], ignore_errors=True)
                        run = merge_bench.measure([*command, "-q"], mode_env)
                        row.setdefault(f"{variant} {mode}", []).append(run)
                        print(f"{size} {method} {variant} {mode}: {run}", flush=True)
            results[f"{size}/{method}"] = {
                "identical_weights": identical,
                **{
                    key: {
                        "seconds": statistics.median(r.seconds for r in runs),
                        "peak_mib": statistics.median(r.peak_mib for r in runs),
                        "runs": [vars(r) for r in runs],
                    }
                    for key, runs in row.items()
                },
            }
        results[f"{size}/adapter"] = {
            "bytes": (adapter / "adapter_model.safetensors").stat().st_size,
            "rank": RANK,
            "targets": TARGETS,
        }
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{merge_bench._memory_gib()} GiB, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "runs": args.runs,
        "command": "python benchmarks/lora_merge/bench.py " + " ".join(sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(args.markdown, meta, results)
    print(json.dumps(results, indent=2))


BEGIN, END = "<!-- lora-merge:begin -->", "<!-- lora-merge:end -->"


def write_markdown(path: Path, meta: dict, results: dict) -> None:
    """Replace the lora-merge table of docs/benchmarks.md (between its markers)."""
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
        "| size / method | adapter MB | BASE+ADAPTER s (first / re-run) "
        "| folded s (first / re-run) | time ratio | BASE+ADAPTER peak MiB | folded peak MiB "
        "| peak ratio | same weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results.items():
        if key.endswith("/adapter"):
            continue
        size = key.split("/")[0]
        adapter_mb = results[f"{size}/adapter"]["bytes"] / 1e6
        modes = ("first", "re-run")
        ours = [row[f"adapter {m}"] for m in modes]
        theirs = [row[f"folded {m}"] for m in modes]
        cells = [
            key,
            f"{adapter_mb:.0f}",
            " / ".join(f"{r['seconds']:.1f}" for r in ours),
            " / ".join(f"{r['seconds']:.1f}" for r in theirs),
            " / ".join(
                f"{a['seconds'] / b['seconds']:.2f}" for a, b in zip(ours, theirs, strict=True)
            )
            + " x",
            " / ".join(f"{r['peak_mib']:.0f}" for r in ours),
            " / ".join(f"{r['peak_mib']:.0f}" for r in theirs),
            " / ".join(
                f"{a['peak_mib'] / b['peak_mib']:.2f}" for a, b in zip(ours, theirs, strict=True)
            ),
            "yes" if row["identical_weights"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", END]
    text = path.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{path}: no {BEGIN} marker; add the section first")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
