"""Training recipes: one strict YAML file says what to train, on what, how long and how.

    objective: causal_lm            # sft | distill | context_distill | dpo | reward | mtp | ...
    model: runs/lab/family/demo/small/base
    data:                           # one or more sources, mixed by weight (per sequence)
      - {name: fiction, corpus: fiction}            # a lab corpus domain (split: train)
      - {name: notes, path: my/notes/, weight: 0.5} # text, folders of text, JSONL
    replay: {data: [{corpus: drama}], fraction: 0.05}   # old-distribution share of every batch
    order: related                  # documents before packing: file | random | related (order.py)
    schedule: {name: rewarm, lr: 1e-3, min_lr: 1e-4, warmup: 20}
    optimizer: {name: adamw, weight_decay: 0.1, betas: [0.9, 0.95], max_grad_norm: 1.0}
    adapter: {type: lora, rank: 8, alpha: 16, target_modules: [q_proj, v_proj]}  # adapter.py
    averaging: {ema: {decay: 0.99}}  # AveragingCallback options, by name
    eval: {data: [{corpus: fiction, split: validation}], every: 50, max_tokens: 16384}
    max_tokens: 1_000_000           # or max_steps: N, or epochs: E
    batch_size: 16                  # sequences per optimizer step, over all processes
    sequence_length: 256
    seed: 0

Everything that can be checked without loading a model is checked here, and every problem is
reported at once with its YAML path (unknown keys get a did-you-mean), in the style of the merge,
ensemble and MoE recipes. Relative paths are taken from the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alloy.errors import ProblemCollector, RecipeError, did_you_mean
from alloy.io.yamlfile import StrictModel, read_recipe, validate_schema
from alloy.mtp.settings import MTPEntry, mtp_issues
from alloy.train.adapter import GALORE_OPTIMIZERS, AdapterEntry, adapter_issues, galore_issues
from alloy.train.context import ContextEntry, DistillSettings, context_issues, distill_issues
from alloy.train.order import OrderEntry, order_issues
from alloy.train.preference import PreferenceEntry, preference_issues
from alloy.train.schedule_checks import Issue, schedule_issues

Number = float | int
Precision = Literal["fp32", "bf16", "fp16"]
Split = Literal["train", "validation", "test"]
DataKind = Literal["auto", "text", "completion", "messages", "preference"]
# AdamW is torch's fused kernel (CPU and CUDA), a bare Trainer's default: the same update as
# the per-tensor loop, in one pass over the parameters.
OPTIMIZERS = {
    "adamw": "adamw_torch_fused",
    "sgd": "sgd",
    "adafactor": "adafactor",
    **GALORE_OPTIMIZERS,  # AdamW on low-rank projections of the gradients (adapter.py)
}
DEFAULT_LAB = "runs/lab"


_Strict = StrictModel


def _as_entry(value: Any, key: str) -> Any:
    """A bare string stands for `{key: string}` (e.g. `data: [notes.txt]`)."""
    return {key: value} if isinstance(value, str) else value


def data_shorthand(value: Any) -> Any:
    """A section's `data:` list with bare strings read as `{path: string}`."""
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = {**value, "data": [_as_entry(d, "path") for d in value["data"]]}
    return value


class DataEntry(_Strict):
    name: str | None = None
    path: str | None = None
    corpus: str | None = None  # a domain of the lab corpus (`alloy lab corpora`)
    split: Split = "train"
    weight: Number = Field(default=1.0, gt=0)
    kind: DataKind = "auto"
    bootstrap: int | None = None  # seed of a bootstrap resample (items drawn with replacement)


class ModelEntry(_Strict):
    path: str | None = None  # a Hugging Face model folder to start from
    config: str | dict[str, Any] | None = None  # or: a config (file, folder or mapping)...
    tokenizer: str | None = None  # ...and a tokenizer folder, for a randomly initialised model


class ReplayEntry(_Strict):
    data: list[DataEntry] = Field(min_length=1)
    fraction: Number = Field(gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value.get("data"), list | type(None)):
            value = {**value, "data": [value["data"]]}
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            value = {**value, "data": [_as_entry(d, "path") for d in value["data"]]}
        return value


