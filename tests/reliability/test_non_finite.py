"""NaN and infinity never pass silently: not in a recipe, a written model or a score."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alloy.cli.main import main
from alloy.lab.tiny import build_tiny


def _broken_copy(source: Path, folder: Path, name: str, value: float) -> Path:
    """A copy of `source` whose tensor `name` is `value` throughout (written bypassing alloy)."""
    shutil.copytree(source, folder)
    for file in folder.glob("*.safetensors"):
        state = load_file(file)
        if name in state:
            state[name] = torch.full_like(state[name], value)
            save_file(state, file, metadata={"format": "pt"})
            return folder
    raise AssertionError(f"{name} not in {source}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("non-finite")
    good = build_tiny("llama", root / "good", seed=3)
    norm = "model.norm.weight"
    return {
        "good": good,
        "nan": _broken_copy(good, root / "nan", "model.layers.0.mlp.down_proj.weight", torch.nan),
        # Finite weights whose outputs overflow: the final norm scaled to float32's limit.
        "overflow": _broken_copy(good, root / "overflow", norm, 3e38),
        "text": _text(root / "val.txt"),
    }


def _text(file: Path) -> Path:
    file.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return file


def test_eval_refuses_nan_weights_naming_the_tensor(models: dict[str, Path], capsys) -> None:
    assert main(["eval", str(models["nan"]), "--data", str(models["text"])]) == 2
    err = capsys.readouterr().err
    assert f"cannot evaluate {models['nan']}" in err
    assert "model.layers.0.mlp.down_proj.weight" in err and "NaN or infinite" in err


def test_eval_refuses_overflowing_scores(models: dict[str, Path], capsys) -> None:
    assert main(["eval", str(models["overflow"]), "--data", str(models["text"])]) == 2
    err = capsys.readouterr().err
    assert "outputs hold NaN or infinity" in err and str(models["overflow"]) in err
    assert "nan" not in capsys.readouterr().out


def test_eval_of_a_good_model_still_scores(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    assert (
        main(["eval", str(models["good"]), "--data", str(models["text"]), "--json", str(out)]) == 0
    )
    assert "NaN" not in out.read_text()


@pytest.mark.parametrize("which", ["nan", "overflow"])
def test_generate_refuses_non_finite_outputs(which: str, models: dict[str, Path], capsys) -> None:
    rc = main(["generate", str(models[which]), "-p", "the quick", "--max-new-tokens", "3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "next-token scores hold NaN or infinity" in err and str(models[which]) in err


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "1e39"])
def test_merge_weight_that_is_not_finite_is_refused_before_reading(
    bad: str, models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {models['good']}\n"
        f"    parameters: {{weight: {bad}}}\n  - model: {models['good']}\n"
        "    parameters: {weight: 1}\n"
    )
    for command in (["validate", str(recipe)], ["merge", str(recipe), str(tmp_path / "out")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "models[0].parameters.weight" in err and "finite" in err, err
    assert not (tmp_path / "out").exists()


def test_merge_whose_result_overflows_writes_nothing(
    models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    # Finite inputs and weights, but 3e38 * 2 overflows float32 in the output.
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["good"]),
        "models": [{"model": str(models["overflow"]), "parameters": {"weight": 2.0}}],
        "dtype": "float32",
    }
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["merge", str(file), str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
