"""`alloy train RECIPE OUT`: continued pre-training, SFT and distillation from a YAML recipe."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from alloy.cli.main import FORCE, app, on_interrupt, quiet_transformers
from alloy.errors import InputError, Problem


def parse_overrides(values: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (VALUE read as YAML: 1e-3 is a number, [a, b] a list)."""
    from alloy.io.yamlfile import read_yaml

    out: dict[str, Any] = {}
    problems = []
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            problems.append(
                Problem(f"--set {value}", "expected KEY=VALUE", "e.g. --set max_steps=10")
            )
            continue
        out[key.strip()] = read_yaml(text, f"--set {key}") if text.strip() else None
    if problems:
        raise InputError("bad --set", problems)
    return out


class _Progress:
    """A progress bar on a terminal (step, loss, tokens/s, ETA); log lines elsewhere."""

    def __init__(self, every: int, quiet: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.steps, self.every, self.quiet = 0, every, quiet
        self.bar = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet or not self.console.is_terminal,
            transient=True,
        )
        self.task = self.bar.add_task("training", total=None, status="")

    def start_plan(self, plan: Any) -> None:
        self.steps = plan.steps
        self.bar.update(self.task, total=plan.steps)
        if not self.quiet:
            self.console.print(plan.summary(), markup=False)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def row(self, row: dict[str, Any]) -> None:
        speed = row.get("tokens_per_s")
        status = f"loss {row['loss']:.4f}" + (f", {speed:,.0f} tok/s" if speed else "")
        self.bar.update(self.task, completed=row["step"], status=status)
        if (
            self.bar.disable
            and not self.quiet
            and (row["step"] % self.every == 0 or row["step"] == self.steps)
        ):
            left = ""
            if speed:
                remaining = (self.steps - row["step"]) * row["tokens"] / speed
                left = f", ETA {remaining / 60:.1f} min"
            self.console.print(
                f"step {row['step']}/{self.steps}: loss {row['loss']:.4f}, lr {row['lr']:.3g}"
                + (f", {speed:,.0f} tok/s" if speed else "")
                + left,
                markup=False,
            )


@app.command("train")
def train_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Training recipe (YAML).")],
    out: Annotated[Path | None, typer.Argument(metavar="OUT", help="Output model folder.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run from OUT.checkpoints.")
    ] = False,
    force: Annotated[bool, FORCE] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check everything and print the plan; train nothing."),
    ] = False,
    plot_schedule: Annotated[
        Path | None,
        typer.Option("--plot-schedule", help="Draw the recipe's learning rate per step to a PNG."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Replace a recipe value: KEY=VALUE, dotted (repeatable)."),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="With adapter: write the start model with the adapter folded in."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train a model as RECIPE says and write it to OUT.

    Objectives: causal_lm, sft, distill, dpo, reward (a Bradley-Terry reward model).

    With `adapter:` (LoRA, DoRA, VeRA) OUT is a PEFT adapter folder, or with --merge the folded
    model. Works unchanged under `accelerate launch` (DDP, FSDP, DeepSpeed).
    """
    from alloy.io.writable import check_writable
    from alloy.io.yamlfile import read_recipe
    from alloy.train import dry_run as plan_run
    from alloy.train import load_train_recipe
    from alloy.train import train as run_train
    from alloy.train.recycle import is_recycle_recipe
    from alloy.train.run import wants_merge

    values = parse_overrides(overrides or [])
    raw, _ = read_recipe(recipe, "training recipe", "objective:, model:, data:, ...")
    if is_recycle_recipe(raw):
        _recycle(recipe, out, force=force, dry_run=dry_run, quiet=quiet, overrides=values)
        return
    loaded = load_train_recipe(recipe, overrides=values)
    wants_merge(loaded, merge)  # --merge without an adapter: refused before any work
    if plot_schedule is not None:
        check_writable(plot_schedule, "--plot-schedule", folder=False)
    if out is not None and not dry_run:
        check_writable(out, "OUT")  # before training, not at the last write
    quiet_transformers()
    if dry_run or plot_schedule is not None:
        plan = plan_run(loaded)
        if plot_schedule is not None:
            from alloy.io.writable import describe
            from alloy.train.outputs import plot_schedule as draw

            title = f"{loaded.spec.schedule['name']} over {plan.steps} steps"
            try:
                plot_schedule.parent.mkdir(parents=True, exist_ok=True)
                drawn = draw(plan.schedule, plan.steps, plot_schedule, title)
            except OSError as exc:
                where = f"--plot-schedule {plot_schedule}"
                raise InputError(f"{where}: cannot write: {describe(exc)}") from exc
            if not drawn:
                raise InputError("--plot-schedule needs matplotlib (pip install matplotlib)")
            typer.echo(f"wrote {plot_schedule}")
        if dry_run:
            typer.echo(plan.summary())
        return
    if out is None:
        raise InputError("alloy train needs OUT, the output model folder (or --dry-run)")
    command = "alloy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    if loaded.spec.checkpoints.every:
        kept = out.with_name(out.name + ".checkpoints")
        on_interrupt(f"checkpoints saved so far stay in {kept}; add --resume to continue")
    with _Progress(loaded.spec.log_every, quiet) as progress:
        result = run_train(
            loaded,
            out,
            resume=resume,
            force=force,
            say=progress.say,
            on_row=progress.row,
            on_plan=progress.start_plan,
            command=command,
            merge=merge,
        )
    if not quiet:
        typer.echo(
            f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.0f}s; "
            f"final loss {result.final_loss:.4f}; wrote {result.path}"
        )


def _recycle(
    recipe: Path,
    out: Path | None,
    *,
    force: bool,
    dry_run: bool,
    quiet: bool,
    overrides: dict[str, Any],
) -> None:
    """A ratatouille or bagging recipe: every stage an `alloy train` run, then the combination."""
    from alloy.train.recycle import load_recycle_recipe, recycle

    if overrides:
        raise InputError("--set applies to training recipes, not to recycling recipes")
    if out is None:
        raise InputError("a recycling recipe needs OUT, the pipeline folder")
    if not dry_run:
        from alloy.io.writable import check_writable

        check_writable(out, "OUT")
    quiet_transformers()
    plan = load_recycle_recipe(recipe, out)
    if dry_run:
        typer.echo(plan.summary())
        return
    report = recycle(recipe, out, force=force, say=(lambda m: None) if quiet else typer.echo)
    if not quiet and "scores" in report:
        from alloy.cli.eval import print_results

        print_results(report["scores"], None, f"{report['recycle']} (eval data)")
    typer.echo(f"wrote {out}")
