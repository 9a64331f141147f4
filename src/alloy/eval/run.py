"""Score models on evaluation sets; present the results (JSON for machines, tables for people)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alloy.eval.choice import choice_accuracy, preference_accuracy
from alloy.eval.data import EvalSet
from alloy.eval.perplexity import score_text
from alloy.eval.scorer import Scorer

# The headline number of each kind of data, and whether lower is better.
HEADLINE = {
    "text": ("perplexity", True),
    "choice": ("accuracy", False),
    "preference": ("accuracy", False),
}


@dataclass(frozen=True)
class EvalSettings:
    window: int | None = None
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None  # per text set
    max_items: int | None = None  # per choice / preference set


def evaluate(scorer: Scorer, sets: Sequence[EvalSet], settings: EvalSettings) -> dict[str, Any]:
    """Metrics of `scorer` on every set, keyed by set name; text sets also get an overall row."""
    results: dict[str, Any] = {}
    totals = {"nll": 0.0, "tokens": 0, "bytes": 0, "documents": 0}
    reward_only = bool(getattr(scorer, "is_reward_model", False))
    for s in sets:
        items = list(s.items[: settings.max_items] if s.kind != "text" else s.items)
        if s.kind == "text":
            if reward_only:
                continue
            score = score_text(
                scorer,
                items,
                window=settings.window,
                stride=settings.stride,
                batch_size=settings.batch_size,
                max_tokens=settings.max_tokens,
            )
            results[s.name] = {"kind": "text", **score.as_dict()}
            for key in totals:
                totals[key] += getattr(score, key)
        elif s.kind == "choice":
            if reward_only:
                continue
            results[s.name] = {
                "kind": "choice",
                **choice_accuracy(scorer, items, settings.batch_size),
            }
        else:
            results[s.name] = {
                "kind": "preference",
                **preference_accuracy(scorer, items, settings.batch_size),
            }
    if sum(1 for r in results.values() if r["kind"] == "text") > 1:
        results["overall"] = {
            "kind": "text",
            "perplexity": math.exp(totals["nll"] / totals["tokens"]),
            "bits_per_byte": totals["nll"] / math.log(2) / totals["bytes"],
            **totals,
        }
    return results


def table_rows(
    results: dict[str, dict[str, Any]], metric: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Columns (set names) and rows (model name, then one cell per set) of a results table.

    `metric` overrides the headline metric of text sets (e.g. "bits_per_byte").
    """
    columns: list[str] = []
    for per_model in results.values():
        columns += [name for name in per_model if name not in columns]
    rows = []
    for model, per_model in results.items():
        row = [model]
        for name in columns:
            r = per_model.get(name)
            if r is None:
                row.append("-")
                continue
            key = metric if (metric and r["kind"] == "text") else HEADLINE[r["kind"]][0]
            value = r.get(key)
            row.append(
                "-" if value is None else f"{value:.4g}" if key != "accuracy" else f"{value:.3f}"
            )
        rows.append(row)
    return columns, rows


def markdown_table(results: dict[str, dict[str, Any]], metric: str | None = None) -> str:
    columns, rows = table_rows(results, metric)
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
