"""Parity of `alloy merge` with mergekit 0.1.5 on the same recipes and checkpoints.

    python benchmarks/merge/parity.py --mergekit /path/to/venv/bin/mergekit-yaml

Builds a small Llama family in float32 (a base and three fine-tunes = base + seeded noise, 4
layers, hidden 64), runs every deterministic method's recipe through both tools and compares
every output tensor. Writes a table into docs/benchmarks.md (between the parity markers).
Random methods (DARE, DELLA) are left out: mergekit draws from torch's global generator, so only
their distributions can agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import torch
import yaml

from alloy.io import Checkpoint, save_state_dict
from alloy.lab.tiny import build_tiny
from alloy.merge import merge

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"


def family(work: Path) -> dict[str, str]:
    base = build_tiny(
        "llama", work / "base", seed=1, layers=4, hidden_size=64, intermediate_size=128, force=True
    )
    paths = {"base": str(base)}
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt}
    for k, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(10 + k)
        tuned = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        save_state_dict(tuned, work / name, donor=base, force=True)
        paths[name] = str(work / name)
    return paths


def recipes(p: dict[str, str]) -> dict[str, dict]:
    def models(names: list[str], **params: object) -> list[dict]:
        return [{"model": p[n], "parameters": dict(params)} for n in names]

    three = ["a", "b", "c"]
    with_base = {"base_model": p["base"], "dtype": "float32"}
    return {
        "linear": {
            "merge_method": "linear",
            "models": models(three, weight=1.0),
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            **with_base,
            "models": models(["a"], weight=1.0) + models(["b"], weight=-0.5),
        },
        "ties": {
            "merge_method": "ties",
            **with_base,
            "models": models(three, weight=1.0, density=0.5),
        },
        "ties (gradient, filter)": {
            "merge_method": "ties",
            **with_base,
            "models": models(["a"], weight=1.0, density=[0.2, 0.8])
            + models(["b"], weight=[{"filter": "mlp", "value": 0.5}, {"value": 1.0}], density=0.6),
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            **with_base,
            "models": models(three, weight=1.0, density=0.8, gamma=0.05),
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            **with_base,
            "models": models(three, weight=1.0, density=0.8, gamma=0.05),
        },
        "slerp": {
            "merge_method": "slerp",
            **with_base,
            "models": [{"model": p["base"]}, {"model": p["a"]}],
            "parameters": {"t": [0.0, 0.3, 0.7, 1.0]},
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            **with_base,
            "models": models(["a"], weight=0.7) + models(["b"], weight=0.3),
        },
        "model_stock": {"merge_method": "model_stock", **with_base, "models": models(three)},
        "passthrough (slices)": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": p["a"], "layer_range": [0, 3]}]},
                {"sources": [{"model": p["b"], "layer_range": [2, 4]}]},
            ],
        },
    }


def compare(ours: Path, theirs: Path) -> tuple[int, int, float]:
    with Checkpoint.open(ours) as a, Checkpoint.open(theirs) as b:
        names = set(a.tensors) | set(b.tensors)
        if set(a.tensors) != set(b.tensors):
            raise SystemExit(f"tensor names differ: {sorted(set(a.tensors) ^ set(b.tensors))}")
        identical, worst = 0, 0.0
        for name in sorted(names):
            x, y = a.read(name).double(), b.read(name).double()
            diff = float((x - y).abs().max()) if x.numel() else 0.0
            identical += diff == 0
            worst = max(worst, diff)
    return len(names), identical, worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alloy-parity"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = family(args.work)
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, recipe in recipes(paths).items():
        stem = name.split(" ")[0]
        file = args.work / f"{stem}-{len(rows)}.yaml"
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ours, theirs = args.work / f"ours-{len(rows)}", args.work / f"theirs-{len(rows)}"
        shutil.rmtree(theirs, ignore_errors=True)
        merge(file, ours, force=True, hash_inputs=False)
        subprocess.run(
            [args.mergekit, str(file), str(theirs)], check=True, env=env, capture_output=True
        )
        count, identical, worst = compare(ours, theirs)
        rows.append((name, count, identical, worst))
        print(f"{name}: {identical}/{count} identical, max |diff| {worst:.3g}", flush=True)
    lines = [
        BEGIN,
        "",
        "float32 Llama family (4 layers, hidden 64); every output tensor compared. "
        "Regenerate with:",
        "",
        "```sh",
        "python benchmarks/merge/parity.py --mergekit /path/to/mergekit-venv/bin/mergekit-yaml",
        "```",
        "",
        "| recipe | tensors | bit-identical | max abs difference |",
        "|---|---|---|---|",
        *(f"| {n} | {c} | {i} | {w:.3g} |" for n, c, i, w in rows),
        "",
        END,
    ]
    text = args.markdown.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    args.markdown.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
