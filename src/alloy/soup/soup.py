"""`make_soup`: check everything, score candidate soups in memory, write the chosen one.

Order of work, so a mistake costs nothing:
1. the output folder is refused if it exists and is not empty (without `force`);
2. flags, evaluation data and candidates (headers and configs: readable, same architecture,
   vocabulary, layers, tensor names and shapes) are checked and every problem reported at once;
3. the candidates are loaded into memory (alloy.soup.kitchen) and every candidate soup is scored
   with `alloy.eval.evaluate` without being written;
4. the chosen soup is written by `alloy.merge.api.merge` (a `linear` recipe with equal weights,
   streaming, with a model card), together with soup.json, soup.md and soup.png, inside one
   atomic folder: a failure or Ctrl-C at any point leaves no output at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloy.errors import InputError
from alloy.eval import EvalSettings, evaluate
from alloy.io import AtomicFolder
from alloy.io.writable import describe
from alloy.merge.api import merge
from alloy.soup.checks import SoupInputs, check_inputs, soup_recipe
from alloy.soup.greedy import METHODS, Selection
from alloy.soup.kitchen import Kitchen
from alloy.soup.objective import Objective, objective_value
from alloy.soup.report import plot_soup, soup_json, soup_markdown


@dataclass
class SoupReport:
    """Everything a soup run found: what the tables, plot and soup.json are made of."""

    candidates: tuple[Path, ...]
    labels: tuple[str, ...]  # short unique names of the candidates, for tables
    objective: Objective
    selection: Selection[int]  # ingredient ids are indices into `candidates`
    results: dict[tuple[int, ...], dict[str, Any]]  # evaluate() output of every scored soup
    settings: EvalSettings
    data: dict[str, dict[str, str]]  # set name -> path and kind
    warnings: list[str] = field(default_factory=list)
    ingredient_bytes: int = 0  # memory held by the ingredients' fp32 weights
    out: Path | None = None

    @property
    def chosen_paths(self) -> list[Path]:
        return [self.candidates[k] for k in self.selection.chosen]


def labels_for(paths: Sequence[Path]) -> tuple[str, ...]:
    """Folder names when they are unique, else the paths as given."""
    names = [p.name or str(p) for p in paths]
    return tuple(names) if len(set(names)) == len(names) else tuple(str(p) for p in paths)


ScoreCallback = Callable[[tuple[str, ...], float], None]


def make_soup(
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
    hash_inputs: bool = True,
    command: str | None = None,
    on_score: ScoreCallback | None = None,
) -> SoupReport:
    """Make a uniform or greedy soup of `candidates`, judged on `data`, and write it to `out`.

    Args:
        candidates: model folders of one architecture (causal LMs, or sequence-classification
            reward models: a soup of reward models scored by preference accuracy is WARM).
        data: evaluation files or folders (see `alloy.eval.load_eval_sets`); held-out data.
        method: "greedy" (Wortsman et al.'s greedy soup) or "uniform" (average everything).
        metric: what to optimise (perplexity, bits_per_byte, accuracy, accuracy_norm); by
            default perplexity for text data and accuracy for choice and preference data.
        on_score: called with (labels of the soup, its score) after every evaluation.
    Returns:
        The report (also written to `out` as soup.json, soup.md and soup.png).
    """
    settings = settings or EvalSettings()
    inputs = check_inputs(
        candidates,
        data,
        out,
        method=method,
        metric=metric,
        settings=settings,
        force=force,
        device=device,
        allow_pickle=allow_pickle,
    )
    report = cook(
        inputs,
        method=method,
        settings=settings,
        device=device,
        allow_pickle=allow_pickle,
        on_score=on_score,
    )
    write_soup(
        report,
        out,
        force=force,
        hash_inputs=hash_inputs,
        command=command,
        allow_pickle=allow_pickle,
    )
    return report


def cook(
    inputs: SoupInputs,
    *,
    method: str,
    settings: EvalSettings,
    device: str = "cpu",
    allow_pickle: bool = False,
    on_score: ScoreCallback | None = None,
) -> SoupReport:
    """Load the candidates and choose the soup, scoring every candidate soup in memory."""
    kitchen = Kitchen.load(inputs.candidates, device=device, allow_pickle=allow_pickle)
    labels = labels_for(inputs.candidates)
    results: dict[tuple[int, ...], dict[str, Any]] = {}

    def score(subset: tuple[int, ...]) -> float:
        if subset not in results:
            results[subset] = evaluate(kitchen.scorer(subset), inputs.sets, settings)
        value = objective_value(results[subset], inputs.objective)
        if on_score is not None:
            on_score(tuple(labels[k] for k in subset), value)
        return value

    ids = list(range(len(inputs.candidates)))
    selection = METHODS[method](ids, score, higher_is_better=inputs.objective.higher_is_better)
    return SoupReport(
        candidates=inputs.candidates,
        labels=labels,
        objective=inputs.objective,
        selection=selection,
        results=results,
        settings=settings,
        data={s.name: {"path": str(s.path), "kind": s.kind} for s in inputs.sets},
        warnings=inputs.warnings,
        ingredient_bytes=kitchen.nbytes,
    )


def write_soup(
    report: SoupReport,
    out: str | Path,
    *,
    force: bool = False,
    hash_inputs: bool = True,
    command: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write the chosen soup with its report files, all or nothing.

    `merge()` publishes its own atomic folder; it is pointed inside this function's atomic
    folder, and its files are then moved up beside the report files, so the final rename
    publishes model and report together.
    """
    chosen = report.chosen_paths
    selection = report.selection
    name = (
        f"{selection.method} soup of {len(chosen)} of {len(report.candidates)} candidates"
        if selection.method == "greedy"
        else f"uniform soup of {len(chosen)} models"
    )
    try:
        with AtomicFolder(out, force=force) as tmp:
            staged = tmp / "model"
            merge(
                soup_recipe(chosen, name),
                staged,
                hash_inputs=hash_inputs,
                command=command,
                allow_pickle=allow_pickle,
            )
            for entry in sorted(staged.iterdir()):
                entry.rename(tmp / entry.name)
            staged.rmdir()
            (tmp / "soup.json").write_text(json.dumps(soup_json(report), indent=2) + "\n")
            (tmp / "soup.md").write_text(soup_markdown(report), encoding="utf-8")
            plotted = plot_soup(report, tmp / "soup.png")
            with (tmp / "README.md").open("a", encoding="utf-8") as card:
                card.write("\n" + soup_markdown(report, heading="##"))
                if not plotted:
                    card.write("\n(soup.png was not drawn: install matplotlib.)\n")
    except OSError as exc:  # the atomic folder is gone: name the user's path, not its sibling
        raise InputError(
            f"OUT {out}: cannot write the soup: {describe(exc)}; choose another path or free space"
        ) from exc
    report.out = Path(out)
    return Path(out)
