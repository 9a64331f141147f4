"""`alloy eval MODEL... --data PATH...`: perplexity, bits per byte, choice and preference
accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from alloy.cli.main import (
    ALLOW_PICKLE,
    BATCH_SIZE,
    MAX_ITEMS,
    MAX_TOKENS,
    STRIDE,
    WINDOW,
    app,
    quiet_transformers,
)
from alloy.errors import InputError, Problem


def print_results(results: dict[str, dict[str, Any]], metric: str | None, title: str) -> None:
    from alloy.eval.run import table_rows

    columns, rows = table_rows(results, metric)
    # The title goes above on its own line: as a table title it wraps to the table's width.
    table = Table()
    table.add_column("model", overflow="fold")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console(highlight=False)
    console.print(title, markup=False, soft_wrap=True)
    console.print(table)


def device_problems(device: str | None, option: str = "--device") -> list[Problem]:
    """Nothing if `device` (None: the default) exists here, else why not (with the devices that
    do)."""
    from alloy.device import resolve_device

    if device is None:
        return []
    try:
        resolve_device(device, option)
    except InputError as exc:
        return [Problem("", exc.message)]
    return []


def weight_problems(model: Path, allow_pickle: bool) -> list[Problem]:
    """What makes `model` unloadable, from headers only: no config.json, truncated or corrupt
    weight files; for `BASE+ADAPTER` also a missing, unreadable or ill-fitting adapter."""
    from alloy.adapters import open_model, split_spec
    from alloy.errors import CheckpointError

    base, adapter = split_spec(model)
    if not (base / "config.json").is_file():
        what = "the base " if adapter is not None else ""
        return [Problem(str(model), f"{what}is not a model folder (no config.json)")]
    try:
        open_model(model, allow_pickle=allow_pickle).close()
    except (CheckpointError, InputError) as exc:
        return [Problem(str(model), exc.message), *exc.problems]
    return []


def ensemble_problems(recipe_path: Path, allow_pickle: bool) -> list[Problem]:
    """What stops an ensemble recipe's members from loading here (devices, weight files); a bad
    recipe raises its RecipeError. Checked before any model is loaded."""
    from alloy.ensemble.recipe import load_ensemble_recipe

    recipe = load_ensemble_recipe(recipe_path)
    problems = device_problems(recipe.device, f"{recipe_path}: device")
    for k, member in enumerate(recipe.members):
        problems += device_problems(member.device, f"{recipe_path}: members.{k}.device")
        problems += weight_problems(Path(member.model), allow_pickle)
    return problems


@app.command("eval")
def eval_command(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL|RECIPE...", help="Model folders or ensemble recipes (.yaml) to score."
        ),
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            "--data",
            "-d",
            help="Text file, JSONL (text; context/choices/answer; prompt/chosen/rejected) or a "
            "folder of them. Repeat for more.",
        ),
    ],
    window: Annotated[int | None, WINDOW] = None,
    stride: Annotated[int | None, STRIDE] = None,
    batch_size: Annotated[int, BATCH_SIZE] = 8,
    max_tokens: Annotated[int | None, MAX_TOKENS] = None,
    max_items: Annotated[int | None, MAX_ITEMS] = None,
    metric: Annotated[
        str, typer.Option(help="Table cell for text sets: perplexity or bits_per_byte.")
    ] = "perplexity",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write all metrics to this JSON file.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
) -> None:
    """Score models or ensembles on --data and print a table (rows: models, columns: sets).

    An ensemble recipe is scored under its rule on the same windows as plain models.
    """
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.io.writable import check_writable, write_file

    if json_out is not None:
        check_writable(json_out, "--json", folder=False)  # before an hour of scoring, not after

    if metric not in ("perplexity", "bits_per_byte"):
        raise InputError(f"--metric {metric!r}: choose perplexity or bits_per_byte")
    problems = [
        Problem(f"--{name}", f"must be positive, got {value}")
        for name, value in (
            ("window", window),
            ("stride", stride),
            ("batch-size", batch_size),
            ("max-tokens", max_tokens),
            ("max-items", max_items),
        )
        if value is not None and value <= 0
    ]
    if window and stride and stride > window:
        problems.append(Problem("--stride", f"{stride} is larger than --window {window}"))
    from alloy.ensemble.recipe import is_recipe_path

    problems += device_problems(device)
    for m in models:
        if is_recipe_path(m):
            problems += ensemble_problems(m, allow_pickle)  # a bad recipe fails here
        else:
            problems += weight_problems(m, allow_pickle)
    if problems:
        raise InputError("cannot evaluate", problems)
    sets = load_eval_sets(data)
    quiet_transformers()
    settings = EvalSettings(window, stride, batch_size, max_tokens, max_items)
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        if is_recipe_path(model):
            from alloy.ensemble import Ensemble

            scorer: Any = Ensemble.from_recipe(model, device=device, allow_pickle=allow_pickle)
            scorer.name = str(model)
        else:
            scorer = load_scorer(model, device=device, allow_pickle=allow_pickle, name=str(model))
        results[str(model)] = evaluate(scorer, sets, settings)
    print_results(results, metric, f"alloy eval ({metric} for text sets, accuracy for tasks)")
    if json_out is not None:
        payload = {
            "settings": settings.__dict__,
            "data": {s.name: {"path": str(s.path), "kind": s.kind} for s in sets},
            "results": results,
        }
        write_file(json_out, json.dumps(payload, indent=2) + "\n", "--json")
