"""Everything checked before a soup touches a weight, with every problem reported at once.

Flags, evaluation data (alloy.eval.load_eval_sets) and candidates (the merge planner on the
uniform recipe of all of them: readable, same architecture, vocabulary, layer count, tensor names
and shapes; headers and configs only) are checked together, so one run shows everything to fix.
The output folder is checked first and alone: an existing OUT without --force is refused before
even the data is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloy.average.offline import reworded
from alloy.device import resolve_device
from alloy.errors import InputError, Problem
from alloy.eval import EvalSet, EvalSettings, load_eval_sets
from alloy.io.atomic import check_output_folder
from alloy.io.writable import check_writable
from alloy.merge.api import plan
from alloy.soup.greedy import METHODS
from alloy.soup.objective import Objective, choose_objective

# Config keys that may differ between checkpoints of one model without changing what it computes.
_BOOKKEEPING_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


@dataclass(frozen=True)
class SoupInputs:
    """What `check_inputs` validated: ready to cook."""

    candidates: tuple[Path, ...]
    sets: list[EvalSet]
    objective: Objective
    warnings: list[str]  # from the merge planner (e.g. tied embeddings) and config differences


def _is_reward_model(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or [""]
    return str(architectures[0]).endswith("ForSequenceClassification")


def _config_warnings(paths: Sequence[Path]) -> list[str]:
    """Config differences that make in-memory scores differ from the written soup's."""
    configs = []
    for path in paths:
        try:
            configs.append(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return []
    first = configs[0]
    warnings = []
    for path, config in zip(paths[1:], configs[1:], strict=True):
        keys = sorted(
            k
            for k in (set(first) | set(config)) - _BOOKKEEPING_KEYS
            if first.get(k) != config.get(k)
        )
        if keys:
            warnings.append(
                f"{path}: config differs from {paths[0]}'s in {', '.join(keys)}; candidate soups "
                f"are scored with {paths[0]}'s config, the written soup takes the config of its "
                "best-ranked ingredient"
            )
    return warnings


def check_inputs(
    candidates: Sequence[str | Path],
    data: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "greedy",
    metric: str | None = None,
    settings: EvalSettings | None = None,
    force: bool = False,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> SoupInputs:
    """Validate everything a soup needs, reading headers, configs and data but no weights.

    Raises:
        OutputExistsError: `out` is not empty and `force` is False (checked first, alone).
        InputError: `out` cannot be written (checked next, alone; see `check_writable`).
        InputError: every other problem, all listed together.
    """
    out_path = Path(out)
    check_output_folder(out_path, force=force)
    check_writable(out_path, "OUT")
    paths = tuple(Path(c) for c in candidates)
    problems: list[Problem] = []
    if method not in METHODS:
        problems.append(Problem("--method", f"{method!r} is not one of {', '.join(METHODS)}"))
    if len(paths) < 2:
        problems.append(Problem("--candidates", "a soup needs at least two candidates"))
    problems += settings_problems(settings or EvalSettings())
    try:
        resolve_device(device)
    except InputError as exc:
        problems.append(Problem("", exc.message))
    resolved = [p.resolve() for p in paths]
    for k, path in enumerate(paths):
        if resolved[k] in resolved[:k]:
            problems.append(Problem(str(path), "given twice as a candidate", "list it once"))
    target = out_path.resolve()
    for path, real in zip(paths, resolved, strict=True):
        if target == real or target in real.parents or real in target.parents:
            problems.append(
                Problem(str(out_path), f"overlaps the candidate {path}", "write the soup elsewhere")
            )
    sets: list[EvalSet] | None = None
    if not data:
        problems.append(Problem("--eval", "no evaluation data", "give --eval FILE or folder"))
    else:
        # Missing paths are reported here, so that the hint names --eval (not eval's --data).
        present = [Path(d) for d in data if Path(d).exists()]
        problems += [
            Problem(str(d), "not found", "check the --eval path")
            for d in data
            if not Path(d).exists()
        ]
        try:
            sets = load_eval_sets(present) if present else None
        except InputError as exc:
            problems += exc.problems or [Problem("--eval", exc.message)]
    merge_plan = None
    unique = list(dict.fromkeys(paths))
    if unique:
        try:
            merge_plan = plan(soup_recipe(unique), allow_pickle=allow_pickle)
        except InputError as exc:
            error = reworded(exc, "candidates")
            problems += [Problem("--candidates", error.message), *error.problems]
    objective = None
    if sets is not None:
        reward = any(_is_reward_model(p) for p in paths)
        objective, found = choose_objective(sets, metric, reward_models=reward)
        problems += found
    if problems or merge_plan is None or objective is None or sets is None:
        raise InputError("cannot make a soup", problems)
    used = [s for s in sets if s.name in objective.sets]
    warnings = list(merge_plan.warnings) + _config_warnings(paths)
    ignored = [s.name for s in sets if s.name not in objective.sets]
    if ignored:
        warnings.append(f"not scored (the objective is {objective.metric}): {', '.join(ignored)}")
    return SoupInputs(paths, used, objective, warnings)


def settings_problems(settings: EvalSettings) -> list[Problem]:
    """Evaluation settings that cannot work (sizes must be positive, stride <= window)."""
    problems = [
        Problem(f"--{name}", f"must be positive, got {value}")
        for name, value in (
            ("window", settings.window),
            ("stride", settings.stride),
            ("batch-size", settings.batch_size),
            ("max-tokens", settings.max_tokens),
            ("max-items", settings.max_items),
        )
        if value is not None and value <= 0
    ]
    window, stride = settings.window, settings.stride
    if window and stride and stride > window:
        problems.append(Problem("--stride", f"{stride} is larger than --window {window}"))
    return problems


def soup_recipe(paths: Sequence[Path], name: str | None = None) -> dict[str, Any]:
    """The mergekit-style recipe of the uniform average of `paths` (the order is kept)."""
    recipe: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
    }
    if name:
        recipe["name"] = name
    return recipe
