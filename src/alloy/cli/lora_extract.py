"""`alloy lora extract`: a LoRA adapter from the difference of a fine-tune and its base."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from alloy.cli.lora import lora
from alloy.cli.main import ALLOW_PICKLE, FORCE
from alloy.cli.moe import MergekitFlagsCommand

if TYPE_CHECKING:
    from alloy.adapters.extract import Extraction

# mergekit-extract-lora's spellings, with alloy's (click would suggest unrelated near-spellings).
MERGEKIT_FLAGS = {
    "--max-rank": "alloy's spelling is --rank R (or --energy E for a rank per module)",
    "--model": "FINETUNED is the first argument: alloy lora extract FINETUNED BASE OUT",
    "--base-model": "BASE is the second argument: alloy lora extract FINETUNED BASE OUT",
    "--out-path": "OUT is the third argument: alloy lora extract FINETUNED BASE OUT",
    "--save-module": "--save-full keeps every changed tensor that is not low-rank",
    "--include-regex": "alloy's spelling is --include REGEX",
    "--exclude-regex": "alloy's spelling is --exclude REGEX",
}


class _Command(MergekitFlagsCommand):
    flags = MERGEKIT_FLAGS


@lora.command("extract", cls=_Command)
def extract(
    finetuned: Annotated[
        str, typer.Argument(metavar="FINETUNED", help="The fine-tuned model (or BASE+ADAPTER).")
    ],
    base: Annotated[str, typer.Argument(metavar="BASE", help="The model it was tuned from.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output adapter folder (PEFT).")],
    rank: Annotated[int | None, typer.Option(help="Rank of every LoRA module.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Per module, the least rank keeping this share of ‖ΔW‖² (0-1]."),
    ] = None,
    save_full: Annotated[
        bool,
        typer.Option(
            "--save-full", help="Save changed embeddings, heads and norms as full copies."
        ),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(metavar="REGEX", help="Factor only matrices whose name matches (repeat)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="REGEX", help="Do not factor matrices whose name matches (repeat)."),
    ] = None,
    svd: Annotated[
        str,
        typer.Option(help="auto (randomized when rank <= min dim / 4), exact or randomized."),
    ] = "auto",
    dtype: Annotated[
        str, typer.Option(help="dtype of the factors: float32, bfloat16 or float16.")
    ] = "float32",
    device: Annotated[str, typer.Option(help="Where to compute: cpu, cuda, cuda:1, ...")] = "cpu",
    worst: Annotated[int, typer.Option(help="Modules listed in the summary.")] = 8,
    force: Annotated[bool, FORCE] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
) -> None:
    """Extract OUT, a PEFT LoRA adapter with BASE + OUT ≈ FINETUNED: ΔW = FINETUNED − BASE of
    every linear weight, truncated by SVD. OUT/extract.json reports each module's rank, energy
    kept and relative error ‖ΔW − BA‖ / ‖ΔW‖, and every changed tensor that is not low-rank."""
    from alloy.adapters.extract import check_options, extract_lora
    from alloy.device import resolve_device
    from alloy.io.atomic import check_output_folder
    from alloy.io.writable import check_writable

    check_options(rank, energy, svd, include or [], exclude or [])
    check_output_folder(out, force=force)
    check_writable(out, "OUT")
    target = resolve_device(device)
    console = Console(stderr=True, highlight=False)
    with Progress(
        TextColumn("extracting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task("extracting", total=None)
        result = extract_lora(
            finetuned,
            base,
            out,
            rank=rank,
            energy=energy,
            svd=svd,  # type: ignore[arg-type]  # checked by check_options
            include=include or [],
            exclude=exclude or [],
            save_full=save_full,
            dtype=dtype,
            device=target,
            force=force,
            allow_pickle=allow_pickle,
            on_start=lambda total: progress.update(task, total=total),
            on_tensor=lambda name: progress.advance(task),
        )
    if not quiet:
        console.print(summary(result, worst=worst), markup=False, soft_wrap=True)


def summary(result: Extraction, *, worst: int = 8) -> str:
    """A few lines: modules, median and worst errors, the worst modules, what was left out."""
    modules = result.modules
    errors = [m.error for m in modules]
    ranks = sorted({m.rank for m in modules})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    params = sum(m.rank * sum(m.shape) for m in modules)
    dense = sum(m.shape[0] * m.shape[1] for m in modules)
    lines = [
        f"wrote {result.out}: {len(modules)} LoRA modules, {rank_text}, {params:,} parameters "
        f"({params / dense:.1%} of those matrices)",
        f"relative error ‖ΔW − BA‖/‖ΔW‖: median {statistics.median(errors):.4f}, "
        f"worst {max(errors):.4f}; over every changed tensor {result.total_error:.4f}",
    ]
    shown = sorted(modules, key=lambda m: -m.error)[:worst]
    width = max(len(m.name) for m in shown)
    lines.append(f"  {'module':<{width}}  {'shape':>11}  rank  energy   error  ‖ΔW‖/‖W‖")
    for m in shown:
        shape = "x".join(map(str, m.shape))
        lines.append(
            f"  {m.name:<{width}}  {shape:>11}  {m.rank:>4}  {m.energy:6.4f}  {m.error:6.4f}"
            f"  {m.change:9.2e}"
        )
    if len(modules) > len(shown):
        lines.append(f"  ... {len(modules) - len(shown)} more in {result.out}/extract.json")
    if result.full:
        saved = [f for f in result.full if f.saved]
        lines.append(
            f"not low-rank, changed: {len(result.full)} tensors ({len(saved)} saved as full "
            "copies)" + ("" if saved else "; --save-full keeps those PEFT can restore")
        )
        for f in sorted(result.full, key=lambda f: -f.change)[:worst]:
            state = "saved" if f.saved else (f"not saved: {f.why}" if f.why else "not saved")
            lines.append(f"  {f.name} ({f.kind}) ‖ΔW‖/‖W‖ {f.change:.2e}, {state}")
        if len(result.full) > worst:
            lines.append(f"  ... {len(result.full) - worst} more in extract.json")
    if result.excluded:
        lines.append(f"excluded by --include/--exclude: {len(result.excluded)} matrices")
    lines.append(f"unchanged (ΔW = 0, skipped): {result.unchanged} tensors")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
