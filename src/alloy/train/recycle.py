"""Recycling fine-tunes: model ratatouille and bagging, each one recipe run by `alloy train`.

Model ratatouille (Ramé et al. 2023, https://arxiv.org/abs/2212.10445): fine-tune the base on
each auxiliary task (or reuse existing auxiliary fine-tunes), fine-tune every auxiliary model on
the target task, then average those target fine-tunes (uniform or greedy soup). The auxiliary
starts make the target fine-tunes diverse, and their average generalises out of distribution.

    recycle: ratatouille
    base: runs/lab/family/experiment/small/base
    auxiliary:
      - {name: drama, data: [{corpus: drama}]}                       # fine-tuned here
      - {name: scripture, model: runs/lab/.../small/experts/scripture}  # reused as it is
    target: [{corpus: fiction}]
    train: {schedule: {name: cosine, lr: 6e-4, warmup: 10}, max_steps: 120, batch_size: 8}
    auxiliary_train: {...}              # settings of the auxiliary fine-tunes (default: train)
    combine: {method: greedy, data: [{corpus: fiction, split: validation}]}
    eval: {data: [{corpus: fiction, split: test}, {corpus: drama, split: test}]}

Bagging (Breiman 1996): `members` fine-tunes of the base, each on its own bootstrap resample of
the target data (and its own seed), combined as an ensemble recipe (`combine.method: ensemble`,
the linear mixture, scored and decoded by `alloy eval` / `alloy generate`) or as a soup.

Every stage is an ordinary `alloy train` run whose model is kept under OUT:

    OUT/auxiliary/<name>/   OUT/target/<name>/   (ratatouille)
    OUT/members/<k>/                               (bagging)
    OUT/soup/ or OUT/ensemble.yaml                 the combination
    OUT/report.json, OUT/report.md                 every model of every stage, scored on eval
    OUT/pipeline.json                              the recipe and each run's recipe

Running the same recipe again reuses every model whose run recipe is unchanged, so a pipeline
that was interrupted continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from alloy.errors import OutputExistsError, ProblemCollector, RecipeError
from alloy.io.yamlfile import read_recipe, validate_schema
from alloy.train.recipe import (
    DataEntry,
    EvalEntry,
    _as_entry,
    _Strict,
    data_shorthand,
    load_train_recipe,
)

PIPELINE_FILE = "pipeline.json"


class AuxiliaryEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: list[DataEntry] | None = None  # fine-tune the base on this...
    model: str | None = None  # ...or reuse this auxiliary model

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return data_shorthand(value)


class CombineEntry(_Strict):
    method: Literal["uniform", "greedy", "ensemble"] = "uniform"
    data: list[DataEntry] | None = None  # held-out data the soup is selected (and scored) on

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return data_shorthand(value)


class RecycleRecipe(_Strict):
    name: str | None = None
    recycle: Literal["ratatouille", "bagging"]
    base: str
    auxiliary: list[AuxiliaryEntry] = Field(default_factory=list)
    target: list[DataEntry] = Field(min_length=1)
    train: dict[str, Any]
    auxiliary_train: dict[str, Any] | None = None
    members: int | None = Field(default=None, ge=2)
    combine: CombineEntry = Field(default_factory=CombineEntry)
    eval: EvalEntry | None = None
    lab: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("target"), list | str | dict):
            target = value["target"]
            target = target if isinstance(target, list) else [target]
            value = {**value, "target": [_as_entry(d, "path") for d in target]}
        return value


@dataclass(frozen=True)
class Run:
    """One `alloy train` run of the pipeline."""

    stage: str  # auxiliary, target, members
    name: str
    folder: Path
    recipe: dict[str, Any]  # None-free train recipe


@dataclass(frozen=True)
class RecyclePlan:
    spec: RecycleRecipe
    origin: str
    text: str
    out: Path
    runs: list[Run]
    reused: dict[str, Path]  # auxiliary models given by the recipe

    def summary(self) -> str:
        lines = [f"{self.spec.recycle}: {len(self.runs)} training runs, then {self.combine_text}"]
        for name, folder in self.reused.items():
            lines.append(f"  auxiliary/{name}: reuse {folder}")
        for run in self.runs:
            model = run.recipe["model"]
            model_text = model if isinstance(model, str) else "(new)"
            data = ", ".join(str(d.get("corpus") or d.get("path")) for d in run.recipe["data"])
            lines.append(
                f"  {run.stage}/{run.name}: {model_text} on {data}, "
                f"{run.recipe.get('max_steps') or run.recipe.get('max_tokens')} steps/tokens, "
                f"seed {run.recipe.get('seed', 0)}"
            )
        return "\n".join(lines)

    @property
    def combine_text(self) -> str:
        method = self.spec.combine.method
        return "an ensemble recipe (linear)" if method == "ensemble" else f"a {method} soup"


def is_recycle_recipe(raw: Mapping[str, Any]) -> bool:
    return "recycle" in raw


def load_recycle_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], out: str | os.PathLike[str]
) -> RecyclePlan:
    """Read a recycling recipe and plan its runs; every problem of every run at once.

    Raises:
        RecipeError: with YAML paths into the recycling recipe.
    """
    raw, origin = read_recipe(source, "recycling recipe", "recycle:, base:, target:, train:, ...")
    problems = ProblemCollector()
    spec = validate_schema(raw, RecycleRecipe, {}, problems)
    if spec is None:
        problems.raise_if_any(RecipeError, f"invalid recycling recipe ({origin})")
        raise AssertionError("schema validation failed without a problem")
    out = Path(out)
    runs: list[Run] = []
    reused: dict[str, Path] = {}
    target = [d.model_dump(exclude_none=True) for d in spec.target]
    train = {k: v for k, v in spec.train.items() if k not in ("data", "model")}
    for key in ("data", "model"):
        if key in spec.train:
            problems.add(f"train.{key}", "set by the pipeline", "give base: and target: instead")
    train.setdefault("objective", "causal_lm")
    if spec.lab is not None:
        train.setdefault("lab", spec.lab)
    seed = int(train.get("seed", 0)) if isinstance(train.get("seed", 0), int) else 0
    if spec.recycle == "ratatouille":
        if len(spec.auxiliary) < 2:
            problems.add("auxiliary", "ratatouille needs at least two auxiliary tasks or models")
        if spec.members is not None:
            problems.add("members", "ratatouille has one target fine-tune per auxiliary model")
        aux_train = {**train, **(spec.auxiliary_train or {})}
        names = [a.name for a in spec.auxiliary]
        for i, aux in enumerate(spec.auxiliary):
            if names.count(aux.name) > 1:
                problems.add(f"auxiliary.{i}.name", f"{aux.name!r} is used twice")
            if (aux.data is None) == (aux.model is None):
                problems.add(f"auxiliary.{i}", "give data (to fine-tune the base) or model")
                continue
            if aux.model is not None:
                reused[aux.name] = Path(aux.model)
                start = aux.model
                if not (Path(aux.model) / "config.json").is_file():
                    problems.add(f"auxiliary.{i}.model", f"{aux.model}: no config.json")
            else:
                assert aux.data is not None
                folder = out / "auxiliary" / aux.name
                data = [d.model_dump(exclude_none=True) for d in aux.data]
                recipe = {**aux_train, "model": spec.base, "data": data, "seed": seed + 100 + i}
                runs.append(Run("auxiliary", aux.name, folder, recipe))
                start = str(folder)
            recipe = {**train, "model": start, "data": target, "seed": seed + i}
            runs.append(Run("target", aux.name, out / "target" / aux.name, recipe))
    else:
        if spec.auxiliary:
            problems.add("auxiliary", "bagging has no auxiliary tasks")
        if spec.members is None:
            problems.add("members", "bagging needs members: K (2 or more)")
        for k in range(spec.members or 0):
            data = [{**d, "bootstrap": seed + k} for d in target]
            recipe = {**train, "model": spec.base, "data": data, "seed": seed + k}
            runs.append(Run("members", str(k), out / "members" / str(k), recipe))
    if spec.combine.method == "greedy" and not spec.combine.data:
        problems.add("combine.data", "a greedy soup needs held-out data to select on")
    if spec.combine.method == "ensemble" and spec.recycle == "ratatouille":
        problems.add("combine.method", "ratatouille averages weights", "use uniform or greedy")
    from alloy.train.recipe import source_path

    lab = Path(spec.lab or os.environ.get("ALLOY_LAB") or "runs/lab")
    entries = [(f"target.{i}", d) for i, d in enumerate(spec.target)]
    entries += [
        (f"auxiliary.{i}.data.{j}", d)
        for i, a in enumerate(spec.auxiliary)
        for j, d in enumerate(a.data or [])
    ]
    entries += [(f"combine.data.{i}", d) for i, d in enumerate(spec.combine.data or [])]
    entries += [(f"eval.data.{i}", d) for i, d in enumerate(spec.eval.data if spec.eval else [])]
    for where, entry in entries:
        if (entry.path is None) == (entry.corpus is None):
            problems.add(where, "give path or corpus (exactly one)")
        elif not source_path(entry, lab).exists():
            problems.add(where, f"{source_path(entry, lab)}: not found")
    if not (Path(spec.base) / "config.json").is_file():
        problems.add("base", f"{spec.base}: no config.json", "a Hugging Face model folder")
    # Each run is a training recipe like any other: check the settings as one (the models of
    # later stages do not exist yet, so paths were checked above instead).
    sections = [("train", train)]
    if spec.auxiliary_train is not None:
        sections.append(("auxiliary_train", {**train, **spec.auxiliary_train}))
    for section, settings in sections:
        probe = {**settings, "model": spec.base, "data": target}
        try:
            load_train_recipe(probe, check_paths=False)
        except RecipeError as error:
            for p in error.problems:
                head = p.where.split(".")[0]
                if head not in ("model", "data"):
                    problems.add(f"{section}.{p.where}", p.message, p.hint)
    problems.raise_if_any(RecipeError, f"invalid recycling recipe ({origin})")
    text = yaml.safe_dump(raw, sort_keys=False)
    return RecyclePlan(spec, origin, text, out, runs, reused)


def recycle(
    source: str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a recycling recipe (see the module docstring); returns the report."""
    from alloy.train.run import train

    plan = load_recycle_recipe(source, out)
    out = plan.out
    record_path = out / PIPELINE_FILE
    if out.is_dir() and any(out.iterdir()):
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        if force:
            shutil.rmtree(out)
        elif previous is None:
            raise OutputExistsError(
                f"{out}: folder exists and is not a recycling pipeline; pass --force to replace "
                "it, or choose another output path"
            )
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"recipe": plan.text, "runs": {}}
    for run in plan.runs:
        label = f"{run.stage}/{run.name}"
        text = yaml.safe_dump(run.recipe, sort_keys=False)
        done = run.folder / "training" / "recipe.yaml"
        if done.is_file() and done.read_text() == text:
            say(f"{label}: reused (same recipe)")
        else:
            say(f"{label}: training")
            result = train(text, run.folder, force=True, say=say)
            say(f"{label}: loss {result.final_loss:.4f} in {result.seconds:.0f}s")
        record["runs"][label] = {"folder": str(run.folder), "recipe": run.recipe}
        _write_json(record_path, record)
    models = _combine(plan, say)
    report = _report(plan, models, say)
    record["report"] = report
    _write_json(record_path, record)
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report))
    return report


