"""What a soup optimises: one number read from `alloy.eval.evaluate`'s results.

The evaluator reports many metrics per set; a greedy soup needs exactly one, with a direction.
The default follows the kind of the data (text: perplexity, lower is better; choice and
preference: accuracy, higher is better), `metric` overrides it. Several sets are pooled the way
the evaluator pools them: text sets by total NLL over total tokens (its `overall` row), task sets
by counting items (total right over total items), so a large set weighs more than a small one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alloy.errors import Problem
from alloy.eval import EvalSet

TEXT_METRICS = ("perplexity", "bits_per_byte")
TASK_METRICS = ("accuracy", "accuracy_norm")
METRICS = TEXT_METRICS + TASK_METRICS


@dataclass(frozen=True)
class Objective:
    metric: str
    higher_is_better: bool
    sets: tuple[str, ...]  # names of the sets it reads (the others are not scored)

    @property
    def description(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        pooled = "pooled over " if len(self.sets) > 1 else "on "
        return f"{self.metric} {pooled}{', '.join(self.sets)} ({direction} is better)"


def choose_objective(
    sets: Sequence[EvalSet], metric: str | None, *, reward_models: bool
) -> tuple[Objective | None, list[Problem]]:
    """The objective for these sets, or the problems that prevent choosing one.

    Args:
        metric: one of METRICS, or None to choose by the kind of the data.
        reward_models: the candidates are sequence-classification reward models, which score
            preference data only (by reward, so without a per-byte `accuracy_norm`).
    """
    problems: list[Problem] = []
    usable = [s for s in sets if not reward_models or s.kind == "preference"]
    text = [s.name for s in usable if s.kind == "text"]
    tasks = [s.name for s in usable if s.kind != "text"]
    if reward_models and not usable:
        problems.append(
            Problem(
                "--eval",
                "reward models are scored on preference data only, and none was given",
                'give a JSONL file of {"prompt", "chosen", "rejected"} records',
            )
        )
        return None, problems
    if metric is not None and metric not in METRICS:
        problems.append(Problem("--metric", f"{metric!r} is not one of {', '.join(METRICS)}"))
        return None, problems
    if metric is None:
        if text and tasks:
            problems.append(
                Problem(
                    "--eval",
                    f"mixes text sets ({', '.join(text)}) and task sets ({', '.join(tasks)})",
                    "choose what to optimise with --metric perplexity or --metric accuracy",
                )
            )
            return None, problems
        metric = "perplexity" if text else "accuracy"
    chosen = text if metric in TEXT_METRICS else tasks
    if not chosen:
        kind = "text" if metric in TEXT_METRICS else "choice or preference"
        problems.append(Problem("--metric", f"{metric} needs {kind} data, and none was given"))
        return None, problems
    if reward_models and metric == "accuracy_norm":
        problems.append(
            Problem("--metric", "accuracy_norm is not defined for reward models", "use accuracy")
        )
        return None, problems
    return Objective(metric, metric in TASK_METRICS, tuple(chosen)), problems


def objective_value(results: dict[str, Any], objective: Objective) -> float:
    """The objective's number from one `evaluate` result (NaN when nothing was scored)."""
    if objective.metric in TEXT_METRICS:
        pooled = results.get("overall") if len(objective.sets) > 1 else None
        row = pooled or results.get(objective.sets[0])
        return float(row[objective.metric]) if row else math.nan
    rows = [results[name] for name in objective.sets if name in results]
    items = sum(int(r["items"]) for r in rows)
    if not items:
        return math.nan
    return sum(float(r[objective.metric]) * int(r["items"]) for r in rows) / items
