"""`alloy prefs strength DATA OUT --models RM...`: preference strength of every pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand

from alloy.cli.main import ALLOW_PICKLE, BATCH_SIZE, FORCE, app, quiet_transformers
from alloy.errors import InputError, Problem

prefs = typer.Typer(
    help="Preference data: how strongly an ensemble of scorers agrees with each pair's label.",
    no_args_is_help=True,
)
app.add_typer(prefs, name="prefs")

MODEL_FLAGS = ("--models", "-m")
ACTIONS = ("keep", "drop", "flip")


class _ModelsCommand(TyperCommand):
    """Typer's command, with `--models A B C` spread before click parses the arguments."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's click Context
        from alloy.cli.soup import spread_candidates, value_options

        spread = spread_candidates(args, value_options=value_options(self, ctx), flags=MODEL_FLAGS)
        return super().parse_args(ctx, spread)


_HELP = (
    "Score every prompt/chosen/rejected pair of DATA with each model and write OUT: "
    "strength.jsonl (per pair: mean and standard deviation over the models of "
    "score(chosen) − score(rejected), and a flag), summary.json and histogram.png."
    "\n\n"
    "A reward model (...ForSequenceClassification) scores with its reward, a causal LM with "
    "the summed log-probability of each answer after the prompt. A pair is clean when its mean "
    "exceeds --band standard deviations, mislabelled when it is below minus that, ambiguous in "
    "between. --filter writes DATA cleaned: mislabelled pairs flipped, ambiguous ones dropped "
    "(change with --mislabelled / --ambiguous)."
    "\n\n"
    "The model list ends at the next option: alloy prefs strength DATA OUT --models A B C"
)


