"""Strict YAML for recipes: duplicate keys are errors, `1e-3` is a number, errors name the line.

PyYAML's safe loader silently keeps the last of two equal keys and reads `1e-3` as a string
(YAML 1.1); both turn a typo into a wrong merge or ensemble instead of an error.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from alloy.errors import ProblemCollector, RecipeError, did_you_mean


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys, loose types and NaN/inf numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-3` as a number (as YAML 1.2 does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    message = f"duplicate key {key.value!r}"
                    raise yaml.constructor.ConstructorError(None, None, message, key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str, origin: str) -> Any:
    """Parse `text` (from `origin`, for messages); raise RecipeError with line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        raise RecipeError(f"{at}: invalid YAML: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"{origin}: invalid YAML: {error}") from error


def read_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], what: str, keys: str
) -> tuple[dict[str, Any], str]:
    """The mapping of a recipe given as a parsed mapping, YAML text, or a YAML file, and where it
    came from (for messages). A PathLike, or a one-line str ending in .yaml or .yml, is a path.

    Raises:
        RecipeError: unreadable file, invalid YAML, or not a mapping (`keys` shows an example).
    """
    raw, origin, _ = read_recipe_text(source, what, keys)
    return raw, origin


def read_recipe_text(
    source: str | os.PathLike[str] | Mapping[str, Any], what: str, keys: str
) -> tuple[dict[str, Any], str, str | None]:
    """`read_recipe`, and the YAML text as written (comments and all; None for a mapping)."""
    text: str | None
    if isinstance(source, Mapping):
        raw, origin, text = dict(source), "<mapping>", None
    elif isinstance(source, str) and ("\n" in source or not source.endswith((".yaml", ".yml"))):
        raw, origin, text = read_yaml(source, "<text>"), "<text>", source
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as error:
            raise RecipeError(f"cannot read {what} {source}: {error}") from error
        raw, origin = read_yaml(text, str(source)), str(source)
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: a {what} must be a mapping ({keys})")
    return raw, origin, text


Schema = TypeVar("Schema", bound=BaseModel)


def validate_schema(
    raw: dict[str, Any],
    schema: type[Schema],
    nested: Mapping[str, type[BaseModel]],
    problems: ProblemCollector,
) -> Schema | None:
    """`raw` validated against the pydantic `schema` (whose `nested` top-level keys hold lists or
    mappings of other models), every problem added to `problems` with its YAML path.

    Unknown keys are reported with a did-you-mean hint, dropped, and the rest validated again, so
    that a misspelt key does not hide the problems behind it. None if anything else is wrong.
    """
    data = copy.deepcopy(raw)
    for _ in range(3):
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            details = error.errors()
        droppable = True
        reported: set[tuple[Any, ...]] = set()
        for detail in details:
            loc = detail["loc"]
            if detail["type"] != "extra_forbidden":
                droppable = False
                loc = _without_union_tag(loc)
                if loc not in reported:  # one message per key, not one per union branch
                    reported.add(loc)
                    where = ".".join(str(p) for p in loc) or "(top)"
                    problems.add(where, f"{detail['msg']}, got {repr(detail.get('input'))[:60]}")
                continue
            where = ".".join(str(p) for p in loc) or "(top)"
            key = str(loc[-1])
            model = model_at(schema, loc[:-1]) or (
                nested.get(str(loc[0]), schema) if len(loc) > 1 else schema
            )
            problems.add(
                where, f"unknown key {key!r}", did_you_mean(key, model.model_fields, "allowed keys")
            )
            node: Any = data
            for part in loc[:-1]:
                node = node[part]
            del node[loc[-1]]
        if not droppable:
            return None
    return None


_UNION_TAG = re.compile(r"(float|int|str|bool|(list|dict)\[.*\])")


def _without_union_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`loc` without pydantic's trailing name of a union branch (`weight.float` -> `weight`)."""
    if loc and isinstance(loc[-1], str) and _UNION_TAG.fullmatch(loc[-1]):
        return loc[:-1]
    return loc


def model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the keys at YAML path `loc` under `schema` (list indices and
    mapping keys step through containers), or None when the path leaves the models."""
    import typing

    current: Any = schema
    parts = list(loc)
    for _ in range(4 * len(parts) + 4):  # every pass consumes a part or unwraps a type
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not parts:
                return current
            field = current.model_fields.get(str(parts.pop(0)))
            if field is None:
                return None
            current = field.annotation
            continue
        args = [a for a in typing.get_args(current) if _holds_model(a)]
        if len(args) != 1:
            return None
        if typing.get_origin(current) in (list, dict, tuple):
            if not parts:
                return None
            parts.pop(0)  # an index or a mapping key
        current = args[0]
    return None


def _holds_model(annotation: Any) -> bool:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(a) for a in typing.get_args(annotation))
