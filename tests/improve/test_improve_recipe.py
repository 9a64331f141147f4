"""Improve recipes: every problem reported at once, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.improve.conftest import loop_recipe

from alloy.cli.main import main
from alloy.errors import RecipeError
from alloy.improve import load_improve_recipe


def _problems(recipe: dict[str, object]) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        load_improve_recipe(recipe)
    return {p.where: f"{p.message} | {p.hint}" for p in caught.value.problems}


def test_every_problem_at_once_with_where_and_fix(loop_root: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\nnot json\n{"text": "no prompt"}\n')
    recipe = loop_recipe(
        loop_root,
        "rest",
        policy=str(tmp_path / "missing"),
        prompts={"path": str(prompts), "per_iteration": 5},
        sample={"k": 2, "tempreature": 0.5},
        score={"reward": [str(loop_root / "policy")]},
        select={"quantiles": [0.8, 0.5], "top_k": 1},
        monitor={"reward": [str(tmp_path / "nope")]},
        train={"objective": "dpo", "max_steps": 2, "model": "x"},
    )
    found = _problems(recipe)
    assert (
        "tempreature" in found["sample.tempreature"]
        and "temperature" in found["sample.tempreature"]
    )
    # The misspelt key is reported and the rest of the recipe still checked:
    assert "no config.json" in found["policy"]
    assert "invalid JSON" in found[f"{prompts}:2"]
    assert '"prompt"' in found[f"{prompts}:3"]
    assert "is not a reward model" in found["score.reward.0"]
    assert "does not use top_k" in found["select.top_k"]
    assert "increasing" in found["select"]
    assert "no config.json" in found["monitor.reward.0"]
    assert "set by the loop" in found["train.model"]
    assert "trains sft, not dpo" in found["train.objective"]


def test_method_specific_checks(loop_root: Path, tmp_path: Path) -> None:
    judge = tmp_path / "judge.txt"
    judge.write_text("Rate this: {response}")
    found = _problems(
        loop_recipe(
            loop_root,
            "self_reward",
            iterations=4,
            prompts={"path": str(loop_root / "prompts.jsonl"), "per_iteration": 2},
            sample={"k": 1, "template": "Q: nothing"},
            score={"judge": {"prompt": str(judge)}},
            agreement=str(loop_root / "prompts.jsonl"),
        )
    )
    assert "k >= 2" in found["sample.k"]
    assert "{prompt}" in found["sample.template"]
    assert "lacks {prompt}" in found["score.judge.prompt"]
    assert "need 8 prompts" in found["prompts.per_iteration"]
    assert "prompt/chosen/rejected" in found["agreement"]
    found = _problems(loop_recipe(loop_root, "rest", score=None))
    assert "needs a scorer" in found["score"]
    assert "exactly one" in found["select"]


def test_cli_exits_2_listing_the_problems_and_writes_nothing(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    recipe = loop_recipe(loop_root, "raft", policy="nowhere", sample={"k": 2}, select={"top_k": 3})
    path.write_text(yaml.safe_dump(recipe))
    assert main(["improve", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no config.json" in err and "keeps 3 of only 2 samples" in err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(path)]) == 2


def test_validate_accepts_a_good_recipe(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(loop_recipe(loop_root, "self_reward")))
    assert main(["validate", str(path)]) == 0
    assert "ok: self_reward loop" in capsys.readouterr().out
