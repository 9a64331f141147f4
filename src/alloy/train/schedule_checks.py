"""Checks of a recipe's `schedule:` mapping against the schedule classes (names, types, ranges).

Kept beside `schedules.py` (the pure schedules) and apart from the recipe module, which calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, get_args

from alloy.errors import did_you_mean
from alloy.train.schedules import SCHEDULES

Issue = tuple[str, str, str | None]  # (YAML path, problem, hint)


def schedule_issues(schedule: Mapping[str, Any], where: str) -> list[Issue]:
    """Problems of a `schedule:` mapping: its name, parameter names, types and ranges."""
    name = schedule.get("name")
    if not isinstance(name, str) or name not in SCHEDULES:
        hint = did_you_mean(str(name), SCHEDULES, "schedules")
        return [(f"{where}.name", f"unknown schedule {name!r}" if name else "missing", hint)]
    cls = SCHEDULES[name]
    declared = {f.name: f for f in fields(cls)}
    issues: list[Issue] = []
    for key, value in schedule.items():
        if key == "name":
            continue
        field = declared.get(key)
        if field is None:
            hint = did_you_mean(key, declared, f"{name} takes")
            issues.append((f"{where}.{key}", "unknown parameter", hint))
            continue
        problem = _check_type(value, field.type)
        if problem:
            issues.append((f"{where}.{key}", problem, None))
    for key, field in declared.items():
        if key != "total" and field.default is MISSING and key not in schedule:
            issues.append((f"{where}.{key}", f"{name} needs {key}", None))
    if issues:
        return issues
    values = {k: v for k, v in schedule.items() if k != "name"}
    for key in ("lr", "constant_lr"):
        if key in values and not values[key] > 0:
            issues.append((f"{where}.{key}", f"must be > 0, got {values[key]}", None))
    for key in ("min_lr", "initial_lr", "warmup", "cooldown", "anneal", "decay", "offset"):
        if values.get(key) is not None and values[key] < 0:
            issues.append((f"{where}.{key}", f"must be >= 0, got {values[key]}", None))
    if name == "infinite" and values.get("anneal", 0) > 0 and not values.get("min_lr", 0) > 0:
        issues.append((f"{where}.min_lr", "an exponential anneal needs min_lr > 0", None))
    if "total" in values and values["total"] <= 0:
        issues.append((f"{where}.total", "must be > 0", None))
    return issues


def _check_type(value: Any, type_name: Any) -> str | None:
    """Whether `value` fits a schedule field declared as `type_name` ("float", "int | None",
    "DecayShape", ...: annotations are strings under `from __future__ import annotations`)."""
    from alloy.train import schedules

    names = [t.strip() for t in str(type_name).split("|")]
    if value is None:
        return None if "None" in names else "must be given"
    for n in names:
        options = get_args(getattr(schedules, n, None))
        if options:
            return None if value in options else f"choose one of {', '.join(options)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    if "float" not in names and not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if not math.isfinite(value):
        return f"must be finite, got {value!r}"
    return None
