"""`alloy moe`: upcycle dense models into a sparse MoE checkpoint, and report where it routes text.

alloy moe RECIPE.yaml OUT                 # experts from a recipe (mergekit-moe format)
alloy moe MODEL OUT --experts 8           # sparse upcycling: 8 noisy copies of MODEL's MLPs
alloy moe MOE_MODEL --report texts/       # routing report of an existing MoE
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
from rich.console import Console
from typer.core import TyperCommand

from alloy.cli.main import ALLOW_PICKLE, FORCE, app, quiet_transformers
from alloy.errors import InputError

# Flags of mergekit and mergekit-moe that alloy has no use for, with what to do instead (click
# would suggest the nearest spelling: --allow-pickle for --lazy-unpickle, which is wrong).
LAZY_READS = (
    "alloy always reads weights lazily, one tensor at a time "
    "(--allow-pickle is only for reading PyTorch .bin pickles)"
)
MERGEKIT_FLAGS = {"--lazy-unpickle": f"{LAZY_READS}; drop the flag"}


class MergekitFlagsCommand(TyperCommand):
    """Typer's command, with a mergekit flag that alloy lacks explained instead of respelt
    (`flags`: flag -> what to do instead; a subclass gives its own command's table)."""

    flags: ClassVar[dict[str, str]] = MERGEKIT_FLAGS

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's click Context
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as exc:  # click's NoSuchOption has `option_name`
            name = getattr(exc, "option_name", None)
            if name in self.flags:
                exc.message = f"No such option: {name} (a mergekit flag); {self.flags[name]}"
                exc.possibilities = None  # type: ignore[attr-defined]  # set by NoSuchOption
            raise


_HELP = (
    "Build a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint in OUT from dense models of one family, "
    "or report where an MoE routes text."
    "\n\n"
    "SOURCE is a recipe (.yaml; mergekit-moe recipes work as they are), a dense model folder "
    "with --experts N (sparse upcycling: N copies of its MLPs), or an MoE folder with --report. "
    "After building, routing.md/.json/.png in OUT show which expert each --report text set "
    "(default: each expert's prompts) goes to, layer by layer."
)


@app.command("moe", cls=MergekitFlagsCommand, help=_HELP)
def moe_command(
    source: Annotated[
        Path, typer.Argument(metavar="SOURCE", help="Recipe (.yaml), dense model, or MoE model.")
    ],
    out: Annotated[
        Path | None,
        typer.Argument(metavar="[OUT]", help="Output folder (for a report only: where to write)."),
    ] = None,
    experts: Annotated[
        int | None, typer.Option(help="Sparse upcycling: this many copies of SOURCE's MLPs.")
    ] = None,
    experts_per_token: Annotated[
        int, typer.Option(help="Sparse upcycling: experts each token is sent to.")
    ] = 2,
    gate_mode: Annotated[
        str, typer.Option(help="Sparse upcycling: router init, random or uniform_random.")
    ] = "random",
    relative_noise: Annotated[
        float,
        typer.Option(help="Sparse upcycling: noise std as a fraction of each weight's std."),
    ] = 0.01,
    architecture: Annotated[
        str | None, typer.Option(help="Sparse upcycling: mixtral, qwen or qwen3 (default: auto).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sparse upcycling: seed of noise and routers.")] = 0,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            help="Text sets to route (text / JSONL files or folders; a set named like an expert "
            "gives its routing accuracy). Repeat for more."
        ),
    ] = None,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Skip the routing report.")
    ] = False,
    max_tokens: Annotated[
        int, typer.Option(help="Route at most this many tokens of each text set.")
    ] = 20000,
    device: Annotated[str, typer.Option(help="Where to run models: cpu, cuda, ...")] = "cpu",
    force: Annotated[bool, FORCE] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
) -> None:
    """`alloy moe` (see _HELP)."""
    from alloy.device import resolve_device
    from alloy.io.writable import check_writable
    from alloy.moe.recipe import load_moe_recipe, upcycle_recipe
    from alloy.moe.upcycle import upcycle

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    resolve_device(device)
    is_recipe = source.suffix in (".yaml", ".yml")
    if not is_recipe and experts is None:
        if not report:
            raise InputError(
                f"{source}: give a recipe (.yaml), --experts N to upcycle a dense model, "
                "or --report TEXTS to report an MoE's routing"
            )
        _report_only(source, out, report, max_tokens, device, err)
        return
    if out is None:
        raise InputError("give OUT, the folder to write the MoE to")
    check_writable(out, "OUT")
    if is_recipe:
        if experts is not None:
            raise InputError("--experts is for upcycling a model folder; a recipe lists experts")
        recipe = load_moe_recipe(source)
    else:
        assert experts is not None
        recipe = upcycle_recipe(
            source,
            experts,
            experts_per_token=experts_per_token,
            gate_mode=gate_mode,
            relative_noise=relative_noise,
            architecture=architecture,
            seed=seed,
        )
    texts = _text_sets(report) if report else None  # checked before anything is built
    quiet_transformers()
    command = "alloy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    result = upcycle(
        recipe,
        out,
        force=force,
        device=device,
        allow_pickle=allow_pickle,
        command=command,
        progress=lambda message: err.print(message),
    )
    for warning in result.plan.warnings:
        err.print(f"[yellow]warning:[/] {warning}", markup=True)
    plan = result.plan
    err.print(
        f"wrote {out}: {plan.arch.class_name}, {plan.num_experts} experts, "
        f"{recipe.experts_per_token} per token, {plan.num_layers} layers"
    )
    if no_report:
        return
    if texts is None:
        texts = {e.name: list(e.positive) for e in recipe.experts if e.positive}
    if texts:
        _report(out, texts, max_tokens, device, out, err)


