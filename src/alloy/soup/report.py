"""How a soup explains itself: soup.json for machines, a Markdown table and a plot for people.

Nothing here runs a model: every function reads a `SoupReport`. Outputs are deterministic (no
timings, no temporary paths), so the same soup writes the same files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alloy.soup.soup import SoupReport


def format_score(value: float, metric: str) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if metric.startswith("accuracy") else f"{value:.5g}"


def _finite(value: Any) -> Any:
    """NaN and infinities become null: soup.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ingredient_rows(report: SoupReport) -> list[list[str]]:
    """rank, ingredient, own score, in the soup? (best first)."""
    selection, metric = report.selection, report.objective.metric
    return [
        [
            str(rank),
            report.labels[k],
            format_score(selection.individual[k], metric),
            "yes" if k in selection.chosen else "no",
        ]
        for rank, k in enumerate(selection.order, 1)
    ]


def step_rows(report: SoupReport) -> list[list[str]]:
    """step, what was tried, soup size, candidate soup score, kept?, soup score after the step."""
    metric = report.objective.metric
    rows = []
    current = math.nan
    for number, step in enumerate(report.selection.steps, 1):
        if step.kept:
            current = step.score
        tried = (
            f"+ {report.labels[step.tried[0]]}"
            if len(step.tried) == 1
            else f"all {len(step.tried)}"
        )
        rows.append(
            [
                str(number),
                tried,
                str(len(step.soup)),
                format_score(step.score, metric),
                "kept" if step.kept else "rejected",
                format_score(current, metric),
            ]
        )
    return rows


INGREDIENT_COLUMNS = ["rank", "ingredient", "own score", "in soup"]
STEP_COLUMNS = ["step", "tried", "soup size", "candidate score", "decision", "soup score"]


def summary_line(report: SoupReport) -> str:
    selection, metric = report.selection, report.objective.metric
    best = selection.best_ingredient
    return (
        f"{selection.method} soup of {len(selection.chosen)}/{len(report.candidates)}: "
        f"{metric} {format_score(selection.score, metric)} "
        f"(best ingredient {report.labels[best]}: "
        f"{format_score(selection.individual[best], metric)})"
    )


def soup_markdown(report: SoupReport, *, heading: str = "#") -> str:
    """The ingredient and step tables as Markdown (soup.md; also appended to the model card)."""

    def table(columns: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return lines + [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows
        ]

    lines = [
        f"{heading} Soup",
        "",
        f"{summary_line(report)}.",
        "",
        f"Objective: {report.objective.description}."
        + (
            " Tie rule: an ingredient is kept when the soup's score does not get worse (equal "
            "counts as not worse)."
            if report.selection.method == "greedy"
            else " A uniform soup averages every ingredient whatever the scores."
        ),
        "",
        f"{heading}# Ingredients",
        "",
        *table(INGREDIENT_COLUMNS, ingredient_rows(report)),
        "",
        f"{heading}# Steps",
        "",
        *table(STEP_COLUMNS, step_rows(report)),
    ]
    if report.warnings:
        lines += ["", f"{heading}# Warnings", "", *[f"- {w}" for w in report.warnings]]
    return "\n".join(lines) + "\n"


def soup_json(report: SoupReport) -> dict[str, Any]:
    """Every number of the run: settings, each ingredient's and each candidate soup's results."""
    selection = report.selection

    def names(ids: tuple[int, ...]) -> list[str]:
        return [str(report.candidates[k]) for k in ids]

    candidates = [
        {
            "path": str(path),
            "label": report.labels[k],
            "rank": selection.order.index(k) + 1,
            "score": selection.individual[k],
            "chosen": k in selection.chosen,
            "results": report.results.get((k,), {}),
        }
        for k, path in enumerate(report.candidates)
    ]
    steps = [
        {
            "step": number,
            "tried": names(step.tried),
            "soup": names(step.soup),
            "score": step.score,
            "kept": step.kept,
            "results": report.results.get(step.soup, {}),
        }
        for number, step in enumerate(selection.steps, 1)
    ]
    best = selection.best_ingredient
    payload = {
        "method": selection.method,
        "objective": {
            "metric": report.objective.metric,
            "higher_is_better": report.objective.higher_is_better,
            "sets": list(report.objective.sets),
        },
        "tie_rule": "kept when not worse: >= for higher-is-better metrics, <= for lower-is-better",
        "settings": dict(report.settings.__dict__),
        "data": report.data,
        "candidates": candidates,
        "steps": steps,
        "chosen": names(selection.chosen),
        "score": selection.score,
        "best_ingredient": {
            "path": str(report.candidates[best]),
            "score": selection.individual[best],
        },
        "ingredient_bytes": report.ingredient_bytes,
        "warnings": report.warnings,
    }
    return dict(_finite(payload))


def plot_soup(report: SoupReport, path: Path) -> bool:
    """Score per step against the ingredients' own scores; False if matplotlib is missing.

    Greedy: at step i, a grey dot is the i-th ingredient alone, a green dot (kept) or red cross
    (rejected) the candidate soup with it added, the line the soup kept so far. Uniform: the
    ingredients' dots and a line at the uniform soup's score.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    selection, objective = report.selection, report.objective
    order = selection.order
    xs = list(range(1, len(order) + 1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2), 4.2))
    try:
        ax.plot(
            xs, [selection.individual[k] for k in order], "o", color="0.6", label="ingredient alone"
        )
        greedy = selection.method == "greedy"
        if greedy:
            steps = selection.steps
            kept = [(x, s.score) for x, s in zip(xs, steps, strict=True) if s.kept]
            rejected = [(x, s.score) for x, s in zip(xs, steps, strict=True) if not s.kept]
            current, line = math.nan, []
            for step in steps:
                current = step.score if step.kept else current
                line.append(current)
            ax.step(xs, line, where="post", color="tab:green", alpha=0.6, label="greedy soup")
            if kept:
                ax.plot(*zip(*kept, strict=True), "o", color="tab:green", label="candidate kept")
            if rejected:
                ax.plot(
                    *zip(*rejected, strict=True), "x", color="tab:red", label="candidate rejected"
                )
        else:
            ax.axhline(selection.score, color="tab:green", label="uniform soup")
        ax.set_xticks(xs)
        ax.set_xticklabels([report.labels[k] for k in order], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("greedy step: the ingredient tried" if greedy else "ingredients, best first")
        direction = "higher" if objective.higher_is_better else "lower"
        ax.set_ylabel(f"{objective.metric} ({direction} is better)")
        ax.set_title(f"{selection.method} soup: {objective.description}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True
