"""Merge recipes: mergekit's YAML format, read strictly and checked against the method registry.

Why strict: mergekit ignores misspelt keys and finds a missing parameter only when the merge reaches
the tensor that needs it. Here the whole recipe is checked before any checkpoint is opened, and
every problem (unknown key or parameter with a did-you-mean, wrong value type, missing parameter,
base model or model count the method cannot take, bad layer range) is reported at once with its
YAML path. Paths and architectures are the planner's business, not this module's.

Parameter settings follow mergekit 0.1.5 (config.py, parameter_resolver.py):
    weight: 0.5                                      a scalar
    weight: [0, 1, 0.5]                              a gradient over layer depth t in [0, 1]
    weight: [{filter: mlp, value: 0.5}, {value: 0}]  the first entry whose filter occurs in the
                                                     tensor name applies (no filter or "*": any)
Precedence, highest first: the model's own parameters (its slice source), the slice's parameters,
the recipe's parameters, the method's default.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import Field, PrivateAttr, ValidationError
from pydantic_core import ErrorDetails

from alloy.errors import ProblemCollector, RecipeError, did_you_mean
from alloy.io.yamlfile import StrictModel, read_recipe_text
from alloy.merge.registry import MethodSpec, Param, all_methods, get_method
from alloy.merge.tolerated import parameter_users, without_tolerated_keys

Scalar = bool | int | float | str
Setting = Any  # Scalar | list[Scalar] | {filter, value} | list[{filter, value}]
Params = dict[str, Setting]
DType = Literal["float32", "float16", "bfloat16", "float64"]
_Issue = tuple[str, str, str | None]  # where (YAML path), message, hint


class _Strict(StrictModel):
    # Keys mergekit accepts here that alloy does not implement yet: named as such in errors.
    mergekit_only: ClassVar[frozenset[str]] = frozenset()


# A model folder (or mergekit's hub name), or `BASE+ADAPTER` (a PEFT adapter folded into BASE on
# read, see alloy.adapters); an empty string names nothing.
ModelPath = Annotated[str, Field(min_length=1)]


class ModelEntry(_Strict):
    model: ModelPath
    parameters: Params | None = None


class SliceSource(_Strict):
    model: ModelPath
    layer_range: Annotated[list[int], Field(min_length=2, max_length=2)]
    parameters: Params | None = None


class Slice(_Strict):
    mergekit_only: ClassVar[frozenset[str]] = frozenset({"residual_weight"})
    sources: list[SliceSource]
    parameters: Params | None = None
    base_model: ModelPath | None = None


class Recipe(_Strict):
    """A validated recipe; build it with `load_recipe`."""

    mergekit_only: ClassVar[frozenset[str]] = frozenset({"modules", "tokenizer", "chat_template"})
    name: str | None = None
    merge_method: str
    base_model: ModelPath | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Params | None = None
    tokenizer_source: str | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    seed: int | None = None
    # What mergekit tolerates without effect and alloy ignores too, one line each (load_recipe).
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _text: str | None = PrivateAttr(default=None)  # the YAML as written, when read from YAML

    def __eq__(self, other: object) -> bool:
        # The same recipe whether read from a file, from text or from a mapping.
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = StrictModel.__hash__

    @property
    def warnings(self) -> list[str]:
        """Keys and parameters that were ignored, as mergekit ignores them, each with its path."""
        return list(self._warnings)

    @property
    def method(self) -> MethodSpec:
        return get_method(self.merge_method)

    def base_for(self, slice_index: int | None = None) -> str | None:
        """The base model of one slice (its own `base_model`, else the recipe's)."""
        if slice_index is not None and self.slices is not None:
            return self.slices[slice_index].base_model or self.base_model
        return self.base_model

    def model_paths(self) -> list[str]:
        """Every model the recipe names, in order of first appearance, the base first."""
        paths = [self.base_model] if self.base_model else []
        paths += [entry.model for entry in self.models or []]
        for s in self.slices or []:
            paths += [source.model for source in s.sources]
            paths += [s.base_model] if s.base_model else []
        return list(dict.fromkeys(paths))

    def model_keys(self) -> dict[str, str]:
        """Each model the recipe names -> the YAML key that names it first (for messages)."""
        keys = {self.base_model: "base_model"} if self.base_model else {}
        for i, entry in enumerate(self.models or []):
            keys.setdefault(entry.model, f"models[{i}].model")
        for i, s in enumerate(self.slices or []):
            for j, source in enumerate(s.sources):
                keys.setdefault(source.model, f"slices[{i}].sources[{j}].model")
            if s.base_model:
                keys.setdefault(s.base_model, f"slices[{i}].base_model")
        return keys

    def parameter(
        self,
        name: str,
        *,
        model: str | None,
        tensor_name: str,
        t: float,
        slice_index: int | None = None,
    ) -> Any:
        """Parameter `name` for `model` (None for shared ones) at a tensor of relative depth `t`.

        The first setting that resolves wins: the model's own (slice source), the slice's
        (`slice_index` of a recipe with slices), the recipe's; else the method's default, or
        `REQUIRED` if it has none.
        """
        param = self.method.params.get(name)
        if param is None:
            raise KeyError(f"{self.merge_method} has no parameter {name!r}")
        if (slice_index is None) != (self.slices is None):
            raise ValueError("slice_index must be given exactly for recipes with slices")
        if self.slices is None or slice_index is None:
            own = [entry.parameters for entry in self.models or [] if entry.model == model]
            scopes = [*own, self.parameters]
        else:
            s = self.slices[slice_index]
            own = [source.parameters for source in s.sources if source.model == model]
            scopes = [*own, s.parameters, self.parameters]
        for scope in filter(None, scopes):
            value = resolve_setting(scope[name], tensor_name, t) if name in scope else None
            if value is not None and param.kind is float:
                return float(value)
            if value is not None:  # an int gradient interpolates to a float: round it back
                return round(value) if param.kind is int and isinstance(value, float) else value
        return param.default

    def source_yaml(self) -> str:
        """The recipe's YAML as the user wrote it (comments and all), as mergekit keeps it in
        `mergekit_config.yml`; `to_yaml()` for a recipe given as a mapping."""
        return self._text if self._text is not None else self.to_yaml()

    def to_yaml(self) -> str:
        """The recipe as YAML that `load_recipe` reads back to an equal recipe."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """Resolve filters and gradients of one setting for a tensor at relative depth `t`.

    Numeric lists interpolate linearly between neighbouring entries; lists of other scalars pick
    `values[int(t * (len - 1))]`. Returns None when no condition matches (or the list is empty).
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list):
        raise TypeError(f"not a parameter setting: {setting!r}")
    if not setting:
        return None
    if all(map(_is_scalar, setting)):
        if not all(map(_is_number, setting)):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for condition in setting:
        if not isinstance(condition, Mapping):
            raise TypeError(f"not a parameter setting: {setting!r}")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return resolve_setting(condition.get("value"), tensor_name, t)
    return None


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Recipe:
    """Read and validate a recipe from a YAML file, YAML text, or an already parsed mapping.

    A PathLike, or a one-line str ending in .yaml or .yml, is a path; any other str is YAML.

    Raises:
        RecipeError: with every problem found, each with its YAML path.
    """
    raw, origin, text = read_recipe_text(source, "recipe", "merge_method:, models:, ...")
    raw, warnings = without_tolerated_keys(raw)
    problems = ProblemCollector()
    recipe = _parse_schema(raw, problems)
    for issue in _issues(recipe) if recipe is not None else []:
        problems.add(*issue)
    problems.problems = list(dict.fromkeys(problems.problems))  # slices repeat base problems
    problems.raise_if_any(RecipeError, f"invalid recipe ({origin})")
    assert recipe is not None
    recipe._warnings = warnings + list(dict.fromkeys(_unused_parameters(recipe)))
    recipe._text = text
    return recipe


