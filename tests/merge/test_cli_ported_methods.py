"""`alloy merge RECIPE OUT` through the CLI entry point for each method ported from mergekit:
the output loads and equals, tensor by tensor, the method run on the inputs in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.io import Checkpoint, save_state_dict
from alloy.lab.tiny import build_tiny
from alloy.merge.registry import get_method

CASES: dict[str, tuple[list[str], bool, dict]] = {
    # method: (models, with base, shared parameters)
    "nearswap": (["a"], True, {"t": 0.005}),
    "ram": (["a", "b", "c"], True, {}),
    "ramplus_tl": (["a", "b", "c"], True, {"r": 0.5, "alpha": 0.9}),
    "multislerp": (["a", "b"], True, {}),
    "karcher": (["a", "b", "c"], False, {}),
    "sce": (["a", "b", "c"], True, {"select_topk": 0.5}),
    "arcee_fusion": (["a"], True, {}),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = build_tiny("llama", root / "base", seed=3, hidden_size=32, intermediate_size=64)
    paths = {"base": base}
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name).float() for name in ckpt}
    for k, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(40 + k)
        tuned = {
            n: x + 0.01 * (k + 1) * torch.randn(x.shape, generator=g) for n, x in state.items()
        }
        save_state_dict(tuned, root / name, donor=base, force=True)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("method", list(CASES))
def test_cli_merge_equals_the_method(method: str, family: dict[str, Path], tmp_path: Path) -> None:
    names, with_base, params = CASES[method]
    per_model = {"weight": 1.0} if method == "multislerp" else {}
    recipe = {
        "merge_method": method,
        **({"base_model": str(family["base"])} if with_base else {}),
        "models": [
            {"model": str(family[n]), **({"parameters": per_model} if per_model else {})}
            for n in names
        ],
        **({"parameters": params} if params else {}),
        "dtype": "float32",
    }
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    assert main(["merge", str(file), str(out), "-q"]) == 0
    spec = get_method(method)
    extra = {"weight": [1.0] * len(names)} if per_model else {}
    changed = 0
    with Checkpoint.open(out) as merged:
        inputs = [Checkpoint.open(family[n]) for n in names]
        base = Checkpoint.open(family["base"])
        try:
            for tensor in merged:
                models = [c.read(tensor).float() for c in inputs]
                b = base.read(tensor).float() if with_base else None
                expected = spec(models, base=b, **params, **extra)  # type: ignore[arg-type]
                got = merged.read(tensor)
                assert torch.equal(got, expected), (method, tensor)
                changed += int(not torch.equal(got, base.read(tensor).float()))
        finally:
            for c in [*inputs, base]:
                c.close()
    assert changed > 0
