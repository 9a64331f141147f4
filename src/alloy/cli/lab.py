"""`alloy lab ...`: build the models and data the demo, experiments and benchmarks run on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alloy.cli.main import FORCE, app

lab = typer.Typer(help="Build local models and corpora (no download).", no_args_is_help=True)
app.add_typer(lab, name="lab")


@lab.command("tiny")
def tiny(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    arch: Annotated[str, typer.Option(help="llama, mistral, qwen2, gpt2 or mixtral.")] = "llama",
    seed: Annotated[int, typer.Option(help="Seed of the weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Build a tiny seeded checkpoint of a real architecture (for smoke tests and demos)."""
    from alloy.lab.tiny import build_tiny

    path = build_tiny(arch, out, seed=seed, layers=layers, force=force)
    typer.echo(f"wrote {path}")
