"""MoE recipes: mergekit-moe recipes read as they are, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloy.errors import RecipeError
from alloy.moe.recipe import UPCYCLE_RELATIVE_NOISE, load_moe_recipe, upcycle_recipe

MERGEKIT = """
base_model: mistralai/Mistral-7B-Instruct-v0.2
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: teknium/OpenHermes-2.5-Mistral-7B
    positive_prompts: ["chat", "assistant"]
    negative_prompts: ["math"]
    noise_scale: 0.01
  - source_model: WizardLM/WizardMath-7B-V1.1
    positive_prompts: ["math", "reason step by step"]
    residual_scale: 0.5
"""


def test_mergekit_recipe_reads_as_is() -> None:
    recipe = load_moe_recipe(MERGEKIT)
    assert recipe.base == Path("mistralai/Mistral-7B-Instruct-v0.2")
    first, second = recipe.experts
    assert (first.name, first.positive, first.negative) == (
        "OpenHermes-2.5-Mistral-7B",
        ("chat", "assistant"),
        ("math",),
    )
    assert (first.noise_scale, first.relative_noise, first.residual_scale) == (0.01, 0.0, 1.0)
    assert (second.noise_scale, second.residual_scale) == (0.0, 0.5)
    assert (recipe.gate_mode, recipe.experts_per_token, recipe.dtype) == ("hidden", 2, "bfloat16")
    assert recipe.shared is None and recipe.architecture is None


def test_every_problem_at_once() -> None:
    text = """
base_model: base
gate_mode: hidden
experts_per_token: 3
expert_per_token: 2
experts:
  - source_model: a
    positive_prompts: ["x"]
  - source_model: b
    nois_scale: 0.1
shared_experts:
  - source_model: a
  - source_model: b
"""
    with pytest.raises(RecipeError) as caught:
        load_moe_recipe(text)
    message = str(caught.value)
    assert "expert_per_token" in message and "did you mean 'experts_per_token'" in message
    assert "experts.1.nois_scale" in message and "'noise_scale'" in message
    assert "experts.1.positive_prompts: hidden needs them" in message
    assert "3 experts per token but only 2 experts" in message
    assert "shared_experts: takes exactly one expert, got 2" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base_model: b\n", "experts: missing"),
        ("base_model: b\ngate_mode: learned\nnum_experts: 4\n", "gate_mode"),
        ("base_model: b\nnum_experts: 4\ngate_mode: hidden\n", "hidden needs prompts per expert"),
        ("base_model: b\nnum_experts: 4\nnoise_scale: -1\n", "greater than or equal to 0"),
        (
            "base_model: b\nexperts: [{source_model: a, positive_prompts: [x]},"
            " {source_model: c, positive_prompts: [x]}]\n",
            "every expert has the same prompts",
        ),
        (
            "base_model: b\ngate_mode: random\nexperts: [{source_model: a, name: n},"
            " {source_model: c, name: n}]\n",
            "'n' is also the name of expert 0",
        ),
        (
            "base_model: b\ngate_mode: random\narchitecture: mixtral\n"
            "experts: [{source_model: a}, {source_model: c}]\n"
            "shared_experts: [{source_model: a}]\n",
            "mixtral has no shared expert",
        ),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_recipe_errors(text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=r"invalid MoE recipe|must be a mapping") as caught:
        load_moe_recipe(text)
    assert expected in str(caught.value)


def test_default_names_are_distinct() -> None:
    text = "base_model: b\ngate_mode: random\nexperts: [{source_model: x/a}, {source_model: y/a},"
    text += " {source_model: z/b}, {source_model: z/b}, {source_model: q, name: b}]\n"
    names = [e.name for e in load_moe_recipe(text).experts]
    assert names == ["x/a", "y/a", "expert2", "expert3", "b"]


def test_sparse_upcycling_copies_the_base_with_relative_noise() -> None:
    recipe = upcycle_recipe("dense", 4, experts_per_token=1)
    assert [e.name for e in recipe.experts] == ["copy0", "copy1", "copy2", "copy3"]
    assert {e.source for e in recipe.experts} == {Path("dense")}
    assert {e.relative_noise for e in recipe.experts} == {UPCYCLE_RELATIVE_NOISE}
    assert recipe.gate_mode == "random" and recipe.experts_per_token == 1
    absolute = load_moe_recipe(
        "base_model: d\nnum_experts: 2\ngate_mode: random\nnoise_scale: 0.1\n"
    )
    assert {(e.noise_scale, e.relative_noise) for e in absolute.experts} == {(0.1, 0.0)}