def _unused_parameters(recipe: Recipe) -> Iterator[str]:
    """A warning for each parameter the method does not take but another method does: mergekit
    resolves only the parameters a method declares, so it ignores these (`weight` on slerp or
    model_stock, `density` on linear); a name no method takes is an error (see _setting_issues)."""
    method = all_methods().get(recipe.merge_method)
    if method is None:
        return
    users = parameter_users()
    for group in _groups(recipe):
        scopes = list(group.shared) + [(f"{w}.parameters", p) for w, _, p in group.entries]
        for where, params in scopes:
            for key in params or {}:
                if key not in method.params and key in users:
                    takers = ", ".join(users[key][:3]) + (", ..." if len(users[key]) > 3 else "")
                    yield (
                        f"{where}.{key}: {method.name} does not use {key!r} ({takers} do); "
                        "ignored, as mergekit ignores it"
                    )


class _Dumper(yaml.SafeDumper):
    """Writes lists of numbers (gradients, layer ranges) on one line, as mergekit does."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = all(map(_is_number, data))
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _parse_schema(raw: dict[str, Any], problems: ProblemCollector) -> Recipe | None:
    """The recipe's structure. Every schema problem is reported; the offending keys are then
    dropped and the rest validated again, so one bad value does not hide the other problems."""
    cleaned = copy.deepcopy(raw)
    for _ in range(3):
        try:
            return Recipe.model_validate(cleaned)
        except ValidationError as error:
            details = error.errors()
        for detail in details:
            problems.add(*_schema_issue(detail))
        removable = [d["loc"] for d in details if d["type"] != "missing" and len(d["loc"]) > 0]
        if len(removable) < len(details) or not _drop(cleaned, removable):
            return None
    return None


def _drop(data: dict[str, Any], locations: list[tuple[int | str, ...]]) -> bool:
    """Delete the keys at `locations` (YAML paths); False if one of them cannot be deleted."""
    for loc in locations:
        node: Any = data
        try:
            for part in loc[:-1]:
                node = node[part]
            if not isinstance(node, dict) or loc[-1] in ("merge_method", "model", "sources"):
                return False
            del node[loc[-1]]
        except (KeyError, IndexError, TypeError):
            return False
    return True


_NESTED: dict[str, type[_Strict]] = {"models": ModelEntry, "slices": Slice, "sources": SliceSource}


def _schema_issue(detail: ErrorDetails) -> _Issue:
    loc = detail["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if detail["type"] == "extra_forbidden":
        schema: type[_Strict] = Recipe
        for part in loc[:-1]:
            schema = _NESTED.get(str(part), schema)
        key = str(loc[-1])
        if key in schema.mergekit_only:
            return where, f"{key!r} is supported by mergekit, not yet by alloy", "remove it"
        return where, f"unknown key {key!r}", did_you_mean(key, schema.model_fields, "allowed keys")
    if detail["type"] == "missing":
        return where, "required key is missing", None
    hint = None
    if loc and loc[-1] in ("dtype", "out_dtype"):
        hint = "write the full name: float32, float16, bfloat16 or float64 (bf16 is bfloat16)"
    return where, f"{detail['msg']}, got {repr(detail['input'])[:60]}", hint


class _Group(NamedTuple):
    """Models merged together (the recipe's `models`, or one slice's sources), for checking."""

    where: str
    base: str | None
    base_where: str
    entries: list[tuple[str, str, Params | None]]  # (where, model, parameters)
    shared: list[tuple[str, Params | None]]  # (where, parameters), highest precedence first


def _groups(recipe: Recipe) -> Iterator[_Group]:
    if recipe.models is not None:
        entries = [(f"models[{i}]", e.model, e.parameters) for i, e in enumerate(recipe.models)]
        shared = [("parameters", recipe.parameters)]
        yield _Group("models", recipe.base_model, "base_model", entries, shared)
    for i, s in enumerate(recipe.slices or []):
        at = f"slices[{i}]"
        entries = [(f"{at}.sources[{j}]", x.model, x.parameters) for j, x in enumerate(s.sources)]
        shared = [(f"{at}.parameters", s.parameters), ("parameters", recipe.parameters)]
        base_where = f"{at}.base_model" if s.base_model else "base_model"
        yield _Group(f"{at}.sources", recipe.base_for(i), base_where, entries, shared)


def _issues(recipe: Recipe) -> Iterator[_Issue]:
    """Every problem of a structurally valid recipe."""
    methods = all_methods()
    method = methods.get(recipe.merge_method)
    if method is None:
        hint = did_you_mean(recipe.merge_method, methods, "available")
        yield "merge_method", f"unknown merge method {recipe.merge_method!r}", hint
    if recipe.tokenizer_source == "union":
        hint = "use 'base' or a model's path, or leave it out to keep the base model's tokenizer"
        yield "tokenizer_source", "'union': alloy does not merge vocabularies", hint
    if (recipe.models is None) == (recipe.slices is None):
        yield "", "a recipe needs exactly one of `models` and `slices`", None
    elif recipe.slices == []:
        yield "slices", "is empty", "list at least one slice of sources"
    for i, s in enumerate(recipe.slices or []):
        lengths = set()
        for j, source in enumerate(s.sources):
            start, end = source.layer_range
            if 0 <= start < end:
                lengths.add(end - start)
            else:
                message = f"{[start, end]} is not [start, end) with 0 <= start < end"
                yield f"slices[{i}].sources[{j}].layer_range", message, None
        if len(lengths) > 1:
            message = f"sources span different numbers of layers {sorted(lengths)}"
            yield f"slices[{i}].sources", message, "give every source the same number of layers"
    for group in _groups(recipe):
        if not group.entries:
            yield group.where, "is empty", "list at least one model"
        if method is None:
            continue
        yield from _group_issues(method, group) if group.entries else []
        top = group.shared[0][0]
        scopes: list[tuple[str, Params | None, str | None]]
        scopes = [(where, params, None) for where, params in group.shared]
        scopes += [(f"{where}.parameters", params, top) for where, _, params in group.entries]
        for where, params, move_to in scopes:
            for key, setting in (params or {}).items():
                yield from _setting_issues(method, f"{where}.{key}", key, setting, move_to)


def _group_issues(method: MethodSpec, group: _Group) -> Iterator[_Issue]:
    name, base = method.name, group.base
    models = [model for _, model, _ in group.entries]
    for model in sorted({m for m in models if models.count(m) > 1}):
        yield group.where, f"{model!r} is listed more than once", "list each model once"
    if method.base == "required" and base is None:
        yield group.base_where, f"{name} needs a base model", "set `base_model`"
    if base is not None and base not in models and method.base == "none":
        hint = "remove `base_model`, or also list it among the models to merge it with them"
        yield group.base_where, f"{name} uses no base model, and {base!r} is not merged", hint
    elif base is not None and base not in models and group.where.startswith("slices"):
        hint = "add a source for it with the layer range to use"
        yield group.base_where, f"base model {base!r} is not among the sources", hint
    merged = [e for e in group.entries if method.base == "none" or e[1] != base]
    low, high = method.min_models, method.max_models
    if len(merged) < low or (high is not None and len(merged) > high):
        wanted = f"at least {low}" if high is None else f"{low} to {high}"
        wanted = f"exactly {low}" if low == high else wanted
        noun = "model" if (high or low) == 1 else "models"
        besides = "" if method.base == "none" else " besides the base"
        yield group.where, f"{name} merges {wanted} {noun}{besides}, got {len(merged)}", None
    top = group.shared[0][0]
    for param in method.params.values():
        if not param.required or any(p and param.name in p for _, p in group.shared):
            continue
        if not param.per_model:
            yield top, f"{name} needs parameter {param.name!r}", f"set {top}.{param.name}"
        for where, model, params in merged if param.per_model else []:
            if not (params and param.name in params):
                message = f"model {model!r} has no {param.name!r}, which {name} requires"
                hint = f"set {where}.parameters.{param.name}, or {top}.{param.name} for all models"
                yield where, message, hint


def _setting_issues(
    method: MethodSpec, where: str, key: str, setting: Setting, move_to: str | None
) -> Iterator[_Issue]:
    """Problems of one setting; `move_to` is where shared parameters belong, if not here."""
    param = method.params.get(key)
    if param is None and key in parameter_users():
        return  # another method's parameter: ignored with a warning (_unused_parameters)
    if param is None:
        hint = did_you_mean(key, method.params, f"{method.name} takes")
        yield where, f"{method.name} has no parameter {key!r}", hint
    elif move_to is not None and not param.per_model:
        yield where, f"{key!r} is shared by all models", f"move it to {move_to}"
    else:
        for suffix, message in _value_problems(setting, param, nested=False):
            yield where + suffix, message, None


def _value_problems(setting: Setting, param: Param, nested: bool) -> Iterator[tuple[str, str]]:
    """(path suffix, message) for each way `setting` is not a valid value of `param`."""
    if _is_scalar(setting):
        yield from (("", message) for message in [_scalar_problem(setting, param)] if message)
    elif _all(setting, bool | int | float | str):
        if param.kind in (bool, str) and any(map(_is_number, setting)):
            yield "", f"{param.name} takes {_KINDS[param.kind]}; gradients are for numbers"
            return
        for i, value in enumerate(setting):
            message = _scalar_problem(value, param)
            yield from [(f"[{i}]", message)] if message else []
    elif not nested and (isinstance(setting, Mapping) or _all(setting, Mapping)):
        single = isinstance(setting, Mapping)
        for i, condition in enumerate([setting] if single else setting):
            at = "" if single else f"[{i}]"
            for key in sorted(set(condition) - {"filter", "value"}, key=str):
                hint = did_you_mean(str(key), ["filter", "value"], "keys")
                yield f"{at}.{key}", f"unknown key ({hint})"
            pattern = condition.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                yield f"{at}.filter", f"a filter is part of a tensor name, got {pattern!r}"
            if "value" not in condition:
                yield at, "a condition needs a `value`"
                continue
            for suffix, message in _value_problems(condition["value"], param, nested=True):
                yield f"{at}.value{suffix}", message
    else:
        allowed = "a value or a list" if nested else "a value, a list or {filter, value} entries"
        yield "", f"expected {allowed}, got {setting!r}"


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_problem(value: Scalar, param: Param) -> str | None:
    kind = param.kind
    if kind in (bool, str):
        ok = isinstance(value, kind)
    else:
        ok = _is_number(value) and (kind is float or isinstance(value, int))
    if not ok:
        return f"{param.name} takes {_KINDS.get(kind, kind.__name__)}, got {value!r}"
    if param.choices and value not in param.choices:
        return f"{param.name} is one of {', '.join(param.choices)}; got {value!r}"
    if param.range is None or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    problem = param.range.problem(value)
    return f"{param.name} {problem}" if problem else None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _all(setting: Any, kind: Any) -> bool:
    """Whether `setting` is a non-empty list of `kind`."""
    return isinstance(setting, list) and bool(setting) and all(isinstance(v, kind) for v in setting)