def _text_sets(paths: list[Path]) -> dict[str, list[str]]:
    from alloy.errors import Problem
    from alloy.eval.data import load_eval_sets

    missing = [
        Problem(str(p), "not found", "check the --report path") for p in paths if not p.exists()
    ]
    if missing:  # reported here, so that the hint names --report (not eval's --data)
        raise InputError("--report takes text sets", missing)
    sets = load_eval_sets(paths)
    wrong = [
        Problem(str(s.path), f"holds {s.kind} items", "give text") for s in sets if s.kind != "text"
    ]
    if wrong:
        raise InputError("--report takes text sets", wrong)
    return {s.name: [str(item) for item in s.items] for s in sets}


def _report_only(
    model: Path, out: Path | None, paths: list[Path], max_tokens: int, device: str, err: Console
) -> None:
    from alloy.io.checkpoint import check_weights
    from alloy.io.writable import check_writable

    if out is not None:  # the report goes into OUT, which may exist (the MoE itself, say)
        check_writable(out, "OUT")
        if out.is_dir():
            check_writable(out / "routing.json", "OUT", folder=False)
    texts = _text_sets(paths)
    check_weights(model)  # a truncated file is named here, not by transformers' loader
    quiet_transformers()
    _report(model, texts, max_tokens, device, out, err)


def _report(
    model: Path,
    texts: dict[str, list[str]],
    max_tokens: int,
    device: str,
    folder: Path | None,
    err: Console,
) -> None:
    from alloy.moe.report import expert_names, load_moe, routing_report, write_report

    moe, tokenizer = load_moe(model, device)
    config = moe.config
    count = getattr(config, "num_local_experts", None) or config.num_experts
    routing = routing_report(
        moe, tokenizer, texts, experts=expert_names(model, count), max_tokens=max_tokens
    )
    typer.echo(routing.summary_table())
    if folder is not None:
        try:
            written = write_report(routing, folder)
        except OSError as exc:
            from alloy.io.writable import describe

            raise InputError(f"{folder}: cannot write the routing report: {describe(exc)}") from exc
        err.print("report: " + ", ".join(str(p) for p in written))