def _combine(plan: RecyclePlan, say: Callable[[str], None]) -> dict[str, Path]:
    """Every model to score, by stage/name; the combination included."""
    from alloy.soup import make_soup
    from alloy.train.recipe import source_path

    spec, out = plan.spec, plan.out
    lab = Path(spec.lab or os.environ.get("ALLOY_LAB") or "runs/lab")
    models: dict[str, Path] = {"base": Path(spec.base)}
    models |= {f"auxiliary/{name}": folder for name, folder in plan.reused.items()}
    models |= {f"{r.stage}/{r.name}": r.folder for r in plan.runs}
    finals = [r.folder for r in plan.runs if r.stage in ("target", "members")]
    if spec.combine.method == "ensemble":
        recipe = {
            "name": f"bagging of {len(finals)}",
            "rule": "linear",
            "members": [{"model": str(f)} for f in finals],
        }
        path = out / "ensemble.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        say(f"wrote {path} (linear mixture of {len(finals)} members)")
        models["ensemble"] = path
        return models
    data = [source_path(d, lab) for d in spec.combine.data or []]
    if not data and spec.eval is not None:
        data = [source_path(d, lab) for d in spec.eval.data]
    settings = _eval_settings(spec)
    say(f"{spec.combine.method} soup of {len(finals)} fine-tunes")
    soup = make_soup(
        finals,
        data,
        out / "soup",
        method=spec.combine.method,
        settings=settings,
        force=True,
        hash_inputs=False,
    )
    say(f"soup keeps {', '.join(p.name for p in soup.chosen_paths)}")
    models["soup"] = out / "soup"
    return models


