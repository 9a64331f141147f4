"""Every shipped recipe under examples/ is valid and plans against real (tiny) checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alloy.lab.tiny import build_tiny
from alloy.merge.plan import plan_merge
from alloy.merge.recipe import load_recipe
from alloy.merge.registry import all_methods

MERGE_EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "merge").rglob("*.yaml"))
PLACEHOLDER = "runs/demo/family/"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    for seed, name in enumerate(["base", "ft-a", "ft-b", "ft-c"]):
        build_tiny("llama", root / name, seed=seed, layers=4)
    return root


def test_every_method_has_an_example() -> None:
    assert {p.stem for p in MERGE_EXAMPLES} >= set(all_methods())


@pytest.mark.parametrize("example", MERGE_EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_is_valid(example: Path) -> None:
    load_recipe(example)


@pytest.mark.parametrize("example", MERGE_EXAMPLES, ids=lambda p: p.stem)
def test_example_plans_against_models(example: Path, family: Path) -> None:
    text = example.read_text().replace(PLACEHOLDER, f"{family}/")
    plan = plan_merge(load_recipe(yaml.safe_load(text)))
    assert plan.jobs
