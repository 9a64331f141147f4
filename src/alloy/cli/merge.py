"""`alloy merge`, `alloy validate` and `alloy methods`.

None of these import transformers: start-up time is part of what a user waits for.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alloy.cli.main import ALLOW_PICKLE, FORCE, app
from alloy.cli.moe import LAZY_READS, MergekitFlagsCommand
from alloy.errors import InputError


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise InputError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(value * units[unit])


# What alloy does instead of what these mergekit flags ask for (the flags are accepted).
MERGEKIT_NOTES = {
    "--lazy-unpickle": LAZY_READS,
    "--allow-crimes": "alloy merges only models of one architecture with the same tensor names "
    "and shapes, and says what differs otherwise",
}


def _kmb(text: str) -> int:
    """mergekit's --out-shard-size: an integer with an optional K, M or B (10^3, 10^6, 10^9)."""
    cleaned = text.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(cleaned[-1:].lower(), 1)
    digits = cleaned[:-1] if scale > 1 else cleaned
    if not digits.isdigit() or int(digits) == 0:
        raise InputError(f"--out-shard-size {text!r}: expected a size such as 5B, 500M or 1000K")
    return int(digits) * scale


def run_with_progress(
    label: str, merge_plan: Any, console: Console, *, quiet: bool, **options: Any
) -> Path:
    """Execute a MergePlan with a per-tensor progress bar on a terminal (`options` go to merge)."""
    from alloy.merge.api import merge as run_merge

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=len(merge_plan.jobs))
        return run_merge(merge_plan, on_tensor=lambda job: progress.advance(task), **options)


@app.command(cls=MergekitFlagsCommand)
def merge(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Merge recipe (YAML).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    force: Annotated[bool, FORCE] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check everything and print the plan; write nothing.")
    ] = False,
    device: Annotated[str, typer.Option(help="Where to compute: cpu, cuda, cuda:1, ...")] = "cpu",
    shard_size: Annotated[str, typer.Option(help="Bytes per output shard, e.g. 5GB.")] = "5GB",
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    no_hash: Annotated[
        bool, typer.Option("--no-hash", help="Do not record input SHA-256s in the model card.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="With --dry-run, list every tensor (not each layer)."),
    ] = False,
    cuda: Annotated[
        bool, typer.Option("--cuda", help="mergekit's spelling of --device cuda.")
    ] = False,
    out_shard_size: Annotated[
        str | None,
        typer.Option(help="mergekit's shard size (5B, 500M; bytes, as its writer counts them)."),
    ] = None,
    copy_tokenizer: Annotated[
        bool, typer.Option(help="Copy the tokenizer files (mergekit's flag).")
    ] = True,
    write_model_card: Annotated[
        bool, typer.Option(help="Write README.md, the model card (mergekit's flag).")
    ] = True,
    lazy_unpickle: Annotated[
        bool, typer.Option("--lazy-unpickle", help="Accepted for mergekit scripts; see the note.")
    ] = False,
    allow_crimes: Annotated[
        bool, typer.Option("--allow-crimes", help="Accepted for mergekit scripts; see the note.")
    ] = False,
) -> None:
    """Merge the models of RECIPE into OUT (mergekit-compatible YAML).

    mergekit-yaml's flags work too; OUT holds the recipe as mergekit_config.yml. Example:

    alloy merge recipe.yml out --cuda --out-shard-size 1B --no-copy-tokenizer
    """
    from alloy.device import resolve_device
    from alloy.io.atomic import check_output_folder
    from alloy.io.writable import check_writable
    from alloy.merge.api import plan

    if cuda:
        if device != "cpu" and not device.startswith("cuda"):
            raise InputError(f"--cuda and --device {device} disagree; give one of them")
        device = "cuda" if device == "cpu" else device
    max_shard_bytes = parse_size(shard_size) if out_shard_size is None else _kmb(out_shard_size)
    for flag, given in (("--lazy-unpickle", lazy_unpickle), ("--allow-crimes", allow_crimes)):
        if given:
            typer.echo(f"note: {flag}: {MERGEKIT_NOTES[flag]}", err=True)
    if not dry_run:
        check_output_folder(out, force=force)
        check_writable(out, "OUT")  # before planning or reading anything
        resolve_device(device)  # an unknown --device lists the devices here
    merge_plan = plan(recipe, allow_pickle=allow_pickle)
    console = Console(stderr=True, highlight=False)
    for warning in merge_plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", markup=True)
    if dry_run:
        typer.echo(merge_plan.summary(full=verbose))
        return
    command = "alloy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    path = run_with_progress(
        "merging",
        merge_plan,
        console,
        quiet=quiet,
        out=out,
        force=force,
        device=device,
        max_shard_bytes=max_shard_bytes,
        allow_pickle=allow_pickle,
        hash_inputs=not no_hash,
        command=command,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
    )
    if not quiet:
        size = merge_plan.output_bytes / 1e6
        console.print(f"wrote {path} ({len(merge_plan.jobs)} tensors, {size:,.1f} MB)")


