"""`alloy lora merge` and `alloy lora fold`: adapters combined exactly, or folded into a base.

Neither imports transformers or PEFT: adapters are read and written as files (alloy.adapters).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from alloy.cli.lora import lora
from alloy.cli.main import FORCE
from alloy.errors import InputError, ProblemCollector


def _numbers(text: str, what: str, problems: ProblemCollector) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            problems.add(what, f"{part!r} is not a number", "e.g. 0.5,0.5")
    return values


def _params(items: list[str], problems: ProblemCollector) -> dict[str, Any]:
    """`KEY=VALUE` (a number, true/false, a word, or comma-separated numbers per adapter)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.add(f"--param {item}", "expected KEY=VALUE", "e.g. --param density=0.5")
            continue
        if value.lower() in ("true", "false"):
            params[key] = value.lower() == "true"
        elif "," in value:
            params[key] = _numbers(value, f"--param {key}", problems)
        else:
            try:
                number = float(value)
                params[key] = int(number) if number.is_integer() and "." not in value else number
            except ValueError:
                params[key] = value
    return params


@lora.command("merge")
def merge(
    adapters: Annotated[
        list[Path], typer.Argument(metavar="ADAPTER...", help="PEFT adapter folders.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output adapter (or model) folder.")],
    weights: Annotated[
        str | None, typer.Option(help="One weight per adapter, comma-separated (default 1 each).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="sum (exact Σ w·B·A), linear (sum with weights normalised), or a task-vector "
            "merge method applied to the updates: task_arithmetic, ties, dare_ties, ..."
        ),
    ] = "sum",
    base: Annotated[
        Path | None,
        typer.Option(help="The base model: checks shapes; needed for DoRA/VeRA and --fold."),
    ] = None,
    fold_base: Annotated[
        bool, typer.Option("--fold", help="Write BASE with the merged update folded in.")
    ] = False,
    rank: Annotated[
        int | None, typer.Option(help="Truncate every output module to this rank (SVD).")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Per module, the smallest rank keeping this share of ‖ΔW‖² (SVD)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Method parameter KEY=VALUE (repeatable), e.g. density=0.5."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of random methods (DARE).")] = 0,
    force: Annotated[bool, FORCE] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Merge ADAPTERs into one adapter OUT: `sum` and `linear` are exact (the ranks are stacked,
    so Σ w_i B_i A_i has no cross terms); other methods merge the dense updates per module and
    are SVD-truncated (retained energy reported), or folded into --base exactly with --fold."""
    from alloy.adapters.combine import combine_adapters

    problems = ProblemCollector()
    parsed_weights = _numbers(weights, "--weights", problems) if weights is not None else None
    params = _params(param or [], problems)
    problems.raise_if_any(InputError, "bad options")
    result = combine_adapters(
        [str(a) for a in adapters],
        out,
        parsed_weights,
        method=method,
        base=base,
        fold_base=fold_base,
        rank=rank,
        energy=energy,
        params=params,
        seed=seed,
        force=force,
    )
    if quiet:
        return
    console = Console(stderr=True, highlight=False)
    summary = result.summary()
    ranks = [m.rank for m in result.modules if m.rank is not None]
    shown = f", ranks {min(ranks)}-{max(ranks)}" if ranks else ""
    console.print(
        f"{method}: {summary['modules']} modules{shown}; retained energy min "
        f"{summary['min_energy']:.4f}, relative error median {summary['median_error']:.2e} "
        f"max {summary['max_error']:.2e}"
    )
    worst = sorted(result.modules, key=lambda m: -m.error)[:3]
    for m in worst:
        if m.error > 0 and not math.isclose(m.error, 0.0):
            console.print(f"  {m.name}: rank {m.rank}, energy {m.energy:.4f}, error {m.error:.2e}")
    kind = "model" if fold_base else "adapter"
    console.print(f"wrote {kind} {result.out} (per-module report: lora_merge.json)")


@lora.command("fold")
def fold(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The base model folder.")],
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="A PEFT adapter folder.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Write BASE with ADAPTER folded in (what PEFT's merge_and_unload gives), streamed tensor
    by tensor in the base's dtypes; LoRA, rsLoRA, DoRA and VeRA."""
    from alloy.adapters.combine import fold_adapter

    path = fold_adapter(base, adapter, out, force=force)
    Console(stderr=True, highlight=False).print(f"wrote {path}")
