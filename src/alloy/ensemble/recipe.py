"""Ensemble recipes: YAML naming the members, the rule and its parameters, and the sampling.

    rule: proxy_tuning            # alloy rules lists them all
    parameters: {alpha: 1.0}
    members:
      - {model: large/base, role: base}
      - {model: small/experts/fiction, role: expert}
      - {model: small/base, role: anti_expert}
    sampling: {max_new_tokens: 64, do_sample: true, top_p: 0.9, seed: 0}

Member keys: model (folder), name, role (rules with roles), weight (linear / log_linear; default
uniform), template (a string containing {prompt}, or "chat" for the tokenizer's chat template),
filters (temperature, top_k, top_p, min_p, applied to this member before combining), samples and
pool and dropout (a dropout ensemble of one model), device, dtype. Everything is checked before any
model is loaded and every problem is reported at once, with its YAML path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from alloy.ensemble.decoder import Sampling
from alloy.ensemble.filters import check_filters
from alloy.ensemble.members import MemberSpec
from alloy.ensemble.rules import RULES, parameter_problems
from alloy.errors import ProblemCollector, RecipeError, did_you_mean
from alloy.io.yamlfile import StrictModel, read_recipe, validate_schema

Number = float | int


_Strict = StrictModel


class MemberEntry(_Strict):
    model: str
    name: str | None = None
    role: str | None = None
    weight: Number | None = None
    template: str | None = None
    filters: dict[str, Number] = Field(default_factory=dict)
    samples: int = Field(default=1, ge=1)
    pool: Literal["linear", "log_linear"] = "linear"
    dropout: Number | None = Field(default=None, ge=0, lt=1)
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SamplingEntry(_Strict):
    max_new_tokens: int = Field(default=64, ge=1)
    do_sample: bool = False
    temperature: Number | None = None
    top_k: int | None = None
    top_p: Number | None = None
    min_p: Number | None = None
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: Number | None = Field(default=None, gt=0)


class EnsembleRecipe(_Strict):
    """A validated ensemble recipe; build it with `load_ensemble_recipe`."""

    name: str | None = None
    rule: str
    parameters: dict[str, Number] = Field(default_factory=dict)
    members: list[MemberEntry] = Field(min_length=1)
    sampling: SamplingEntry = Field(default_factory=SamplingEntry)
    device: str | None = None
    layers: str | list[int] | None = None  # dola: low | high | [0, 4, 8] (default high)

    def member_specs(self) -> list[MemberSpec]:
        """The members in the rule's role order, with weights filled in (uniform by default)."""
        spec = RULES[self.rule]
        members = list(self.members)
        roles = spec.roles
        if roles is not None:
            members.sort(key=lambda m: roles.index(str(m.role)))
        uniform = 1.0 / len(members)
        return [
            MemberSpec(
                model=m.model,
                name=m.name,
                role=m.role,
                weight=(m.weight if m.weight is not None else uniform) if spec.weighted else None,
                template=m.template,
                filters={k: v for k, v in m.filters.items()},
                samples=m.samples,
                pool=m.pool,
                dropout=m.dropout,
                device=m.device,
                dtype=m.dtype,
            )
            for m in members
        ]

    def rule_parameters(self) -> dict[str, float]:
        return {**RULES[self.rule].params, **{k: float(v) for k, v in self.parameters.items()}}

    def to_sampling(self) -> Sampling:
        s = self.sampling
        return Sampling(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.do_sample,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            seed=s.seed,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            repetition_penalty=None
            if s.repetition_penalty is None
            else float(s.repetition_penalty),
        )


_NESTED: dict[str, type[_Strict]] = {"members": MemberEntry, "sampling": SamplingEntry}


def is_recipe_path(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith((".yaml", ".yml"))


def load_ensemble_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], *, check_paths: bool = True
) -> EnsembleRecipe:
    """Read and check an ensemble recipe (a YAML path, YAML text or a parsed mapping);
    `check_paths=False` skips checking that each member folder exists.

    Raises:
        RecipeError: with every problem found, each with its YAML path.
    """
    raw, origin = read_recipe(source, "ensemble recipe", "rule:, members:, ...")
    problems = ProblemCollector()
    recipe = validate_schema(raw, EnsembleRecipe, _NESTED, problems)
    if recipe is None:
        problems.raise_if_any(RecipeError, f"invalid ensemble recipe ({origin})")
        raise AssertionError("schema validation failed without a problem")
    for where, message, hint in _issues(recipe, check_paths):
        problems.add(where, message, hint)
    problems.raise_if_any(RecipeError, f"invalid ensemble recipe ({origin})")
    return recipe


