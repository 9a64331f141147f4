"""Recipe parsing and validation: mergekit's format, its parameter semantics, and every error."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.errors import RecipeError
from alloy.merge import registry
from alloy.merge.recipe import load_recipe, resolve_setting
from alloy.merge.registry import REQUIRED, MethodSpec, Param

# Throw-away methods shaped like the real ones, under names no real method will take.
_PARAMS = {
    "fake_ties": [
        Param("weight", "weight", float, REQUIRED, per_model=True),
        Param("density", "density", float, 1.0, per_model=True),
        Param("normalize", "normalize", bool, True, per_model=False),
        Param("lambda", "lambda_", float, 1.0, per_model=False),
        Param("election", "election", str, "sum", False, choices=("sum", "count")),
        Param("top_k", "top_k", int, 8, per_model=False),
    ],
    "fake_linear": [
        Param("weight", "weight", float, REQUIRED, per_model=True),
        Param("normalize", "normalize", bool, True, per_model=False),
    ],
    "fake_slerp": [Param("t", "t", float, REQUIRED, per_model=False)],
}
_SHAPE: dict[str, tuple[Any, int, int | None]] = {
    "fake_ties": ("required", 1, None),
    "fake_linear": ("none", 1, None),
    "fake_slerp": ("required", 1, 1),
}


def _unused(models: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    raise AssertionError("recipes never call methods")


@pytest.fixture(autouse=True)
def fake_methods() -> Iterator[None]:
    registry.all_methods()  # import the real methods first so they cannot clash later
    for name, params in _PARAMS.items():
        base, low, high = _SHAPE[name]
        registry.METHODS[name] = MethodSpec(
            name, _unused, {p.name: p for p in params}, base, low, high, "https://x", name
        )
    yield
    for name in _PARAMS:
        del registry.METHODS[name]


TIES = """\
# mergekit's README example, with parameter names of fake_ties
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: fake_ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  lambda: 1e-1
dtype: float16
"""

SLICES = """\
merge_method: fake_ties
base_model: base
parameters: {weight: 0.1, density: 0.9}
slices:
  - sources:
      - {model: base, layer_range: [0, 4]}
      - model: a
        layer_range: [0, 4]
        parameters: {weight: [{filter: mlp, value: 0.7}]}
      - {model: b, layer_range: [4, 8]}
    parameters: {weight: 0.3}
  - sources:
      - {model: base, layer_range: [4, 8]}
      - {model: b, layer_range: [4, 8], parameters: {weight: 0.8}}
