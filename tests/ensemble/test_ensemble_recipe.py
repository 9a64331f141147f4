"""Ensemble recipes: every problem at once, and every shipped example is valid and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alloy import Ensemble
from alloy.ensemble import load_ensemble_recipe
from alloy.errors import RecipeError
from alloy.lab.tiny import build_tiny

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "ensemble").glob("*.yaml"))
PLACEHOLDER = "runs/lab/family/demo/"


def test_all_problems_reported_at_once(lively: dict[str, Path]) -> None:
    recipe = {
        "rule": "proxy_tuning",
        "parameters": {"alpah": 2},
        "members": [
            {"model": str(lively["a"]), "role": "base", "weight": 0.5},
            {"model": str(lively["b"]), "role": "expret"},
            {"model": "no/such/folder", "role": "anti_expert", "filters": {"top_q": 0.9}},
        ],
        "sampling": {"max_new_token": 3, "top_p": 1.5, "do_sample": True},
    }
    with pytest.raises(RecipeError) as error:
        load_ensemble_recipe(recipe)
    text = str(error.value)
    for expected in [
        "sampling.max_new_token: unknown key 'max_new_token' (did you mean 'max_new_tokens'?",
        "parameters.alpah: unknown parameter (did you mean 'alpha'?",
        "members.0.weight: proxy_tuning does not weight members",
        "members.1.role: unknown role 'expret' (did you mean 'expert'?",
        "needs exactly one 'expert' member, found 0",
        "members.2.model: no/such/folder: no config.json",
        "members.2.filters.top_q: unknown filter; did you mean 'top_p'?",
        "sampling.top_p: must be a number in (0, 1], got 1.5",
    ]:
        assert expected in text


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([{"weight": 0.5}, {"weight": 0.6}], "weights must sum to 1, got 1.1"),
        ([{"weight": -0.5}, {"weight": 1.5}], "linear needs weights >= 0"),
        ([{"weight": 1.0}, {}], "give every member a weight or none"),
        ([{"template": "no placeholder"}, {}], "has no {prompt}"),
        ([{"dropout": 0.1}, {}], "has no effect with samples: 1"),
        ([{"samples": 0}, {}], "greater than or equal to 1"),
    ],
)
def test_linear_member_problems(
    lively: dict[str, Path], members: list[dict[str, object]], message: str
) -> None:
    recipe = {"rule": "linear", "members": [{"model": str(lively["a"]), **m} for m in members]}
    with pytest.raises(RecipeError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_ensemble_recipe(recipe)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rule: linear\nrule: log_linear\nmembers: []\n")
    with pytest.raises(RecipeError, match="duplicate key 'rule'"):
        load_ensemble_recipe(path)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo family's folder layout, filled with tiny lively models."""
    root = tmp_path_factory.mktemp("family")
    names = ["small/base", "large/base", "large/experts/drama"] + [
        f"small/experts/{d}" for d in ("drama", "scripture", "fiction", "technical")
    ]
    for seed, name in enumerate(names):
        build_tiny("llama", root / name, seed=seed + 20, noise=0.5)
    return root


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"linear", "log_linear", "proxy_tuning", "dexperts"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, demo_like: Path) -> None:
    load_ensemble_recipe(example, check_paths=False)
    recipe = yaml.safe_load(example.read_text().replace(PLACEHOLDER, f"{demo_like}/"))
    ensemble = Ensemble.from_recipe(recipe)
    out = ensemble.generate(["Once upon a time"], max_new_tokens=4)
    assert out[0].finish_reason in ("eos", "stop", "length")
