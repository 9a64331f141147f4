"""`alloy validate` finds every problem `alloy merge` would, with the same message, reading no data.

Each case is one thing wrong with a recipe over real (tiny) checkpoints; `merge` must refuse it
before writing anything, and `validate` alone must say exactly the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.io import Checkpoint, save_state_dict
from alloy.lab.tiny import build_tiny


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validate-family")
    base = build_tiny("llama", root / "base", seed=1)
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt}
    folders = {"base": base}
    for k, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(10 + k)
        tuned = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        folders[name] = save_state_dict(tuned, root / name, donor=base)
    folders["vocab"] = build_tiny("llama", root / "vocab", seed=2, vocab_size=120)
    folders["mistral"] = build_tiny("mistral", root / "mistral", seed=3)
    return folders


def _ties(f: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(f["b"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any], dict[str, Path]], None]:
    def edit(recipe: dict[str, Any], f: dict[str, Path]) -> None:
        *parents, last = path.split(".")
        node: Any = recipe
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value(f) if callable(value) else value

    return edit


# (id, edit of the TIES recipe, the method to use instead of ties or None, part of the message)
CASES: list[tuple[str, Callable[[dict[str, Any], dict[str, Path]], None], str | None, str]] = [
    ("unknown-key", _set("models.0.parameters.densty", 0.5), None, "densty"),
    (
        "missing-model",
        _set("models.1.model", lambda f: str(f["base"].parent / "nowhere")),
        None,
        "nowhere",
    ),
    ("nan-weight", _set("models.0.parameters.weight", float("nan")), None, "finite"),
    ("inf-weight", _set("models.0.parameters.weight", float("inf")), None, "finite"),
    ("density-below-0", _set("models.0.parameters.density", -0.1), None, "[0, 1]"),
    ("density-above-1", _set("models.1.parameters.density", 1.5), None, "[0, 1]"),
    ("density-gradient", _set("models.1.parameters.density", [0.2, 1.4]), None, "[0, 1]"),
    ("dare-density", _set("models.0.parameters.density", 2.0), "dare_ties", "[0, 1]"),
    ("breadcrumbs-gamma", _set("models.0.parameters.gamma", -0.5), "breadcrumbs", "gamma"),
    ("della-epsilon", _set("models.0.parameters.epsilon", 0.9), "della", "epsilon"),
    (
        "zero-sum-weights",
        _set("models.1.parameters.weight", -1.0),
        "linear",
        "sum",
    ),
    ("vocabulary", _set("models.1.model", lambda f: str(f["vocab"])), None, "vocabular"),
    ("architecture", _set("models.1.model", lambda f: str(f["mistral"])), None, "mistral"),
    ("unknown-method", _set("merge_method", "tiez"), "tiez", "did you mean 'ties'"),
    ("dtype", _set("dtype", "fp8"), None, "fp8"),
    ("slerp-two-models", _set("parameters", {"t": 0.5}), "slerp", "exactly 1 model"),
    ("lambda-nan", _set("parameters", {"lambda": float("nan")}), None, "lambda"),
]


def _recipe(
    f: dict[str, Path], edit: Callable[..., None], method: str | None, tmp_path: Path
) -> Path:
    recipe = copy.deepcopy(_ties(f))
    if method is not None:
        recipe["merge_method"] = method
    if method == "linear":
        del recipe["base_model"]
        for m in recipe["models"]:
            m["parameters"] = {"weight": m["parameters"]["weight"]}
        recipe["models"][0]["parameters"]["weight"] = 1.0
    edit(recipe, f)
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return file


def _error(err: str) -> str:
    """The error block of stderr (warnings before it are not part of the comparison)."""
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return "\n".join(lines[first:])


@pytest.mark.parametrize(
    ("edit", "method", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validate_says_what_merge_says(
    edit: Callable[..., None],
    method: str | None,
    expected: str,
    family: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    file = _recipe(family, edit, method, tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(file), str(out), "-q"]) == 2
    merged = _error(capsys.readouterr().err)
    assert main(["validate", str(file)]) == 2
    validated = _error(capsys.readouterr().err)
    assert expected in merged, merged
    assert validated == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_the_unedited_recipe_is_valid(family: dict[str, Path], tmp_path: Path, capsys) -> None:
    file = _recipe(family, lambda recipe, f: None, None, tmp_path)
    assert main(["validate", str(file)]) == 0
    assert "ok" in capsys.readouterr().out
