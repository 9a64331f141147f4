"""`alloy improve RECIPE OUT`: RAFT, ReST and self-rewarding loops (alloy.improve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alloy.cli.main import app, on_interrupt, quiet_transformers


@app.command("improve")
def improve_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Improve recipe (YAML).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of the loop.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start over: clear OUT (even a folder that is not a loop's) and redo everything.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check everything and print the plan; run nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Improve a model by its own samples, RECIPE's `improve:` says how:

    raft (keep each prompt's best samples, fine-tune), rest (Grow, then Improve steps at rising
    thresholds), self_reward (the model judges its own samples; DPO on best vs worst).

    Every iteration is an ordinary alloy train run; every sample set, training set and model is
    kept under OUT, with report.json / report.md / report.png. Running again continues a stopped
    loop (finished iterations with the same settings are reused).
    """
    from alloy.improve import improve, load_improve_recipe
    from alloy.io.writable import check_writable

    plan = load_improve_recipe(recipe, out)
    if dry_run:
        typer.echo(plan.summary())
        return
    check_writable(out, "OUT")
    quiet_transformers()
    on_interrupt(f"finished iterations stay in {out}; run the same command to continue")
    report = improve(plan, out, force=force, say=(lambda m: None) if quiet else typer.echo)
    if not quiet:
        from alloy.improve.report import markdown

        typer.echo(markdown(report))
    typer.echo(f"wrote {out}")