class OptimizerEntry(_Strict):
    name: str = "adamw"
    weight_decay: Number = Field(default=0.0, ge=0)
    betas: tuple[Number, Number] = (0.9, 0.999)
    eps: Number = Field(default=1e-8, gt=0)
    momentum: Number = Field(default=0.0, ge=0, lt=1)  # sgd only
    max_grad_norm: Number | None = Field(default=1.0, gt=0)
    # galore_adamw only (defaults: adapter.GALORE_DEFAULTS)
    rank: int | None = Field(default=None, ge=1)
    update_proj_gap: int | None = Field(default=None, ge=1)
    scale: Number | None = Field(default=None, gt=0)
    target_modules: list[str] | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _betas_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("betas"), list):
            value = {**value, "betas": tuple(value["betas"])}
        return value


class TeacherEntry(DistillSettings):  # loss, temperature, alpha, beta, top_k (context.py)
    model: str  # a model folder or an ensemble recipe (.yaml)
    cache: bool | str = False  # top-k targets cached on disk (true: alloy's cache folder)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class EvalEntry(_Strict):
    data: list[DataEntry] = Field(min_length=1)
    every: int = Field(default=0, ge=0)  # 0: only before and after training
    max_tokens: int | None = Field(default=None, gt=0)
    max_items: int | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, gt=0)
    stride: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    at_start: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return data_shorthand(value)


class CheckpointEntry(_Strict):
    every: int = Field(default=0, ge=0)  # Trainer checkpoints (resumable); 0: none
    keep: int = Field(default=2, ge=1)


class SnapshotEntry(_Strict):
    every: int = Field(default=0, ge=0)  # model-only HF folders along the run; 0: none


class TrainRecipe(_Strict):
    """The recipe as written (validated shapes); `load_train_recipe` adds the cross checks."""

    name: str | None = None
    objective: str
    model: ModelEntry
    data: list[DataEntry] = Field(min_length=1)
    replay: ReplayEntry | None = None
    order: OrderEntry | None = None  # documents before packing: file | random | related (order.py)
    schedule: dict[str, Any]
    optimizer: OptimizerEntry = Field(default_factory=OptimizerEntry)
    teacher: TeacherEntry | None = None
    preference: PreferenceEntry | None = None  # dpo, reward (preference.py)
    context: ContextEntry | None = None  # context_distill (context.py)

    mtp: MTPEntry | None = None  # objective mtp (alloy/mtp/settings.py)
    adapter: AdapterEntry | None = None
    averaging: dict[str, dict[str, Any]] | None = None
    eval: EvalEntry | None = None
    seed: int = 0
    max_steps: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    epochs: Number | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    gradient_accumulation: int | None = Field(default=None, gt=0)
    sequence_length: int | None = Field(default=None, gt=1)
    document_attention: bool = False  # packed documents do not attend to each other
    pack: bool | None = None  # sft: pack several examples per row (default: off)
    precision: Precision = "fp32"
    device: str = "auto"
    checkpoints: CheckpointEntry = Field(default_factory=CheckpointEntry)
    snapshots: SnapshotEntry = Field(default_factory=SnapshotEntry)
    log_every: int = Field(default=10, gt=0)
    lab: str | None = None  # lab folder for `corpus:` sources (default $ALLOY_LAB or runs/lab)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        value = dict(value)
        if "model" in value:
            value["model"] = _as_entry(value["model"], "path")
        if isinstance(value.get("data"), list):
            value["data"] = [_as_entry(d, "path") for d in value["data"]]
        elif isinstance(value.get("data"), str | dict):
            value["data"] = [_as_entry(value["data"], "path")]
        return value


@dataclass(frozen=True)
class Recipe:
    """A checked training recipe: the validated schema, where it came from, and its text."""

    spec: TrainRecipe
    origin: str
    text: str  # the recipe as YAML, for the model card and the run folder

    @property
    def lab_root(self) -> Path:
        return Path(self.spec.lab or os.environ.get("ALLOY_LAB") or DEFAULT_LAB)


def load_train_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> Recipe:
    """Read and check a training recipe (a YAML path, YAML text or a parsed mapping).

    Args:
        overrides: dotted keys replacing values of the recipe (`{"schedule.lr": 3e-4}`), as
            `alloy train --set` gives them.
        check_paths: also check that every model, data and teacher path exists.
    Raises:
        RecipeError: every problem found, each with its YAML path.
    """
    import yaml

    raw, origin = read_recipe(source, "training recipe", "objective:, model:, data:, ...")
    problems = ProblemCollector()
    for key, value in (overrides or {}).items():
        _override(raw, key, value, problems)
    spec = validate_schema(raw, TrainRecipe, {}, problems)
    if spec is not None:
        recipe = Recipe(spec, origin, yaml.safe_dump(raw, sort_keys=False))
        for where, message, hint in recipe_issues(recipe, check_paths=check_paths):
            problems.add(where, message, hint)
    problems.raise_if_any(RecipeError, f"invalid training recipe ({origin})")
    assert spec is not None
    return recipe


