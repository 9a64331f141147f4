"""`alloy.train(recipe, out)`: check everything, train with transformers' Trainer, write OUT.

Order of work, so that a bad input costs nothing: the recipe (every problem at once), the output
paths, the tokenizer and every data file (every bad line at once), the eval sets, the teacher's
tokenizer, the plan (batches, steps, rows); only then are weights loaded and training starts.

Folders:

    OUT/                       the final model (a plain HF folder: weights, config, tokenizer),
                               README.md (model card), training/ (recipe.yaml, metrics.csv,
                               eval.csv, curves.png, summary.json), averaged-<name>/ (weight
                               averages), snapshots/checkpoint-<step>/ (model-only snapshots)
                               With `adapter:`, OUT is a PEFT adapter folder instead
                               (adapter_config.json, adapter_model.safetensors, tokenizer, the
                               same card and training/), or with `--merge` the start model with
                               the adapter folded in, a plain HF folder; averages likewise
    OUT.checkpoints/           while the run lasts: Trainer's checkpoint-<step>/ folders
                               (resumable) and the snapshots; removed once OUT is written

OUT appears only when complete (written into a hidden sibling and renamed). A killed run
continues with `resume=True` (`alloy train --resume`) from its last checkpoint, to the same
weights as an uninterrupted run: the rows of every step are fixed by the recipe, and Trainer
restores the optimizer, schedule and RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloy.errors import InputError, OutputExistsError, Problem
from alloy.train.plan import TrainPlan, plan_training
from alloy.train.preference import check_reference_tokenizer
from alloy.train.recipe import Recipe, load_train_recipe

log = logging.getLogger(__name__)
RECIPE_FILE = "alloy-recipe.yaml"


@dataclass(frozen=True)
class TrainResult:
    path: Path
    steps: int
    tokens: int
    final_loss: float
    eval: dict[str, Any]
    seconds: float
    metrics: list[dict[str, Any]]
    trainable_parameters: int = 0
    parameters: int = 0  # of the trained model (an adapter's included)


def checkpoints_folder(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints")


def train(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    force: bool = False,
    overrides: Mapping[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[TrainPlan], None] | None = None,
    command: str | None = None,
    merge: bool = False,
) -> TrainResult:
    """Train as `recipe` says and write the model to `out` (see the module docstring).

    Args:
        recipe: a YAML path, YAML text, a mapping, or a loaded `Recipe`.
        out: the output model folder.
        resume: continue the run whose checkpoints are in `<out>.checkpoints`.
        force: replace an existing `out` and start over even if checkpoints exist.
        overrides: dotted recipe keys to replace (`{"max_steps": 10}`).
        say: where progress messages go (default: the log).
        on_row: called with each step's metrics row (main process only).
        on_plan: called with the plan once the data is checked, before weights load.
        merge: with an `adapter:`, write the start model with the adapter folded in instead of
            the adapter (as `adapter: {merge: true}` does).
    Raises:
        RecipeError, InputError: bad recipe, data or paths (nothing is written).
    """
    say = say or log.info
    loaded = (
        recipe if isinstance(recipe, Recipe) else load_train_recipe(recipe, overrides=overrides)
    )
    merge = wants_merge(loaded, merge)
    out = Path(out)
    run_dir = checkpoints_folder(out)
    _check_outputs(loaded, out, run_dir, resume=resume, force=force)
    with _main_process_first():  # the others then read the data from the token cache
        plan = plan_training(loaded, say=say)
    eval_sets = _eval_sets(loaded)
    if loaded.spec.teacher is not None:
        _check_teacher_tokenizer(loaded, plan.tokenizer)
    check_reference_tokenizer(loaded, plan.tokenizer)
    if on_plan is not None:
        on_plan(plan)
    return _run(
        plan,
        out,
        run_dir,
        eval_sets,
        resume=resume,
        force=force,
        say=say,
        on_row=on_row,
        command=command,
        merge=merge,
    )


def wants_merge(recipe: Recipe, merge: bool) -> bool:
    """Whether OUT is the folded model (--merge or `adapter: {merge: true}`).

    Raises:
        InputError: --merge without an adapter to fold.
    """
    adapter = recipe.spec.adapter
    if merge and adapter is None:
        raise InputError(
            "--merge folds a trained adapter into its start model, and the recipe has no adapter:",
            [Problem("adapter", "missing", "add adapter: {type: lora}, or drop --merge")],
        )
    return merge or (adapter is not None and adapter.merge)


def _main_process_first() -> Any:
    """Under a multi-process launch, the main process goes first (accelerate's state)."""
    import contextlib

    from alloy.train.plan import world_size

    if world_size() == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def _check_outputs(recipe: Recipe, out: Path, run_dir: Path, *, resume: bool, force: bool) -> None:
    from alloy.io.atomic import check_output_folder

    problems: list[Problem] = []
    if out.is_dir() and any(out.iterdir()) and not force:
        check_output_folder(out, force=False)  # raises OutputExistsError with the usual wording
    if resume:
        if not run_dir.is_dir():
            problems.append(
                Problem(
                    str(run_dir), "no checkpoints to resume from", "run without --resume to start"
                )
            )
        elif (run_dir / RECIPE_FILE).is_file() and (
            run_dir / RECIPE_FILE
        ).read_text() != recipe.text:
            problems.append(
                Problem(
                    str(run_dir),
                    "the recipe differs from the one this run started with",
                    "resume with the same recipe, or --force",
                )
            )
    elif run_dir.exists() and not force:
        raise OutputExistsError(
            f"{run_dir}: checkpoints of an earlier run of {out}; pass --resume to continue it "
            "or --force to start over"
        )
    parent = out.absolute().parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        problems.append(Problem(str(out), f"{existing} is not writable", "choose another output"))
    if problems:
        raise InputError("cannot train", problems)


def _eval_sets(recipe: Recipe) -> list[Any]:
    from alloy.eval import load_eval_sets
    from alloy.train.recipe import source_path

    spec = recipe.spec.eval
    if spec is None:
        return []
    return load_eval_sets([source_path(e, recipe.lab_root) for e in spec.data])


def _check_teacher_tokenizer(recipe: Recipe, tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    from alloy.eval.scorer import load_pretrained
    from alloy.train.teacher import check_same_tokenizer, teacher_tokenizer_folder

    teacher = recipe.spec.teacher
    assert teacher is not None
    folder = teacher_tokenizer_folder(teacher.model)
    other = load_pretrained(folder, AutoTokenizer, f"teacher {teacher.model}")
    check_same_tokenizer(tokenizer, other, teacher.model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def training_arguments(plan: TrainPlan, run_dir: Path) -> Any:
    from transformers import TrainingArguments

    from alloy.train.recipe import OPTIMIZERS

    spec = plan.recipe.spec
    device = resolve_device(spec.device)
    optimizer = spec.optimizer
    extra: dict[str, Any] = {}
    if optimizer.name == "sgd" and optimizer.momentum:
        extra["optim_args"] = f"momentum={float(optimizer.momentum)}"
    if plan.galore is not None:
        extra.update(galore_arguments(optimizer))
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=plan.steps,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=plan.schedule.lr,
        optim=OPTIMIZERS[optimizer.name],
        weight_decay=float(optimizer.weight_decay),
        adam_beta1=float(optimizer.betas[0]),
        adam_beta2=float(optimizer.betas[1]),
        adam_epsilon=float(optimizer.eps),
        max_grad_norm=float(optimizer.max_grad_norm or 0.0),
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        use_cpu=device.type == "cpu",
        seed=spec.seed,
        data_seed=spec.seed,
        logging_steps=spec.log_every,
        report_to=[],
        disable_tqdm=True,
        save_strategy="steps" if spec.checkpoints.every else "no",
        save_steps=spec.checkpoints.every or plan.steps,
        save_total_limit=spec.checkpoints.keep,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        **extra,
    )


def galore_arguments(optimizer: Any) -> dict[str, Any]:
    """TrainingArguments of transformers' GaLore for the recipe's `optimizer:`."""
    from alloy.train.adapter import GALORE_DEFAULTS, GALORE_TARGETS, quiet_imports

    quiet_imports()  # galore_torch (here and in Trainer) imports bitsandbytes
    from galore_torch.galore_projector import GaLoreProjector

    # galore_torch's AdamW warns that its own (HF-derived) AdamW is deprecated: not the user's
    warnings.filterwarnings("ignore", "This implementation of AdamW", FutureWarning, "galore_torch")

    # The optimizer state holds a GaLoreProjector per matrix, which Trainer reloads on resume
    # with torch.load(weights_only=True): allow that one class (plain numbers and a tensor).
    torch.serialization.add_safe_globals([GaLoreProjector])
    values = {
        k: getattr(optimizer, k) if getattr(optimizer, k) is not None else default
        for k, default in GALORE_DEFAULTS.items()
    }
    targets = optimizer.target_modules
    return {
        "optim_target_modules": GALORE_TARGETS if targets is None else targets,
        "optim_args": ",".join(f"{k}={v}" for k, v in values.items()),
    }


def load_student(plan: TrainPlan) -> Any:
    from transformers import AutoModelForCausalLM

    from alloy.eval.scorer import load_pretrained

    model = plan.recipe.spec.model
    if plan.objective.load_model is not None:  # e.g. reward's sequence classifier
        return plan.objective.load_model(plan)
    torch.manual_seed(plan.recipe.spec.seed)
    if model.path is not None:
        return load_pretrained(Path(model.path), AutoModelForCausalLM, "model", dtype=torch.float32)
    return AutoModelForCausalLM.from_config(plan.config, dtype=torch.float32)


def _run(
    plan: TrainPlan,
    out: Path,
    run_dir: Path,
    eval_sets: list[Any],
    *,
    resume: bool,
    force: bool,
    say: Callable[[str], None],
    on_row: Callable[[dict[str, Any]], None] | None,
    command: str | None,
    merge: bool,
) -> TrainResult:
    from transformers import PrinterCallback

    from alloy.eval import EvalSettings
    from alloy.train.adapter import parameter_counts, wrap_model
    from alloy.train.objectives import ObjectiveContext
    from alloy.train.packing import Collator
    from alloy.train.trainer import (
        AlloyTrainer,
        CheckpointCompleteCallback,
        EvalCallback,
        MetricsCallback,
        SnapshotCallback,
    )

    spec = plan.recipe.spec
    args = training_arguments(plan, run_dir)  # sets up the process group under accelerate
    main = args.process_index == 0
    if main:
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # --force: start over
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(plan.recipe.text)
    device = args.device
    context = ObjectiveContext(
        plan.recipe,
        plan.tokenizer,
        device,
        rows=plan.rows,
        width=plan.sequence_length,
        say=say,
        run_dir=run_dir,
    )
    with args.main_process_first(desc="teacher cache"):
        objective = plan.objective.build(context)
    model = load_student(plan)
    if plan.config.vocab_size < len(plan.tokenizer):
        raise InputError(
            "the model and tokenizer do not belong together",
            [
                Problem(
                    "model",
                    f"the model scores {plan.config.vocab_size} tokens but the tokenizer has "
                    f"{len(plan.tokenizer)}",
                    None,
                )
            ],
        )
    if spec.adapter is not None:
        assert spec.model.path is not None  # checked with the recipe
        model = wrap_model(model, spec.adapter, spec.model.path)
    trainable, parameters = parameter_counts(model)
    say(
        f"trainable parameters: {trainable:,} of {parameters:,} "
        f"({trainable / max(1, parameters):.2%})"
    )
    pad = plan.tokenizer.pad_token_id
    trainer = AlloyTrainer(
        model=model,
        args=args,
        train_dataset=plan.rows,
        data_collator=Collator(0 if pad is None else int(pad)),
        processing_class=plan.tokenizer,
        objective=objective,
        schedule=plan.schedule,
        replay_from=plan.replay_from,
    )
    trainer.remove_callback(PrinterCallback)
    metrics = MetricsCallback(trainer, plan.schedule, on_row=on_row)
    trainer.add_callback(metrics)
    evaluation = None
    if spec.eval is not None:
        e = spec.eval
        settings = EvalSettings(e.window, e.stride, e.batch_size, e.max_tokens, e.max_items)
        evaluation = EvalCallback(
            trainer,
            metrics,
            eval_sets,
            settings,
            every=e.every,
            at_start=e.at_start,
            tokenizer=plan.tokenizer,
            say=say,
        )
        trainer.add_callback(evaluation)
    averaging = None
    if spec.averaging:
        from alloy.average.callback import AveragingCallback

        specs = dict(spec.averaging)
        if spec.adapter is not None:  # only the adapter changes: average only it
            specs = {name: {**options, "trainable_only": True} for name, options in specs.items()}
        averaging = AveragingCallback(specs, save_final=False)
        trainer.add_callback(averaging)
    snapshots = run_dir / "snapshots"
    if spec.snapshots.every:
        trainer.add_callback(
            SnapshotCallback(trainer, snapshots, spec.snapshots.every, plan.tokenizer, averaging)
        )
    trainer.add_callback(CheckpointCompleteCallback())  # last: after every state is saved
    checkpoint = _latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        say(f"no checkpoint in {run_dir} yet: starting from step 0")
    elif checkpoint is not None:
        say(f"resuming from {checkpoint}")
    say(f"training {plan.steps} steps on {device}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    result = TrainResult(
        path=out,
        steps=plan.steps,
        tokens=metrics.rows[-1]["tokens_total"] if metrics.rows else 0,
        final_loss=metrics.rows[-1]["loss"] if metrics.rows else float("nan"),
        eval=evaluation.last if evaluation is not None else {},
        seconds=metrics.elapsed,
        metrics=metrics.rows,
        trainable_parameters=trainable,
        parameters=parameters,
    )
    from alloy.train.outputs import write_outputs

    write_outputs(
        plan,
        trainer,
        metrics,
        averaging,
        snapshots,
        out,
        staging=run_dir / "final",
        force=force,
        command=command,
        result=result,
        merge=merge,
    )
    trainer.accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(run_dir, ignore_errors=True)
        say(f"wrote {out}")
    return result


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that every callback finished writing."""
    from alloy.train.trainer import COMPLETE_FILE

    found = [
        (int(p.name.split("-")[1]), p)
        for p in run_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / COMPLETE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def dry_run(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> TrainPlan:
    """The plan `train` would follow (data read and checked, nothing trained or written)."""
    loaded = (
        recipe if isinstance(recipe, Recipe) else load_train_recipe(recipe, overrides=overrides)
    )
    plan = plan_training(loaded)
    _eval_sets(loaded)
    if loaded.spec.teacher is not None:
        _check_teacher_tokenizer(loaded, plan.tokenizer)
    check_reference_tokenizer(loaded, plan.tokenizer)
    return plan


def summary_json(plan: TrainPlan, result: TrainResult) -> dict[str, Any]:
    return {
        "objective": plan.recipe.spec.objective,
        "steps": result.steps,
        "tokens": result.tokens,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "eval": result.eval,
        "batch_size": plan.batch_size,
        "sequence_length": plan.sequence_length,
        "processes": plan.world,
        "replay_fraction": (result.metrics[-1]["replay_fraction"] if result.metrics else 0.0),
        "sources": plan.tokens_by_source(),
        "trainable_parameters": result.trainable_parameters,
        "parameters": result.parameters,
        "adapter": plan.recipe.spec.adapter.model_dump() if plan.recipe.spec.adapter else None,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
