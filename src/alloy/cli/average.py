"""`alloy average CKPT... OUT`: average saved training checkpoints (uniform, EMA or LaWA).

Like `alloy merge`, this does not import transformers: the average streams through the merge
engine (see alloy.average.offline).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from alloy.cli.main import ALLOW_PICKLE, FORCE, app
from alloy.cli.merge import run_with_progress
from alloy.cli.moe import MergekitFlagsCommand


@app.command(cls=MergekitFlagsCommand)
def average(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CKPT...",
            help="Checkpoint folders, or training output folders holding checkpoint-<N> folders.",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    method: Annotated[
        str, typer.Option(help="uniform (mean), ema (exponential, oldest first) or lawa (last k).")
    ] = "uniform",
    decay: Annotated[
        float | None,
        typer.Option(help="EMA decay per checkpoint (required for ema; per-step b -> b**S)."),
    ] = None,
    k: Annotated[int | None, typer.Option("--k", help="LaWA: average the latest K.")] = None,
    force: Annotated[bool, FORCE] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the order and weights; write nothing.")
    ] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
) -> None:
    """Average CKPTs into OUT: each method becomes one weight per checkpoint, ordered by training
    step (trainer_state.json, else the checkpoint-<N> name), executed as a streaming merge."""
    from alloy.average.offline import plan_average
    from alloy.io.atomic import check_output_folder
    from alloy.io.writable import check_writable

    if not dry_run:
        check_output_folder(out, force=force)
        check_writable(out, "OUT")
    average_plan = plan_average(checkpoints, method=method, decay=decay, k=k)
    console = Console(stderr=True, highlight=False)
    if dry_run or not quiet:
        typer.echo(average_plan.summary(), err=not dry_run)
    merge_plan = average_plan.merge_plan(allow_pickle=allow_pickle)
    for warning in merge_plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", markup=True)
    if dry_run:
        return
    command = "alloy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    path = run_with_progress(
        "averaging",
        merge_plan,
        console,
        quiet=quiet,
        out=out,
        force=force,
        allow_pickle=allow_pickle,
        command=command,
    )
    if not quiet:
        console.print(f"wrote {path} ({merge_plan.output_bytes / 1e6:,.1f} MB)")
