"""What mergekit 0.1.5 reads past without effect, so that alloy can ignore the same with a
warning and recipes written for mergekit run unchanged: keys its schema does not have, and
parameters a method does not declare but another method does (the index of which methods take
which parameter lives here; recipe.py turns it into warnings and keeps misspellings errors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alloy.merge.registry import all_methods

# Keys mergekit's schema does not have: key -> why it has no effect, for the warning.
TOLERATED_KEYS = {
    "input_model_parameters": "mergekit's README names it, but its recipe schema has no such "
    "key; give per-model parameters under models[i].parameters",
}
TOLERATED_MODEL_KEYS = {
    "layer_range": "a layer range applies only to slice sources; use `slices:` to take layers",
}


def without_tolerated_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`raw` without the keys mergekit ignores, and one warning per key removed."""
    warnings = []
    cleaned = dict(raw)
    for key, why in TOLERATED_KEYS.items():
        if key in cleaned:
            del cleaned[key]
            warnings.append(f"{key}: ignored, as mergekit ignores it ({why})")
    models = cleaned.get("models")
    if isinstance(models, list):
        cleaned["models"] = models = [dict(m) if isinstance(m, Mapping) else m for m in models]
        for i, entry in enumerate(models):
            for key, why in TOLERATED_MODEL_KEYS.items():
                if isinstance(entry, dict) and key in entry:
                    del entry[key]
                    warnings.append(f"models[{i}].{key}: ignored, as mergekit ignores it ({why})")
    return cleaned, warnings


_users: tuple[tuple[str, ...], dict[str, list[str]]] = ((), {})


def parameter_users() -> dict[str, list[str]]:
    """Each parameter name of the registry -> the methods that take it (sorted); rebuilt only
    when the set of registered methods changes."""
    global _users
    methods = all_methods()
    names = tuple(sorted(methods))
    if names != _users[0]:
        users: dict[str, list[str]] = {}
        for name in names:
            for param in methods[name].params:
                users.setdefault(param, []).append(name)
        _users = (names, users)
    return _users[1]