@app.command()
def validate(
    recipe: Annotated[
        Path,
        typer.Argument(metavar="RECIPE", help="Merge, ensemble, MoE, training or improve recipe."),
    ],
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    recipe_only: Annotated[
        bool, typer.Option("--recipe-only", help="Check the recipe alone, not the models.")
    ] = False,
) -> None:
    """Check any recipe and what it names (configs, headers and data; no tensor data is read).

    Kind by key: merge_method (merge), rule (ensemble), experts (MoE), objective (training),
    improve (an improvement loop).
    """
    from alloy.io.yamlfile import read_recipe

    raw, _ = read_recipe(recipe, "recipe", "merge_method:, rule:, experts: or objective:")
    kind = _recipe_kind(raw)
    for warning in _VALIDATORS[kind](recipe, allow_pickle, recipe_only):
        typer.echo(warning)


def _recipe_kind(raw: dict[str, Any]) -> str:
    if "improve" in raw:
        return "improve"
    if "rule" in raw:
        return "ensemble"
    if "objective" in raw:
        return "train"
    if "merge_method" not in raw and _looks_like_moe(raw):
        return "moe"
    return "merge"


def _looks_like_moe(raw: dict[str, Any]) -> bool:
    """Whether a recipe without `merge_method` is a mergekit-moe one: it has a key only MoE
    recipes have (`gate_mode`, `experts_per_token`, ...), or a misspelling of one (`expert:`),
    so that its problems are reported against the MoE schema, not as a missing merge_method."""
    import difflib

    from alloy.merge.recipe import Recipe
    from alloy.moe.recipe import MoeRecipeSchema

    own = set(MoeRecipeSchema.model_fields) - set(Recipe.model_fields)
    others = [str(k) for k in raw if k not in Recipe.model_fields]
    return any(k in own or difflib.get_close_matches(k, own, n=1, cutoff=0.85) for k in others)


def _validate_merge(recipe: Path, allow_pickle: bool, recipe_only: bool) -> list[str]:
    from alloy.merge.api import plan
    from alloy.merge.recipe import load_recipe

    if recipe_only:
        parsed = load_recipe(recipe)
        for warning in parsed.warnings:
            typer.echo(f"warning: {warning}", err=True)
        return [f"ok: {parsed.method.name} recipe with {len(parsed.model_paths())} models"]
    merge_plan = plan(recipe, allow_pickle=allow_pickle)
    for warning in merge_plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    return [
        f"ok: {merge_plan.method.name} of {len(merge_plan.paths)} models, "
        f"{len(merge_plan.jobs)} tensors, {merge_plan.output_bytes / 1e6:,.1f} MB out"
    ]


def _validate_ensemble(recipe: Path, allow_pickle: bool, recipe_only: bool) -> list[str]:
    from alloy.ensemble.recipe import load_ensemble_recipe

    parsed = load_ensemble_recipe(recipe, check_paths=not recipe_only)
    return [f"ok: {parsed.rule} ensemble of {len(parsed.members)} members"]