"""


def _problems(source: Any) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(source)
    return [str(problem) for problem in caught.value.problems]


def test_mergekit_ties_recipe_parses() -> None:
    recipe = load_recipe(TIES)
    assert recipe.method.name == "fake_ties"
    assert recipe.dtype == "float16"
    assert recipe.base_for() == "TheBloke/Llama-2-13B-fp16"
    assert recipe.model_paths() == [
        "TheBloke/Llama-2-13B-fp16",
        "psmathur/orca_mini_v3_13b",
        "garage-bAInd/Platypus2-13B",
        "WizardLM/WizardMath-13B-V1.0",
    ]
    assert recipe.parameters == {"normalize": True, "lambda": 0.1}  # 1e-1 read as a number


@pytest.mark.parametrize(
    ("t", "expected"), [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75), (1.0, 0.5)]
)
def test_gradient_interpolates(t: float, expected: float) -> None:
    """[0, 1, 0.5] spans t in [0, 1] with knots at 0, 0.5, 1; scaled = 2t.

    t=0.25: scaled 0.5 -> 0.5*0 + 0.5*1 = 0.5;  t=0.75: scaled 1.5 -> 0.5*1 + 0.5*0.5 = 0.75;
    t=1: scaled 2, i0 = i1 = 2 -> 0.5.
    """
    assert resolve_setting([0, 1, 0.5], "any", t) == expected


def test_non_numeric_lists_pick_by_depth() -> None:
    """values[int(t * (len - 1))]: t=0.6 over 3 values -> int(1.2) = 1; t=0.49 over 2 -> 0."""
    assert resolve_setting(["a", "b", "c"], "x", 0.6) == "b"
    assert resolve_setting(["a", "b", "c"], "x", 1.0) == "c"
    assert resolve_setting([True, False], "x", 0.49) is True


def test_filters_take_the_first_match() -> None:
    """mlp -> 0.5; self_attn -> gradient [0, 1] at t=0.25 -> 0.25; anything else -> 0."""
    setting = [
        {"filter": "mlp", "value": 0.5},
        {"filter": "self_attn", "value": [0, 1]},
        {"value": 0},
        {"filter": "never", "value": 9},
    ]
    assert resolve_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.5
    assert resolve_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.25) == 0.25
    assert resolve_setting(setting, "model.embed_tokens.weight", 0.25) == 0
    assert resolve_setting({"filter": "*", "value": 3}, "lm_head.weight", 0) == 3
    assert resolve_setting({"filter": "mlp", "value": 3}, "lm_head.weight", 0) is None
    assert resolve_setting([], "lm_head.weight", 0) is None


def test_precedence_in_slices() -> None:
    """Source > slice > top-level > default, falling through when a filter does not match."""
    recipe = load_recipe(SLICES)

    def weight(model: str, tensor: str, slice_index: int) -> Any:
        return recipe.parameter(
            "weight", model=model, tensor_name=tensor, t=0.5, slice_index=slice_index
        )

    assert weight("a", "layers.0.mlp.down_proj.weight", 0) == 0.7  # its source's filter
    assert weight("a", "layers.0.self_attn.o_proj.weight", 0) == 0.3  # no match: the slice's
    assert weight("b", "layers.0.mlp.down_proj.weight", 0) == 0.3
    assert weight("b", "layers.0.mlp.down_proj.weight", 1) == 0.8
    assert weight("base", "layers.0.mlp.down_proj.weight", 1) == 0.1  # top-level
    get = recipe.parameter
    assert get("density", model="a", tensor_name="x", t=0, slice_index=0) == 0.9
    assert get("normalize", model=None, tensor_name="x", t=0, slice_index=0) is True  # default
    assert recipe.model_paths() == ["base", "a", "b"]
    with pytest.raises(ValueError, match="slice_index"):
        get("density", model="a", tensor_name="x", t=0)


def test_precedence_with_models_and_required_sentinel() -> None:
    """Gradient [0, 0.3, 0.7, 1] at t=0.5: scaled 1.5 -> 0.5*0.3 + 0.5*0.7 = 0.5."""
    recipe = load_recipe(TIES)
    get = recipe.parameter
    assert get("weight", model="garage-bAInd/Platypus2-13B", tensor_name="x", t=0.5) == 0.5
    assert get("weight", model="WizardLM/WizardMath-13B-V1.0", tensor_name="a.mlp", t=0) == 0.5
    assert get("weight", model="TheBloke/Llama-2-13B-fp16", tensor_name="x", t=0) is REQUIRED
    assert get("density", model="TheBloke/Llama-2-13B-fp16", tensor_name="x", t=0) == 1.0
    assert get("top_k", model=None, tensor_name="x", t=0) == 8
    assert get("lambda", model=None, tensor_name="x", t=0) == 0.1


def test_int_gradients_round() -> None:
    """top_k: [2, 5] at t=0.5 interpolates to 3.5, which rounds (half to even) to 4."""
    recipe = load_recipe(
        {
            "merge_method": "fake_ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"weight": 1}}],
            "parameters": {"top_k": [2, 5]},
        }
    )
    assert recipe.parameter("top_k", model=None, tensor_name="x", t=0.5) == 4
    assert recipe.parameter("weight", model="a", tensor_name="x", t=0.5) == 1.0


LINEAR = "merge_method: fake_linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
SLERP = "merge_method: fake_slerp\nbase_model: b\nparameters: {t: 0.5}\nmodels:\n  - model: a\n"


# (YAML path of the problem, recipe, part of the message); each recipe has one thing wrong.
ERRORS = [
    ("merge_method", TIES.replace("fake_ties", "fake_tiez"), "did you mean 'fake_ties'?"),
    ("merge_method", TIES.replace("fake_ties", "nope"), "fake_linear, fake_slerp, fake_ties"),
    ("base_modle", LINEAR + "base_modle: a\n", "unknown key 'base_modle' (did you mean 'base_"),
    ("models[0].paramters", LINEAR.replace("parameters:", "paramters:"), "did you mean 'param"),
    ("tokenizer", LINEAR + "tokenizer: {source: union}\n", "supported by mergekit, not yet by"),
    ("chat_template", LINEAR + "chat_template: chatml\n", "supported by mergekit, not yet by"),
    ("modules", LINEAR + "modules: {}\n", "'modules' is supported by mergekit, not yet by alloy"),
    ("slices[1].residual_weight", SLICES + "    residual_weight: 0.5\n", "not yet by alloy"),
    (
        "models[1].parameters.densty",
        TIES.replace("density: 0.5", "densty: 0.5"),
        "fake_ties has no parameter 'densty' (did you mean 'density'?",
    ),
    (
        "models[0].parameters.normalize",
        LINEAR.replace("weight: 1", "weight: 1, normalize: false"),
        "'normalize' is shared by all models (move it to parameters)",
    ),
    (
        "slices[1].sources[1].parameters.lambda",
        SLICES.replace("{weight: 0.8}", "{weight: 0.8, lambda: 2}"),
        "shared by all models (move it to slices[1].parameters)",
    ),
    ("parameters.normalize", LINEAR + "parameters: {normalize: 1}\n", "takes true or false"),
    ("parameters.normalize", LINEAR + "parameters: {normalize: [0, 1]}\n", "gradients are for"),
    ("models[0].parameters.weight", LINEAR.replace("1}", "heavy}"), "takes a number, got 'heavy'"),
    ("parameters.election", TIES.replace("lambda: 1e-1", "election: 3"), "takes a string, got 3"),
    ("parameters.election", TIES.replace("lambda: 1e-1", "election: most"), "one of sum, count"),
    ("parameters.top_k", TIES.replace("lambda: 1e-1", "top_k: 2.5"), "takes an integer, got 2.5"),
    (
        "models[2].parameters.weight[0].fliter",
        TIES.replace("- filter: mlp", "- fliter: mlp"),
        "unknown key (did you mean 'filter'?",
    ),
    (
        "models[2].parameters.weight[1]",
        TIES.replace("value: 0\n", "valu: 0\n"),
        "a condition needs a `value`",
    ),
    (
        "models[0].parameters.weight.value",
        TIES.replace("weight: 1.0", "weight: {filter: mlp, value: [{value: 1}]}"),
        "expected a value or a list, got [{'value': 1}]",
    ),
    (
        "models[0].parameters.weight",
        TIES.replace("weight: 1.0", "weight: [1, {value: 1}]"),
        "expected a value, a list or {filter, value} entries",
    ),
    (
        "models[0]",
        TIES.replace("      weight: 1.0\n", ""),
        "model 'psmathur/orca_mini_v3_13b' has no 'weight', which fake_ties requires",
    ),
    ("parameters", SLERP.replace("{t: 0.5}", "{}"), "fake_slerp needs parameter 't'"),
    ("base_model", TIES.replace("base_model:", "#"), "fake_ties needs a base model"),
    ("base_model", LINEAR + "base_model: c\n", "uses no base model, and 'c' is not merged"),
    ("models", SLERP + "  - model: c\n", "merges exactly 1 model besides the base, got 2"),
    ("models", SLERP.replace("model: a", "model: b"), "exactly 1 model besides the base, got 0"),
    (
        "slices[0].sources[1].layer_range",
        SLICES.replace("layer_range: [0, 4]\n", "layer_range: [3, 1]\n"),
        "[3, 1] is not [start, end) with 0 <= start < end",
    ),
    (
        "slices[0].sources[2].layer_range",
        SLICES.replace("{model: b, layer_range: [4, 8]}\n", "{model: b, layer_range: [-4, 0]}\n"),
        "[-4, 0] is not [start, end)",
    ),
    (
        "slices[0].sources",
        SLICES.replace("{model: b, layer_range: [4, 8]}\n", "{model: b, layer_range: [4, 9]}\n"),
        "sources span different numbers of layers [4, 5]",
    ),
    (
        "slices[0].sources[0].layer_range",
        SLICES.replace("[0, 4]}", "[0, 4, 8]}", 1),
        "List should have at most 2 items",
    ),
    (
        "base_model",
        SLICES.replace("{model: base, layer_range: [4, 8]}", "{model: c, layer_range: [4, 8]}"),
        "base model 'base' is not among the sources",
    ),
    ("models", "merge_method: fake_linear\nmodels: []\n", "is empty"),
    ("slices", "merge_method: fake_linear\nslices: []\n", "is empty"),
    ("models[0].model", LINEAR.replace("model: a", "model: ''"), "at least 1 character"),
    ("", LINEAR + "slices: []\n", "a recipe needs exactly one of `models` and `slices`"),
    ("", "merge_method: fake_linear\n", "a recipe needs exactly one of `models` and `slices`"),
    ("merge_method", "models: []\n", "required key is missing"),
    ("tokenizer_source", LINEAR + "tokenizer_source: union\n", "does not merge vocabularies"),
    ("dtype", LINEAR + "dtype: fp8\n", "'float32', 'float16', 'bfloat16' or 'float64', got 'fp8'"),
    ("seed", LINEAR + "seed: '3'\n", "Input should be a valid integer"),
    (
        "models",
        LINEAR + "  - {model: a, parameters: {weight: 2}}\n",
        "'a' is listed more than once",
    ),
]


@pytest.mark.parametrize(("where", "text", "expected"), ERRORS, ids=[e[0] or "-" for e in ERRORS])
def test_errors_name_the_yaml_path(where: str, text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(text)
    found = [str(p) for p in caught.value.problems if p.where == where and expected in str(p)]
    assert len(found) == 1, caught.value


def test_all_problems_are_reported_at_once() -> None:
    text = (
        TIES.replace("density: 0.5", "densty: 0.5")
        .replace("normalize: true", "normalize: yes please")
        .replace("base_model:", "base_modle:")
    )
    problems = _problems(text)
    wheres = [p.split(":")[0] for p in problems]
    assert "models[1].parameters.densty" in wheres
    assert "parameters.normalize" in wheres
    assert "base_modle" in wheres  # the unknown key is reported...
    assert "base_model" in wheres  # ...and the recipe still checked without it
    assert len(problems) == 4, problems


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: fake_linear\nmodels:\n  - model: [a\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:4:1: invalid YAML")):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"<text>:2:1: invalid YAML: duplicate key 'models'"):
        load_recipe("models: []\nmodels: []\n")


def test_sources_path_text_and_mapping(tmp_path: Path) -> None:
    path = tmp_path / "linear.yaml"
    path.write_text(LINEAR)
    expected = load_recipe(LINEAR)
    assert load_recipe(path) == expected
    assert load_recipe(str(path)) == expected
    parsed = {
        "merge_method": "fake_linear",
        "models": [{"model": "a", "parameters": {"weight": 1}}],
    }
    assert load_recipe(parsed) == expected
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="a recipe must be a mapping"):
        load_recipe("- just a list")


@pytest.mark.parametrize(
    "text", [TIES, SLICES, SLERP + "name: my merge\nseed: 3\nout_dtype: bfloat16\n"]
)
def test_to_yaml_round_trips(text: str) -> None:
    recipe = load_recipe(text)
    again = recipe.to_yaml()
    assert load_recipe(again) == recipe
    assert load_recipe(again).to_yaml() == again


def test_to_yaml_writes_gradients_inline() -> None:
    text = load_recipe(TIES).to_yaml()
    assert "density: [1, 0.7, 0.1]" in text
    assert "- filter: mlp" in text


def test_a_bad_value_does_not_hide_other_problems() -> None:
    """dtype 'bf16' fails the schema; the recipe is still checked without it, so the misspelt
    parameter and the missing weight are reported in the same error."""
    text = (
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n"
        "      densty: 0.5\ndtype: bf16\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    wheres = [p.where for p in err.value.problems]
    assert "dtype" in wheres
    assert "models[0].parameters.densty" in wheres
    assert any("no 'weight'" in p.message for p in err.value.problems)
    assert any(p.hint and "bfloat16" in p.hint for p in err.value.problems)


# mergekit 0.1.5 reads past these (its schema has no such key, or the method does not declare
# the parameter): alloy ignores them too, with one warning per occurrence naming its YAML path.
def test_what_mergekit_tolerates_is_a_warning_naming_each_one() -> None:
    text = (
        SLERP.replace("{t: 0.5}", "{t: 0.5, weight: 0.3}")
        .replace("  - model: a\n", "  - model: a\n    layer_range: [0, 2]\n")
        .replace("    layer_range", "    parameters: {density: 0.5}\n    layer_range")
    ) + "input_model_parameters: {a: {weight: 1}}\n"
    recipe = load_recipe(text)
    assert recipe.warnings == [
        "input_model_parameters: ignored, as mergekit ignores it (mergekit's README names it, "
        "but its recipe schema has no such key; give per-model parameters under "
        "models[i].parameters)",
        "models[0].layer_range: ignored, as mergekit ignores it (a layer range applies only to "
        "slice sources; use `slices:` to take layers)",
        "parameters.weight: fake_slerp does not use 'weight' (breadcrumbs, breadcrumbs_ties, "
        "dare_linear, ... do); ignored, as mergekit ignores it",
        "models[0].parameters.density: fake_slerp does not use 'density' (breadcrumbs, "
        "breadcrumbs_ties, dare_linear, ... do); ignored, as mergekit ignores it",
    ]
    # ignored means ignored: the recipe resolves as if they were not there
    assert recipe.parameter("t", model=None, tensor_name="x", t=0.0) == 0.5
    assert recipe.models is not None and recipe.models[0].parameters == {"density": 0.5}
    assert "input_model_parameters" not in recipe.to_yaml()
    assert "layer_range" not in recipe.to_yaml()
    assert load_recipe(SLERP).warnings == []


def test_a_name_no_method_takes_stays_an_error_with_a_did_you_mean() -> None:
    problems = _problems(SLERP.replace("{t: 0.5}", "{t: 0.5, wieght: 0.3}"))
    assert problems == [
        "parameters.wieght: fake_slerp has no parameter 'wieght' (fake_slerp takes: t)"
    ]
    problems = _problems(SLERP.replace("{t: 0.5}", "{tt: 0.5}"))
    assert any("did you mean 't'?" in p for p in problems)
    # a tolerated key in a place mergekit does not tolerate it is still unknown
    problems = _problems(LINEAR + "layer_range: [0, 2]\n")
    assert problems == [
        "layer_range: unknown key 'layer_range' (allowed keys: base_model, dtype, merge_method, "
        "models, name, out_dtype, parameters, seed, slices, tokenizer_source)"
    ]