def _override(raw: dict[str, Any], key: str, value: Any, problems: ProblemCollector) -> None:
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            problems.add(f"--set {key}", f"{part!r} is not a mapping or list index here")
            return
    if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        problems.add(f"--set {key}", "cannot set a value here")


def recipe_issues(recipe: Recipe, *, check_paths: bool = True) -> list[Issue]:
    """Every cross-field problem of a recipe whose shape is valid."""
    from alloy.train.objectives import OBJECTIVES

    spec = recipe.spec
    issues: list[Issue] = []
    objective = OBJECTIVES.get(spec.objective)
    if objective is None:
        hint = did_you_mean(spec.objective, OBJECTIVES, "objectives")
        issues.append(("objective", f"unknown objective {spec.objective!r}", hint))
    elif objective.needs_teacher and spec.teacher is None:
        issues.append(("teacher", f"{spec.objective} needs a teacher", "add teacher: {model: ...}"))
    elif not objective.needs_teacher and spec.teacher is not None:
        issues.append(("teacher", f"{spec.objective} does not use a teacher", "remove it"))
    budgets = [k for k in ("max_steps", "max_tokens", "epochs") if getattr(spec, k) is not None]
    if len(budgets) != 1:
        found = ", ".join(budgets) if budgets else "none"
        issues.append(
            ("max_steps", f"give exactly one of max_steps, max_tokens, epochs ({found})", None)
        )
    if spec.micro_batch_size is not None and spec.gradient_accumulation is not None:
        issues.append(
            ("micro_batch_size", "give micro_batch_size or gradient_accumulation, not both", None)
        )
    for key in ("micro_batch_size", "gradient_accumulation"):
        value = getattr(spec, key)
        if value is not None and spec.batch_size % value:
            issues.append((key, f"{value} does not divide batch_size {spec.batch_size}", None))
    if spec.pack is not None and spec.objective not in ("sft", "distill"):
        issues.append(("pack", "only sft and distill data can be unpacked", "remove it"))
    issues += _model_issues(spec.model, check_paths)
    issues += schedule_issues(spec.schedule, "schedule")
    issues += _optimizer_issues(spec.optimizer)
    issues += _data_issues(recipe, check_paths)
    if spec.teacher is not None:
        issues += _teacher_issues(spec.teacher, check_paths)
    if spec.averaging is not None:
        issues += _averaging_issues(spec.averaging)
    issues += adapter_issues(spec)
    issues += preference_issues(spec, check_paths=check_paths)
    issues += order_issues(spec)

    issues += context_issues(spec, check_paths=check_paths)

    issues += mtp_issues(spec)
    window, stride = (spec.eval.window, spec.eval.stride) if spec.eval else (None, None)
    if window and stride and stride > window:
        issues.append(("eval.stride", f"{stride} is larger than the window {window}", None))
    issues += _device_issues(spec.device, spec.precision)
    return issues


def _model_issues(model: ModelEntry, check_paths: bool) -> list[Issue]:
    issues: list[Issue] = []
    scratch = model.config is not None or model.tokenizer is not None
    if model.path is not None and scratch:
        return [
            (
                "model",
                "give path (a checkpoint) or config + tokenizer (new weights), not both",
                None,
            )
        ]
    if model.path is None and not scratch:
        return [("model", "no model", "model: PATH, or model: {config: ..., tokenizer: ...}")]
    if scratch and (model.config is None or model.tokenizer is None):
        missing = "config" if model.config is None else "tokenizer"
        return [
            (
                f"model.{missing}",
                "a model trained from scratch needs a config and a tokenizer",
                None,
            )
        ]
    if not check_paths:
        return issues
    if model.path is not None and not (Path(model.path) / "config.json").is_file():
        issues.append(
            (
                "model.path",
                f"{model.path}: no config.json",
                "a Hugging Face model folder (relative to the working directory)",
            )
        )
    if isinstance(model.config, str):
        config = Path(model.config)
        if not (config.is_file() or (config / "config.json").is_file()):
            issues.append(("model.config", f"{model.config}: not a config file or folder", None))
    if model.tokenizer is not None and not Path(model.tokenizer).is_dir():
        issues.append(("model.tokenizer", f"{model.tokenizer}: not a tokenizer folder", None))
    return issues