def _issues(recipe: EnsembleRecipe, check_paths: bool) -> list[tuple[str, str, str | None]]:
    from alloy.adapters import split_spec  # a member may be BASE+ADAPTER

    issues: list[tuple[str, str, str | None]] = []
    spec = RULES.get(recipe.rule)
    if spec is None:
        hint = did_you_mean(recipe.rule, RULES, "rules")
        return [("rule", f"unknown rule {recipe.rule!r}", hint)]
    for key, message, advice in parameter_problems(spec, recipe.parameters):
        issues.append((f"parameters.{key}", message, advice))
    members = recipe.members
    issues += _layer_issues(recipe, check_paths)  # dola: one member, no role or weight
    if spec.roles is not None:
        roles = [m.role for m in members]
        for i, m in enumerate(members):
            if m.role is None:
                issues.append((f"members.{i}", "needs a role", f"{spec.name} takes {spec.roles}"))
            elif m.role not in spec.roles:
                hint = did_you_mean(m.role, spec.roles, "roles")
                issues.append((f"members.{i}.role", f"unknown role {m.role!r}", hint))
            if m.weight is not None:
                issues.append((f"members.{i}.weight", f"{spec.name} does not weight members", None))
        for role in spec.roles:
            if roles.count(role) != 1:
                found = f"needs exactly one {role!r} member, found {roles.count(role)}"
                issues.append(("members", found, None))
    elif spec.weighted:
        issues += _weight_issues(recipe)
    for i, m in enumerate(members):
        if check_paths and not (split_spec(m.model)[0] / "config.json").is_file():
            hint = "a Hugging Face model folder (paths are relative to the working directory)"
            issues.append((f"members.{i}.model", f"{m.model}: no config.json", hint))
        for key, message in check_filters(m.filters):
            issues.append((f"members.{i}.filters.{key}", message, None))
        if m.template is not None and m.template != "chat" and "{prompt}" not in m.template:
            issues.append((f"members.{i}.template", "has no {prompt}", 'or use "chat"'))
        if m.samples == 1 and m.dropout is not None:
            hint = "set samples: 4 (say) for a dropout ensemble"
            issues.append((f"members.{i}.dropout", "has no effect with samples: 1", hint))
    s = recipe.sampling
    warpers = recipe.to_sampling().warpers()
    for key, message in check_filters(warpers):
        issues.append((f"sampling.{key}", message, None))
    if any(not stop for stop in s.stop):
        issues.append(("sampling.stop", "an empty stop string stops at once", None))
    if warpers and not s.do_sample and set(warpers) != {"temperature"}:
        message = "top_k/top_p/min_p only matter when sampling"
        issues.append(("sampling", message, "set do_sample: true"))
    return issues


def _layer_issues(recipe: EnsembleRecipe, check_paths: bool) -> list[tuple[str, str, str | None]]:
    """A layer rule (dola): one member, no role, weight or filters; `layers` well formed and, when
    the member's config is readable, within its depth."""
    import json
    from pathlib import Path

    from alloy.adapters import split_spec
    from alloy.ensemble.layers import parse_layers

    spec = RULES[recipe.rule]
    if not spec.layers:
        if recipe.layers is not None:
            return [("layers", f"{spec.name} does not contrast layers", "only rule: dola does")]
        return []
    issues: list[tuple[str, str, str | None]] = []
    if len(recipe.members) != 1:
        found = f"{spec.name} contrasts the layers of one model, found {len(recipe.members)}"
        issues.append(("members", found, "keep one member"))
    for i, m in enumerate(recipe.members):
        for key, value in (("role", m.role), ("weight", m.weight)):
            if value is not None:
                issues.append((f"members.{i}.{key}", f"{spec.name} takes no {key}", "remove it"))
        if m.filters:
            hint = "use sampling: {temperature, top_k, ...} (warpers act after the rule)"
            issues.append((f"members.{i}.filters", f"{spec.name} compares unfiltered layers", hint))
    try:
        layers = parse_layers("high" if recipe.layers is None else recipe.layers)
    except ValueError as error:
        return [*issues, ("layers", str(error), "low, high or a list such as [0, 4, 8]")]
    config = split_spec(recipe.members[0].model)[0] / "config.json"
    if isinstance(layers, tuple) and check_paths and config.is_file():
        try:
            depth = json.loads(Path(config).read_text()).get("num_hidden_layers")
        except (OSError, ValueError):
            depth = None  # the member's own check reports an unreadable config
        bad = [j for j in layers if isinstance(depth, int) and not 0 <= j < depth]
        if bad:
            hint = f"early layers of this model are 0..{depth - 1} (0: the embeddings)"
            issues.append(("layers", f"{bad} out of range", hint))
    return issues


def _weight_issues(recipe: EnsembleRecipe) -> list[tuple[str, str, str | None]]:
    spec = RULES[recipe.rule]
    members = recipe.members
    issues: list[tuple[str, str, str | None]] = []
    given = [m.weight for m in members if m.weight is not None]
    if given and len(given) != len(members):
        issues.append(("members", "give every member a weight or none (uniform)", None))
        return issues
    if not given:
        return issues
    if spec.signed_weights:
        if all(w == 0 for w in given):
            issues.append(("members", "all weights are 0", None))
        return issues
    for i, m in enumerate(members):
        if m.weight is not None and m.weight < 0:
            hint = "use log_linear for negative evidence"
            issues.append((f"members.{i}.weight", f"{spec.name} needs weights >= 0", hint))
    if abs(sum(given) - 1.0) > 1e-6:
        issues.append(("members", f"{spec.name} weights must sum to 1, got {sum(given):g}", None))
    return issues