def _validate_moe(recipe: Path, allow_pickle: bool, recipe_only: bool) -> list[str]:
    from alloy.moe.recipe import load_moe_recipe
    from alloy.moe.upcycle import check_moe

    parsed = load_moe_recipe(recipe)
    if recipe_only:
        return [f"ok: MoE recipe with {len(parsed.experts)} experts"]
    moe_plan = check_moe(parsed, allow_pickle=allow_pickle)
    for warning in moe_plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    return [
        f"ok: {moe_plan.arch.name} MoE with {moe_plan.num_experts} experts "
        f"over {moe_plan.num_layers} layers"
    ]


def _validate_train(recipe: Path, allow_pickle: bool, recipe_only: bool) -> list[str]:
    from alloy.train import dry_run
    from alloy.train.recipe import load_train_recipe

    if recipe_only:
        parsed = load_train_recipe(recipe, check_paths=False)
        return [f"ok: {parsed.spec.objective} training recipe"]
    train_plan = dry_run(recipe)
    return [f"ok: {train_plan.recipe.spec.objective} training, {train_plan.steps} steps"]


def _validate_improve(recipe: Path, allow_pickle: bool, recipe_only: bool) -> list[str]:
    from alloy.improve import load_improve_recipe

    plan = load_improve_recipe(recipe, check_paths=not recipe_only)
    return [f"ok: {plan.spec.improve} loop, {plan.spec.iterations} iteration(s)"]


_VALIDATORS: dict[str, Callable[[Path, bool, bool], list[str]]] = {
    "merge": _validate_merge,
    "ensemble": _validate_ensemble,
    "moe": _validate_moe,
    "train": _validate_train,
    "improve": _validate_improve,
}


def _describe_method(name: str) -> dict[str, Any]:
    from alloy.merge.registry import get_method

    spec = get_method(name)
    return {
        "name": spec.name,
        "summary": spec.summary,
        "reference": spec.reference,
        "base": spec.base,
        "models": [spec.min_models, spec.max_models],
        "random": spec.random,
        "properties": sorted(spec.properties),
        "parameters": [
            {
                "name": p.name,
                "type": p.kind.__name__,
                "per_model": p.per_model,
                "required": p.required,
                "default": None if p.required else p.default,
                "choices": list(p.choices) if p.choices else None,
                "range": str(p.range) if p.range else None,
                "doc": p.doc,
            }
            for p in spec.params.values()
        ],
    }


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(metavar="[METHOD]", help="Show one method.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the merge methods, or one method's parameters, defaults and reference."""
    from alloy.merge.registry import all_methods

    registry = all_methods()
    if name is not None and name not in registry:
        import difflib

        close = difflib.get_close_matches(name, registry, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown merge method {name!r}{hint} (see `alloy methods`)")
    described = [_describe_method(n) for n in ([name] if name else registry)]
    if as_json:
        typer.echo(json.dumps(described if name is None else described[0], indent=2))
        return
    console = Console(highlight=False)
    if name is None:
        table = Table("method", "base", "summary", "reference", box=None, pad_edge=False)
        for m in described:
            table.add_row(m["name"], m["base"], m["summary"], m["reference"])
        console.print(table)
        console.print("`alloy methods NAME` shows a method's parameters.")
        return
    m = described[0]
    console.print(f"[bold]{m['name']}[/]: {m['summary']}\nreference: {m['reference']}")
    low, high = m["models"]
    console.print(f"base model: {m['base']}; models: {low} to {high or 'any'}")
    table = Table(
        "parameter", "type", "range", "scope", "default", "meaning", box=None, pad_edge=False
    )
    for p in m["parameters"]:
        kind = "|".join(p["choices"]) if p["choices"] else p["type"]
        default = "required" if p["required"] else repr(p["default"])
        scope = "per model" if p["per_model"] else "shared"
        table.add_row(p["name"], kind, p["range"] or "", scope, default, p["doc"])
    console.print(table)