def _optimizer_issues(optimizer: OptimizerEntry) -> list[Issue]:
    issues: list[Issue] = []
    if optimizer.name not in OPTIMIZERS:
        hint = did_you_mean(optimizer.name, OPTIMIZERS, "optimizers")
        issues.append(("optimizer.name", f"unknown optimizer {optimizer.name!r}", hint))
    if not all(0 <= b < 1 for b in optimizer.betas):
        issues.append(
            ("optimizer.betas", f"each must be in [0, 1), got {list(optimizer.betas)}", None)
        )
    if optimizer.momentum and optimizer.name != "sgd":
        issues.append(("optimizer.momentum", "applies to sgd only", None))
    return issues + galore_issues(optimizer)


def _data_issues(recipe: Recipe, check_paths: bool) -> list[Issue]:
    spec = recipe.spec
    groups: list[tuple[str, list[DataEntry]]] = [("data", spec.data)]
    if spec.replay is not None:
        groups.append(("replay.data", spec.replay.data))
    if spec.eval is not None:
        groups.append(("eval.data", spec.eval.data))
    issues: list[Issue] = []
    names: dict[str, str] = {}
    for prefix, entries in groups:
        for i, entry in enumerate(entries):
            where = f"{prefix}.{i}"
            if (entry.path is None) == (entry.corpus is None):
                issues.append((where, "give path or corpus (exactly one)", None))
                continue
            if prefix != "eval.data":
                name = source_name(entry)
                if name in names:
                    issues.append(
                        (
                            f"{where}.name",
                            f"{name!r} is also {names[name]}",
                            "give each source its own name",
                        )
                    )
                names[name] = where
            if not check_paths:
                continue
            path = source_path(entry, recipe.lab_root)
            if not path.exists():
                hint = (
                    f"lab corpus domains live in {recipe.lab_root / 'corpus'} "
                    "(alloy lab corpora; set lab: or $ALLOY_LAB)"
                    if entry.corpus is not None
                    else "relative to the working directory"
                )
                issues.append(
                    (f"{where}.{'corpus' if entry.corpus else 'path'}", f"{path}: not found", hint)
                )
    return issues


def source_name(entry: DataEntry) -> str:
    if entry.name:
        return entry.name
    if entry.corpus is not None:
        return entry.corpus if entry.split == "train" else f"{entry.corpus}/{entry.split}"
    return Path(str(entry.path)).stem or str(entry.path)


def source_path(entry: DataEntry, lab_root: Path) -> Path:
    if entry.corpus is not None:
        return lab_root / "corpus" / entry.corpus / f"{entry.split}.jsonl"
    return Path(str(entry.path))


def _teacher_issues(teacher: TeacherEntry, check_paths: bool) -> list[Issue]:
    issues = distill_issues(teacher, "teacher", instead="objective: causal_lm or sft")
    if teacher.cache and not teacher.top_k:
        issues.append(("teacher.cache", "only top-k targets are cached", "set top_k: 64 (say)"))
    if not check_paths:
        return issues
    from alloy.ensemble.recipe import is_recipe_path, load_ensemble_recipe

    if is_recipe_path(teacher.model):
        try:
            load_ensemble_recipe(teacher.model)
        except RecipeError as error:
            issues += [(f"teacher.model: {p.where}", p.message, p.hint) for p in error.problems]
            if not error.problems:
                issues.append(("teacher.model", error.message, None))
    elif not (Path(teacher.model) / "config.json").is_file():
        issues.append(
            (
                "teacher.model",
                f"{teacher.model}: no config.json",
                "a model folder or an ensemble recipe (.yaml)",
            )
        )
    return issues


def _averaging_issues(averaging: dict[str, dict[str, Any]]) -> list[Issue]:
    from alloy.average.callback import check_averaging_specs
    from alloy.errors import InputError

    try:
        check_averaging_specs(averaging)
    except InputError as error:
        return [(f"averaging.{p.where}", p.message, p.hint) for p in error.problems]
    return []


def _device_issues(device: str, precision: str) -> list[Issue]:
    import torch

    issues: list[Issue] = []
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        issues.append(("device", f"unknown device {device!r}", "auto, cpu, cuda or cuda:N"))
    elif kind == "cuda" and not torch.cuda.is_available():
        issues.append(("device", "CUDA is not available on this machine", "use cpu or auto"))
    elif kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        issues.append(("device", f"no {device}: {torch.cuda.device_count()} CUDA device(s)", None))
    if precision == "fp16" and kind in ("cpu", "auto") and not torch.cuda.is_available():
        issues.append(("precision", "fp16 mixed precision needs a GPU", "use fp32 or bf16"))
    return issues