@prefs.command("strength", cls=_ModelsCommand, help=_HELP)
def strength_command(
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Preference JSONL: prompt, chosen, rejected.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models",
            "-m",
            help="Reward models or causal LMs (folders, or BASE+ADAPTER): -m A B C.",
        ),
    ] = None,
    train_k: Annotated[
        int | None,
        typer.Option(
            "--train", help="Instead: train K reward models here, each scoring held-out pairs."
        ),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="With --train: the alloy train recipe (objective: reward); data set here."
        ),
    ] = None,
    held: Annotated[
        int | None,
        typer.Option(help="With --train: models that hold out each pair (default K // 2)."),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="With --train: where the K runs live (default OUT.models; reused)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="With --train: seeds the held-out assignment.")] = 0,
    band: Annotated[
        float, typer.Option(help="Flag width, in standard deviations of the models' scores.")
    ] = 1.0,
    standardize: Annotated[
        bool,
        typer.Option(help="Divide each model's differences by their spread over the pairs."),
    ] = False,
    filter_out: Annotated[
        Path | None,
        typer.Option("--filter", help="Also write DATA cleaned by the flags to this JSONL file."),
    ] = None,
    mislabelled: Annotated[
        str | None,
        typer.Option(help="With --filter: mislabelled pairs are flip (default), drop or keep."),
    ] = None,
    ambiguous: Annotated[
        str | None,
        typer.Option(help="With --filter: ambiguous pairs are drop (default), keep or flip."),
    ] = None,
    batch_size: Annotated[int, BATCH_SIZE] = 8,
    device: Annotated[str | None, typer.Option(help="Device to score on (default: cpu).")] = None,
    force: Annotated[bool, FORCE] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    from alloy.cli.eval import device_problems, weight_problems
    from alloy.errors import did_you_mean
    from alloy.eval.data import load_eval_sets
    from alloy.eval.scorer import load_scorer
    from alloy.io.atomic import check_output_folder
    from alloy.io.writable import check_writable
    from alloy.prefs.run import run_strength, write_filtered

    problems = device_problems(device)
    models = models or []
    if not models and train_k is None:
        hint = "give reward models (-m A B C), or --train K --recipe RECIPE"
        problems.append(Problem("--models", "no model given", hint))
    if models and train_k is not None:
        problems.append(Problem("--models/--train", "give one of them", "scored or trained here"))
    for model in models:
        problems += weight_problems(Path(model), allow_pickle)
    if train_k is not None:
        problems += _train_problems(train_k, recipe, held, data)
    elif recipe is not None or held is not None or work is not None:
        problems.append(Problem("--recipe/--held/--work", "only act with --train K"))
    if band < 0:
        problems.append(Problem("--band", f"must be >= 0, got {band}"))
    if batch_size <= 0:
        problems.append(Problem("--batch-size", f"must be positive, got {batch_size}"))
    for option, value in (("--mislabelled", mislabelled), ("--ambiguous", ambiguous)):
        if value is not None and value not in ACTIONS:
            hint = did_you_mean(value, ACTIONS, "actions")
            problems.append(Problem(option, f"unknown action {value!r}", hint))
        if value is not None and filter_out is None:
            problems.append(Problem(option, "acts only on --filter's output", "add --filter FILE"))
    try:
        check_output_folder(out, force=force)
        check_writable(out, "OUT")
        if filter_out is not None:
            check_writable(filter_out, "--filter", folder=False)
    except InputError as exc:
        problems += [Problem("", exc.message), *exc.problems]
    items: list[Any] = []
    try:
        sets = load_eval_sets([data])
    except InputError as exc:
        problems += [Problem(str(data), exc.message), *exc.problems]
    else:
        if sets[0].kind != "preference":
            found = f"{sets[0].kind} data"
            problems.append(Problem(str(data), f"is {found}", "give prompt/chosen/rejected JSONL"))
        else:
            items = list(sets[0].items)
    if problems:
        raise InputError("cannot measure preference strength", problems)
    quiet_transformers()
    say = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))

    def load(model: str) -> Any:
        return load_scorer(model, device=device or "cpu", allow_pickle=allow_pickle)

    scored = None
    if train_k is not None:
        from alloy.prefs.bagging import default_work, train_bagged
        from alloy.prefs.run import data_records
        from alloy.prefs.strength import holdout_assignment

        assert recipe is not None
        records = [record for _, record in data_records(data)]
        mask = holdout_assignment(len(records), train_k, held or train_k // 2, seed)
        folders = train_bagged(records, mask, recipe, work or default_work(out), say=say)
        models, scored = [str(f) for f in folders], mask
    result, info = run_strength(
        data, items, models, out, load=load, scored=scored, band=band,
        standardized=standardize, batch_size=batch_size, force=force, say=say,
    )  # fmt: skip
    flags = info["flags"]
    typer.echo(
        f"{info['pairs']} pairs: {flags['clean']} clean, {flags['ambiguous']} ambiguous, "
        f"{flags['mislabelled']} mislabelled (band {band:g}); written to {out}"
    )
    if filter_out is not None:
        counts = write_filtered(
            data,
            result.flags,
            filter_out,
            mislabelled=_action(mislabelled or "flip"),
            ambiguous=_action(ambiguous or "drop"),
        )
        typer.echo(
            f"{counts['written']} pairs written to {filter_out} ({counts['kept']} kept, "
            f"{counts['flipped']} flipped, {counts['dropped']} dropped)"
        )


def _train_problems(k: int, recipe: Path | None, held: int | None, data: Path) -> list[Problem]:
    from alloy.prefs.bagging import check_recipe

    problems = []
    if k < 2:
        problems.append(Problem("--train", f"needs at least 2 models, got {k}", "e.g. --train 4"))
    elif held is not None and not 1 <= held < k:
        problems.append(Problem("--held", f"must be in [1, {k}), got {held}"))
    if recipe is None:
        problems.append(Problem("--recipe", "--train needs a recipe", "objective: reward"))
    elif not recipe.is_file():
        problems.append(Problem("--recipe", f"{recipe}: no such file"))
    else:
        problems += check_recipe(recipe, data)
    return problems


def _action(value: str) -> Literal["keep", "drop", "flip"]:
    assert value in ACTIONS
    return value  # type: ignore[return-value]
