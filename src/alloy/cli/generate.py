"""`alloy generate TARGET --prompt ...`: decode with an ensemble recipe (or one model folder), and
`alloy rules`: the ensemble rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alloy.cli.main import ALLOW_PICKLE, app, quiet_transformers
from alloy.errors import InputError, Problem

TARGET = typer.Argument(
    metavar="RECIPE|MODEL", help="An ensemble recipe (.yaml) or one model folder."
)


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """--prompt values, then the lines of --prompts (a .jsonl file: each record's "prompt")."""
    out = list(prompts)
    if prompts_file is None:
        return out
    if not prompts_file.is_file():
        raise InputError(f"--prompts {prompts_file}: no such file")
    text = prompts_file.read_text(encoding="utf-8")
    if prompts_file.suffix != ".jsonl":
        return out + [line for line in text.splitlines() if line.strip()]
    from alloy.eval.data import jsonl_records

    problems: list[Problem] = []
    for number, record in jsonl_records(text, prompts_file, problems):
        if not isinstance(record.get("prompt"), str):
            problems.append(Problem(f"{prompts_file}:{number}", 'needs a string "prompt"'))
            continue
        out.append(record["prompt"])
    if problems:
        raise InputError("cannot read prompts", problems)
    return out


def load_target(
    target: Path,
    *,
    device: str | None,
    allow_pickle: bool,
    rule: str | None = None,
    layers: str | None = None,
) -> Any:
    """An `Ensemble` from a recipe, or a one-member ensemble of a model folder (decoded with
    `rule`, linear by default: the model itself; dola contrasts its `layers`)."""
    from alloy.ensemble import Ensemble, is_recipe_path

    if is_recipe_path(target):
        return Ensemble.from_recipe(target, device=device, allow_pickle=allow_pickle)
    from alloy.adapters import split_spec

    if not (split_spec(target)[0] / "config.json").is_file():
        raise InputError(
            f"{target}: neither an ensemble recipe (.yaml) nor a model folder (no config.json)"
        )
    recipe: dict[str, Any] = {
        "rule": rule or "linear",
        "members": [{"model": str(target)}],
        "name": str(target) if rule is None else f"{rule}({target})",
    }
    if layers is not None:
        recipe["layers"] = layers
    return Ensemble.from_recipe(recipe, device=device, allow_pickle=allow_pickle)


@app.command("generate")
def generate_command(
    target: Annotated[Path, TARGET],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt; repeat for more.")
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help='A text file (one prompt per line) or JSONL ("prompt").'),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to add at most.")] = None,
    sample: Annotated[
        bool | None, typer.Option("--sample/--greedy", help="Sample, or take the argmax.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Warper: temperature.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Warper: keep the k best tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Warper: nucleus mass.")] = None,
    min_p: Annotated[float | None, typer.Option(help="Warper: min-p fraction.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop string; repeat for more.")
    ] = None,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(help="Penalise tokens already in the text (> 1; DoLa's paper uses 1.2)."),
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(help="With a model folder: decode with this rule (dola; see alloy rules)."),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="dola: the early layers to contrast: low, high (default) or 0,4,8."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write JSONL, one line per prompt.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Device for members without their own (default: cpu).")
    ] = None,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    speculative: Annotated[
        bool,
        typer.Option(
            "--speculative",
            help="Exact greedy decoding of one model folder, drafted by its multi-token heads "
            "(alloy train objective: mtp; docs/mtp.md). One prompt at a time.",
        ),
    ] = False,
) -> None:
    """Continue prompts with an ensemble recipe's members and rule (or one model).

    Flags override the recipe's `sampling` settings. With a model folder, `--rule dola` decodes
    by contrasting its final layer with its early layers (`--layers`).

    Example: alloy generate runs/lab/models/smollm2-135m -p "The capital of France is"
    --rule dola --layers high --repetition-penalty 1.2
    """
    from alloy.cli.eval import device_problems, ensemble_problems, weight_problems
    from alloy.ensemble.recipe import is_recipe_path
    from alloy.io.writable import check_writable, write_file

    if out is not None:
        check_writable(out, "--out", folder=False)  # before the models are loaded
    prompts = read_prompts(prompt or [], prompts_file)
    problems = device_problems(device)
    if not prompts:
        problems.append(Problem("--prompt/--prompts", "no prompt given"))
    if batch_size <= 0:
        problems.append(Problem("--batch-size", f"must be positive, got {batch_size}"))
    if max_new_tokens is not None and max_new_tokens <= 0:
        problems.append(Problem("--max-new-tokens", f"must be positive, got {max_new_tokens}"))
    from alloy.ensemble.filters import check_filters

    warpers = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    given = {k: v for k, v in warpers.items() if v is not None}
    problems += [Problem(f"--{k.replace('_', '-')}", m) for k, m in check_filters(given)]
    # A truncated weight file or a device that is not here is named now, not by the loader.
    if repetition_penalty is not None and repetition_penalty <= 0:
        message = f"must be positive, got {repetition_penalty}"
        problems.append(Problem("--repetition-penalty", message))
    if speculative:
        from alloy.mtp.cli import run_speculative, speculative_problems

        problems += speculative_problems(target, sample=sample, warpers=given, stop=stop)
    if is_recipe_path(target):
        problems += ensemble_problems(target, allow_pickle)
        for flag, value in (("--rule", rule), ("--layers", layers)):
            if value is not None:
                problems.append(Problem(flag, "only with a model folder", "set it in the recipe"))
    else:
        problems += weight_problems(target, allow_pickle)
        problems += _rule_problems(rule, layers)
    if problems:
        raise InputError("cannot generate", problems)
    quiet_transformers()
    if speculative:
        run_speculative(target, prompts, max_new_tokens=max_new_tokens, device=device, out=out)
        return
    ensemble = load_target(
        target, device=device, allow_pickle=allow_pickle, rule=rule, layers=layers
    )
    overrides: dict[str, Any] = {**given}
    flags: list[tuple[str, Any]] = [
        ("max_new_tokens", max_new_tokens),
        ("do_sample", sample),
        ("seed", seed),
        ("stop", tuple(stop) if stop else None),
        ("repetition_penalty", repetition_penalty),
    ]
    for key, value in flags:
        if value is not None:
            overrides[key] = value
    generations = ensemble.generate(prompts, batch_size=batch_size, **overrides)
    console = Console(highlight=False)
    for g in generations:
        console.print(f"[dim]{escape(g.prompt)}[/]{escape(g.text)}  [dim]({g.finish_reason})[/]")
    if out is not None:
        write_file(out, "".join(json.dumps(g.as_dict()) + "\n" for g in generations), "--out")