def _eval_settings(spec: RecycleRecipe) -> Any:
    from alloy.eval import EvalSettings

    e = spec.eval
    if e is None:
        return EvalSettings()
    return EvalSettings(e.window, e.stride, e.batch_size, e.max_tokens, e.max_items)


def _report(
    plan: RecyclePlan, models: dict[str, Path], say: Callable[[str], None]
) -> dict[str, Any]:
    from alloy.eval import evaluate, load_eval_sets, load_scorer
    from alloy.train.recipe import source_path

    spec = plan.spec
    report: dict[str, Any] = {
        "recycle": spec.recycle,
        "models": {k: str(v) for k, v in models.items()},
    }
    if spec.eval is None:
        return report
    lab = Path(spec.lab or os.environ.get("ALLOY_LAB") or "runs/lab")
    sets = load_eval_sets([source_path(d, lab) for d in spec.eval.data])
    settings = _eval_settings(spec)
    scores: dict[str, Any] = {}
    for name, path in models.items():
        if str(path).endswith((".yaml", ".yml")):
            from alloy.ensemble import Ensemble

            scorer: Any = Ensemble.from_recipe(path)
        else:
            scorer = load_scorer(path, name=name)
        say(f"scoring {name}")
        scores[name] = evaluate(scorer, sets, settings)
    report["scores"] = scores
    return report


def _markdown(report: dict[str, Any]) -> str:
    from alloy.eval import markdown_table

    if "scores" not in report:
        return f"# {report['recycle']}\n\nNo eval data in the recipe.\n"
    return f"# {report['recycle']}\n\n{markdown_table(report['scores'])}\n"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
