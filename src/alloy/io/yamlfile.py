"""Strict YAML for recipes: duplicate keys are errors, `1e-3` is a number, errors name the line.

PyYAML's safe loader silently keeps the last of two equal keys and reads `1e-3` as a string
(YAML 1.1); both turn a typo into a wrong merge or ensemble instead of an error.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from alloy.errors import RecipeError


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