def _rule_problems(rule: str | None, layers: str | None) -> list[Problem]:
    """--rule for one model folder: a rule that needs one model (linear, dola); --layers only
    with dola, well formed."""
    from alloy.ensemble.layers import parse_layers
    from alloy.ensemble.rules import RULES
    from alloy.errors import did_you_mean

    problems = []
    spec = RULES.get(rule or "linear")
    if spec is None:
        hint = did_you_mean(str(rule), RULES, "rules")
        problems.append(Problem("--rule", f"unknown rule {rule!r}", hint))
    elif spec.roles is not None:
        needs = ", ".join(spec.roles)
        hint = "write an ensemble recipe naming each member"
        problems.append(Problem("--rule", f"{rule} needs members {needs}", hint))
    if layers is not None:
        if spec is not None and not spec.layers:
            problems.append(Problem("--layers", "only with --rule dola", None))
        try:
            parse_layers(layers)
        except ValueError as error:
            problems.append(Problem("--layers", str(error), "low, high or 0,4,8"))
    return problems


@app.command("rules")
def rules_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the ensemble rules: members (roles or weights), parameters and reference."""
    from alloy.ensemble import RULES

    described: list[dict[str, Any]] = [
        {
            "name": r.name,
            "members": list(r.roles) if r.roles else ("one model" if r.layers else "any, weighted"),
            "parameters": r.params,
            "ranges": {k: str(v) for k, v in r.ranges.items()},
            "summary": r.summary,
            "reference": r.reference,
        }
        for r in RULES.values()
    ]
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    table = Table("rule", "members", "parameters", "summary", box=None, pad_edge=False)
    for r in described:
        members = r["members"] if isinstance(r["members"], str) else ", ".join(r["members"])
        params = ", ".join(f"{k}={v:g} in {r['ranges'][k]}" for k, v in r["parameters"].items())
        table.add_row(r["name"], members, params or "-", r["summary"])
    Console(highlight=False).print(table)
