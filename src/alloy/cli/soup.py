"""`alloy soup --candidates A B C --eval DATA OUT`: uniform and greedy model soups (and WARM).

Candidate soups are scored in memory by `alloy.eval`; only the chosen soup is written, with
soup.json, soup.md and soup.png beside it (see docs/soup.md).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperOption

from alloy.cli.main import (
    ALLOW_PICKLE,
    BATCH_SIZE,
    FORCE,
    MAX_ITEMS,
    MAX_TOKENS,
    STRIDE,
    WINDOW,
    app,
    quiet_transformers,
)
from alloy.cli.moe import MergekitFlagsCommand
from alloy.errors import InputError

CANDIDATE_FLAGS = ("--candidates", "-c")


def spread_candidates(
    args: Sequence[str], *, value_options: Collection[str], flags: Collection[str] = CANDIDATE_FLAGS
) -> list[str]:
    """Rewrite `--candidates A B C` as `--candidates A --candidates B --candidates C` (or the
    same for another list option, `flags`).

    Click options take one value each; a list of model folders after one flag (what a shell glob
    gives) reads better. The list ends at the next option, so OUT goes after another option
    (`--candidates A B --eval D OUT`), never straight after the list: guessing that the last
    folder of a list is OUT could overwrite a candidate when OUT was forgotten.

    Args:
        value_options: names of the options that take a value (their value is not positional).
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out += args[i:]
            break
        if token in flags:
            start = i = i + 1
            while i < len(args) and not args[i].startswith("-"):
                i += 1
            values = args[start:i]
            out += [part for value in values for part in (token, value)] if values else [token]
        elif token in value_options:
            out += args[i : i + 2]
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def value_options(command: Any, ctx: Any) -> set[str]:
    """Names of `command`'s options that take a value (so that value is not positional)."""
    return {
        name
        for param in command.get_params(ctx)
        if isinstance(param, TyperOption) and not param.is_flag
        for name in param.opts
    }


class _SoupCommand(MergekitFlagsCommand):
    """Typer's command, with `--candidates A B C` spread before click parses the arguments."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's click Context
        spread = spread_candidates(args, value_options=value_options(self, ctx))
        try:
            return super().parse_args(ctx, list(spread))  # click consumes the list it gets
        except typer.BadParameter as exc:  # OUT has no type check: it can only be missing
            if exc.param is not None and exc.param.name == "out":
                swallowed_out(spread)
            raise


def swallowed_out(args: Sequence[str]) -> None:
    """Raise an InputError saying so when OUT is missing because it was written straight after
    the candidate list (`-c A B OUT --eval D`) and so taken as a candidate: the last candidate
    is then not a model folder."""
    given = [args[k + 1] for k in range(len(args) - 1) if args[k] in CANDIDATE_FLAGS]
    if len(given) > 1 and not (Path(given[-1]) / "config.json").is_file():
        raise InputError(
            f"missing OUT: {given[-1]!r} was taken as a candidate, since the list after -c runs "
            "to the next option; put OUT before -c (alloy soup OUT -c A B --eval D) or use -c "
            "once per candidate (-c A -c B OUT)"
        )


def _table(title: str, columns: list[str], rows: list[list[str]], right: int) -> Table:
    table = Table(title=title, title_justify="left")
    for k, column in enumerate(columns):
        table.add_column(column, justify="right" if k >= right else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


_HELP = (
    "Average the best subset of the candidates (greedy soup) or all of them (uniform) into OUT."
    "\n\n"
    "Every candidate soup is scored in memory on --eval; only the chosen one is written, with "
    "soup.json, soup.md and soup.png. Reward models (...ForSequenceClassification) scored on "
    "preference data make a WARM soup."
    "\n\n"
    "The candidate list ends at the next option, so write OUT after another option: "
    "alloy soup --candidates A B C --eval val.jsonl OUT"
)


@app.command("soup", cls=_SoupCommand, help=_HELP)
def soup_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    candidates: Annotated[
        list[Path],
        typer.Option(
            "--candidates",
            "-c",
            help="Candidate model folders (the ingredients), one architecture: -c A B C.",
        ),
    ],
    eval_data: Annotated[
        list[Path],
        typer.Option(
            "--eval",
            "-e",
            help="Held-out data: text, JSONL (text; context/choices/answer; "
            "prompt/chosen/rejected) or a folder of them. Repeat for more.",
        ),
    ],
    method: Annotated[
        str, typer.Option(help="greedy (add best-first while not worse) or uniform (all).")
    ] = "greedy",
    metric: Annotated[
        str | None,
        typer.Option(
            help="What to optimise: perplexity, bits_per_byte, accuracy or accuracy_norm "
            "(default: perplexity for text, accuracy for choice and preference data)."
        ),
    ] = None,
    window: Annotated[int | None, WINDOW] = None,
    stride: Annotated[int | None, STRIDE] = None,
    batch_size: Annotated[int, BATCH_SIZE] = 8,
    max_tokens: Annotated[int | None, MAX_TOKENS] = None,
    max_items: Annotated[int | None, MAX_ITEMS] = None,
    device: Annotated[str, typer.Option(help="Where to score: cpu, cuda, cuda:1, ...")] = "cpu",
    force: Annotated[bool, FORCE] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    no_hash: Annotated[
        bool, typer.Option("--no-hash", help="Do not record input SHA-256s in the model card.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-soup progress.")] = False,
) -> None:
    """`alloy soup`: check, cook in memory, write the chosen soup, print the tables (see _HELP)."""
    from alloy.eval import EvalSettings
    from alloy.soup.checks import check_inputs
    from alloy.soup.report import (
        INGREDIENT_COLUMNS,
        STEP_COLUMNS,
        format_score,
        ingredient_rows,
        step_rows,
        summary_line,
    )
    from alloy.soup.soup import cook, write_soup

    settings = EvalSettings(window, stride, batch_size, max_tokens, max_items)
    inputs = check_inputs(
        candidates,
        eval_data,
        out,
        method=method,
        metric=metric,
        settings=settings,
        force=force,
        device=device,
        allow_pickle=allow_pickle,
    )
    err = Console(stderr=True, highlight=False)
    for warning in inputs.warnings:
        err.print(f"[yellow]warning:[/] {warning}", markup=True, soft_wrap=True)
    quiet_transformers()
    metric_name = inputs.objective.metric

    def on_score(labels: tuple[str, ...], value: float) -> None:
        if not quiet:
            soup = " + ".join(labels)
            err.print(f"scored {soup}: {metric_name} {format_score(value, metric_name)}")

    if not quiet:
        err.print(f"objective: {inputs.objective.description}")
    report = cook(
        inputs,
        method=method,
        settings=settings,
        device=device,
        allow_pickle=allow_pickle,
        on_score=on_score,
    )
    command = "alloy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    write_soup(
        report,
        out,
        force=force,
        hash_inputs=not no_hash,
        command=command,
        allow_pickle=allow_pickle,
    )
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        _table("ingredients (best first)", INGREDIENT_COLUMNS, ingredient_rows(report), 2)
    )
    console.print(_table(f"{method} soup steps", STEP_COLUMNS, step_rows(report), 2))
    console.print(summary_line(report))
    size = report.ingredient_bytes / 1e6
    console.print(f"wrote {out} (soup.json, soup.md, soup.png; ingredients held {size:,.1f} MB)")
