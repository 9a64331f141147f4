"""Parity with mergekit 0.1.5, tensor by tensor, for the deterministic methods ported from it.

mergekit runs in its own virtual environment (benchmarks/merge/setup_mergekit.sh; default
/tmp/mergekit-venv, or $ALLOY_MERGEKIT_VENV), as one subprocess that merges every recipe, so the
test costs one mergekit import. Without that environment the test is skipped.

Tolerances: nearswap, ram, ramplus_tl, sce and arcee_fusion do the same float32 operations as
mergekit and must be bit-identical; multislerp and karcher compute the same quantity by another
route (a closed form, and iterations on N coefficients in float64, see their modules) and must
agree to float32 rounding.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from alloy.io import Checkpoint, save_state_dict
from alloy.lab.tiny import build_tiny
from alloy.merge import merge

VENV = Path(os.environ.get("ALLOY_MERGEKIT_VENV", "/tmp/mergekit-venv"))
PYTHON = VENV / "bin" / "python"

RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(recipe) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
"""

EXACT = 0.0
ROUNDING = 2e-6  # max |difference| for weights of magnitude ~0.1-1


def family(root: Path) -> dict[str, str]:
    """A float32 tiny Llama base and three fine-tunes: base + seeded noise of different sizes,
    with a few entries left exactly at the base (so RAM's counts and SCE's zero variances see
    both cases)."""
    base = build_tiny("llama", root / "base", seed=3, hidden_size=32, intermediate_size=64)
    paths = {"base": str(base)}
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name).float() for name in ckpt}
    for k, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(20 + k)
        tuned = {}
        for n, tensor in state.items():
            noise = (0.01 + 0.01 * k) * torch.randn(tensor.shape, generator=g)
            untouched = torch.rand(tensor.shape, generator=g) < 0.3
            tuned[n] = tensor + noise.masked_fill(untouched, 0)
        save_state_dict(tuned, root / name, donor=base, force=True)
        paths[name] = str(root / name)
    return paths


def recipes(p: dict[str, str]) -> dict[str, tuple[dict, float]]:
    def models(names: list[str], **params: object) -> list[dict]:
        return [{"model": p[n], **({"parameters": dict(params)} if params else {})} for n in names]

    three = ["a", "b", "c"]
    with_base = {"base_model": p["base"], "dtype": "float32"}
    return {
        "nearswap": (
            {
                "merge_method": "nearswap",
                **with_base,
                "models": models(["a"]),
                "parameters": {"t": 0.005},
            },
            EXACT,
        ),
        "ram": ({"merge_method": "ram", **with_base, "models": models(three)}, EXACT),
        "ramplus_tl": (
            {
                "merge_method": "ramplus_tl",
                **with_base,
                "models": models(three),
                "parameters": {"r": 0.5, "alpha": 0.9},
            },
            EXACT,
        ),
        "sce": ({"merge_method": "sce", **with_base, "models": models(three)}, EXACT),
        "sce (select_topk)": (
            {
                "merge_method": "sce",
                **with_base,
                "models": models(three),
                "parameters": {"select_topk": 0.4},
            },
            EXACT,
        ),
        "arcee_fusion": (
            {"merge_method": "arcee_fusion", **with_base, "models": models(["a"])},
            EXACT,
        ),
        "multislerp": (
            {
                "merge_method": "multislerp",
                **with_base,
                "models": models(["a"], weight=0.5) + models(["b", "c"], weight=0.25),
            },
            ROUNDING,
        ),
        "multislerp (no base)": (
            {
                "merge_method": "multislerp",
                "dtype": "float32",
                "models": models(["a"], weight=1.0) + models(["b"], weight=3.0),
            },
            ROUNDING,
        ),
        "karcher": (
            {"merge_method": "karcher", "dtype": "float32", "models": models(three)},
            ROUNDING,
        ),
    }


@pytest.mark.skipif(not PYTHON.exists(), reason=f"no mergekit venv at {VENV}")
def test_every_tensor_matches_mergekit(tmp_path: Path) -> None:
    paths = family(tmp_path / "family")
    cases = recipes(paths)
    jobs: list[tuple[str, Path, Path, float]] = []
    for k, (name, (recipe, tolerance)) in enumerate(cases.items()):
        file = tmp_path / f"recipe-{k}.yaml"
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ours = tmp_path / f"ours-{k}"
        merge(file, ours, hash_inputs=False)
        jobs.append((name, file, ours, tolerance))
    argv = [
        str(x) for k, (_, file, _, _) in enumerate(jobs) for x in (file, tmp_path / f"theirs-{k}")
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(PYTHON), "-c", RUNNER, *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = []
    for k, (name, _, ours, tolerance) in enumerate(jobs):
        with Checkpoint.open(ours) as a, Checkpoint.open(tmp_path / f"theirs-{k}") as b:
            assert set(a.tensors) == set(b.tensors), name
            for tensor in sorted(a.tensors):
                x, y = a.read(tensor), b.read(tensor)
                assert x.dtype == y.dtype == torch.float32, (name, tensor)
                diff = float((x.double() - y.double()).abs().max())
                if diff > tolerance:
                    failures.append(f"{name} {tensor}: max |diff| {diff:.3g} > {tolerance}")
    assert not failures, "\n".join(failures)
