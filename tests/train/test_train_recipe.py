"""Training recipes: every problem at once, with its YAML path and a did-you-mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alloy.cli.main import main
from alloy.errors import RecipeError
from alloy.train.recipe import load_train_recipe


def _recipe(tiny_llama: Path, data_dir: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "model": str(tiny_llama),
        "data": [str(data_dir / "docs.jsonl")],
        "schedule": {"name": "cosine", "lr": 1e-3, "warmup": 2},
        "max_steps": 4,
        "batch_size": 4,
        "sequence_length": 32,
    }
    recipe.update(changes)
    return {k: v for k, v in recipe.items() if v is not None}


def _problems(recipe: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_train_recipe(recipe)
    return [str(p) for p in info.value.problems]


def test_valid_recipe_and_shorthands(tiny_llama: Path, data_dir: Path) -> None:
    recipe = load_train_recipe(_recipe(tiny_llama, data_dir))
    assert recipe.spec.model.path == str(tiny_llama)
    assert recipe.spec.data[0].path == str(data_dir / "docs.jsonl")
    replay = {"data": str(data_dir / "old.jsonl"), "fraction": 0.1}
    assert load_train_recipe(_recipe(tiny_llama, data_dir, replay=replay)).spec.replay


def test_unknown_keys_everywhere_with_did_you_mean(tiny_llama: Path, data_dir: Path) -> None:
    recipe = _recipe(
        tiny_llama,
        data_dir,
        max_step=3,
        data=[{"path": str(data_dir / "docs.jsonl"), "wieght": 2}],
        schedule={"name": "cosine", "lr": 1e-3, "warmpu": 2},
        optimizer={"name": "adamw", "weight_decay": 0.1, "beta": [0.9, 0.95]},
        eval={"data": [str(data_dir / "docs.jsonl")], "evry": 5},
    )
    text = "\n".join(_problems(recipe))
    assert "max_step: unknown key 'max_step' (did you mean 'max_steps'?" in text
    assert "data.0.wieght: unknown key 'wieght' (did you mean 'weight'?" in text
    assert "optimizer.beta: unknown key 'beta' (did you mean 'betas'?" in text
    assert "eval.evry: unknown key 'evry' (did you mean 'every'?" in text
    assert "schedule.warmpu: unknown parameter (did you mean 'warmup'?" in text


def test_cross_checks(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(
        tiny_llama,
        data_dir,
        objective="distil",
        model=str(tmp_path / "nowhere"),
        data=[{"path": str(tmp_path / "missing.jsonl")}, {"corpus": "drama", "path": "x"}],
        schedule={"name": "infinite", "lr": -1.0, "constant_lr": 1e-4, "anneal": 5},
        max_tokens=1000,
        replay={"data": [str(data_dir / "old.jsonl")], "fraction": 1.5},
        teacher={"model": str(tiny_llama), "loss": "reverse_kl", "top_k": 5},
        batch_size=6,
        micro_batch_size=4,
        device="tpu",
    )
    problems = "\n".join(_problems(recipe))
    assert "replay.fraction: Input should be less than 1" in problems
    # the schema problem stops the cross checks; fix it and the rest show up together
    recipe["replay"]["fraction"] = 0.5
    problems = "\n".join(_problems(recipe))
    for expected in [
        "objective: unknown objective 'distil' (did you mean 'distill'?",
        "max_steps: give exactly one of max_steps, max_tokens, epochs (max_steps, max_tokens)",
        "micro_batch_size: 4 does not divide batch_size 6",
        f"model.path: {tmp_path / 'nowhere'}: no config.json",
        "schedule.lr: must be > 0",
        "schedule.min_lr: an exponential anneal needs min_lr > 0",
        f"data.0.path: {tmp_path / 'missing.jsonl'}: not found",
        "data.1: give path or corpus (exactly one)",
        "teacher.top_k: reverse_kl needs the teacher's full distribution",
        "device: unknown device 'tpu'",
    ]:
        assert expected in problems, expected


def test_objective_and_teacher_agree(tiny_llama: Path, data_dir: Path) -> None:
    assert "teacher: distill needs a teacher" in "\n".join(
        _problems(_recipe(tiny_llama, data_dir, objective="distill"))
    )
    teacher = {"model": str(tiny_llama)}
    assert "teacher: causal_lm does not use a teacher" in "\n".join(
        _problems(_recipe(tiny_llama, data_dir, teacher=teacher))
    )


def test_averaging_options_are_checked(tiny_llama: Path, data_dir: Path) -> None:
    problems = _problems(_recipe(tiny_llama, data_dir, averaging={"ema": {"decay": 1.5}}))
    assert any("averaging.ema.decay: must be in [0, 1)" in p for p in problems)


def test_cli_exits_2_naming_the_key(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_llama, data_dir, sequence_lenght=16)))
    assert main(["train", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sequence_lenght" in err and "did you mean 'sequence_length'" in err
    assert not (tmp_path / "out").exists()
    # --set overrides reach the recipe and are validated like it
    path.write_text(yaml.safe_dump(_recipe(tiny_llama, data_dir)))
    assert main(["train", str(path), "--dry-run", "--set", "schedule.lr=-1"]) == 2
    assert "schedule.lr: must be > 0" in capsys.readouterr().err
