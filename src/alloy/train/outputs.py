"""What a finished run leaves behind: the model folder, its card, curves and the metrics.

With an adapter, the model folder is the PEFT adapter (kept in float32: it is small, and PEFT
casts it to the base's dtype when it loads), or with `merge` the start model with the adapter
folded in, written like a full run's model in the start model's dtype.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import torch

from alloy.io import Checkpoint
from alloy.io.atomic import AtomicFolder
from alloy.io.card import CardInput, model_card
from alloy.io.writer import check_finite


def save_dtype(plan: Any) -> torch.dtype:
    """The dtype the model is written in: the starting checkpoint's, float32 for new weights."""
    if plan.recipe.spec.model.path is None:
        return torch.float32
    dtype = getattr(plan.config, "dtype", None) or getattr(plan.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def cast_folder(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model's floating-point weights (and its config) in `dtype`."""
    import json

    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = {
            k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()
        }
        save_file(tensors, path, metadata={"format": "pt"})
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        data.pop("torch_dtype", None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_outputs(
    plan: Any,
    trainer: Any,
    metrics: Any,
    averaging: Any,
    snapshots: Path,
    out: Path,
    *,
    staging: Path,
    force: bool,
    command: str | None,
    result: Any,
    merge: bool = False,
) -> None:
    """Write OUT. Called on every process: the weights go through `Trainer.save_model`, which
    gathers sharded (FSDP, DeepSpeed ZeRO-3) weights; only the main process writes the rest.

    With an adapter the staged folder is the adapter; `merge` folds it (and each average) into
    the start model, read again from disk, so it works whatever sharded the training."""
    from alloy.train.adapter import ADAPTER_WEIGHTS
    from alloy.train.run import summary_json, write_json

    base = plan.recipe.spec.model.path if plan.recipe.spec.adapter is not None else None
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    with Checkpoint.open(staging if base is None else staging / ADAPTER_WEIGHTS) as weights:
        check_finite(
            ((name, weights.read(name)) for name in weights),
            out,
            "training diverged: lower the learning rate or check the data; the run's "
            f"checkpoints in {staging.parent} are kept",
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    dtype = save_dtype(plan)
    # A full model is cast to the start's dtype; an adapter stays float32 unless folded.
    cast = dtype != torch.float32 and (base is None or merge)

    def place(folder: Path, dest: Path) -> None:
        """Move a saved model (or fold a saved adapter) into `dest`, with the tokenizer."""
        if base is not None and merge:
            fold_adapter(folder, dest, base=base, pad_id=plan.tokenizer.pad_token_id)
        else:
            dest.mkdir(exist_ok=True)
            for path in folder.iterdir():
                # training_args.bin pickles TrainingArguments: not ours to ship; README.md is
                # PEFT's template card (OUT gets alloy's)
                if path.name not in ("training_args.bin", "README.md"):
                    path.rename(dest / path.name)
        if plan.recipe.spec.objective == "mtp":  # the heads beside a plain HF folder
            from alloy.train.objectives.mtp import split_saved_heads

            split_saved_heads(plan, model, dest)
        plan.tokenizer.save_pretrained(dest)
        if cast:
            cast_folder(dest, dtype)

    with AtomicFolder(out, force=force) as tmp:
        place(staging, tmp)
        if averaging is not None:
            for name, averager in averaging.averagers.items():
                if averager.count:
                    saved = staging.parent / f"averaged-{name}"
                    averager.save_pretrained(model, saved, force=True)
                    place(saved, tmp / f"averaged-{name}")
        if snapshots.is_dir():
            snapshots.rename(tmp / "snapshots")
        folder = tmp / "training"
        folder.mkdir()
        (folder / "recipe.yaml").write_text(plan.recipe.text)
        (folder / "metrics.csv").write_text(to_csv(metrics.rows))
        (folder / "eval.csv").write_text(to_csv(metrics.evals))
        write_json(folder / "summary.json", summary_json(plan, result))
        (folder / "plan.txt").write_text(plan.summary() + "\n")
        plot_curves(metrics.rows, metrics.evals, folder / "curves.png")
        (tmp / "README.md").write_text(card(plan, result, command))


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], dict)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def card(plan: Any, result: Any, command: str | None) -> str:
    spec = plan.recipe.spec
    inputs = []
    if spec.model.path is not None:
        folder = Path(spec.model.path)
        weights = sorted(folder.glob("*.safetensors"))
        inputs.append(CardInput.of("model", folder, weights))
    for source in plan.sources:
        hashes = {Path(p).name: d for p, d in source.files}
        inputs.append(
            CardInput(
                f"data {source.name}",
                str(Path(source.files[0][0]).parent)
                if len(source.files) > 1
                else source.files[0][0],
                hashes,
            )
        )
    if spec.teacher is not None:
        inputs.append(CardInput("teacher", spec.teacher.model))
    summary = (
        f"Trained with `alloy train` ({spec.objective}): {result.steps:,} steps, "
        f"{result.tokens:,} tokens, final training loss {result.final_loss:.4f}."
    )
    text = model_card(
        title=spec.name or f"alloy {spec.objective}",
        summary=summary,
        command=command,
        inputs=inputs,
        recipe=plan.recipe.text,
        tags=["alloy-train", spec.objective],
    )
    lines = ["", "## Training", "", "| | |", "|---|---|"]
    lines += [
        f"| objective | {spec.objective} |",
        f"| steps | {result.steps:,} |",
        f"| tokens | {result.tokens:,} |",
        f"| batch | {plan.batch_size} rows x {plan.sequence_length} tokens |",
        f"| final training loss | {result.final_loss:.4f} |",
        f"| time | {result.seconds:,.0f} s on {plan.world} process(es) |",
    ]
    if plan.adapter is not None:
        lines.append(f"| adapter | {plan.adapter.summary().removeprefix('adapter: ')} |")
    if result.parameters:
        share = result.trainable_parameters / result.parameters
        lines.append(
            f"| trainable parameters | {result.trainable_parameters:,} of "
            f"{result.parameters:,} ({share:.2%}) |"
        )
    if result.metrics and spec.replay is not None:
        lines.append(f"| replay share of tokens | {result.metrics[-1]['replay_fraction']:.4f} |")
    for name, scores in (result.eval or {}).items():
        value = scores.get("perplexity", scores.get("accuracy"))
        metric = "perplexity" if "perplexity" in scores else "accuracy"
        lines.append(f"| eval {name} ({metric}) | {value:.4g} |")
    return text + "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> bool:
    """Loss, learning rate and eval curves in one PNG; False when matplotlib is absent."""
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], label="loss", lw=1)
    for key in ("ce", "kd") if "kd" in rows[0] else ():
        if key in rows[0]:
            axes[0].plot(steps, [r.get(key, math.nan) for r in rows], label=key, lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (nats / target)")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["lr"] for r in rows], color="tab:green", lw=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    if evals:
        # text sets' perplexity; with preference or choice sets only, their accuracy
        text = any(e.get("perplexity") is not None for e in evals)
        metric = "perplexity" if text else "accuracy"
        for name in dict.fromkeys(e["set"] for e in evals):
            points = [(e["step"], e.get(metric)) for e in evals if e["set"] == name]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                axes[2].plot(*zip(*points, strict=True), marker="o", ms=3, label=name, lw=1)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel(f"eval {metric}")
        if text:
            axes[2].set_yscale("log")
        if axes[2].lines:
            axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_schedule(schedule: Any, steps: int, path: Path, title: str = "") -> bool:
    """The learning rate of every step of a run (`alloy train --plot-schedule`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = list(range(steps))
    ax.plot(xs, [schedule(s) for s in xs], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fold_adapter(adapter: Path, out: Path, *, base: str | Path, pad_id: int | None = None) -> None:
    """Write `base` with the adapter folder `adapter` folded in (PEFT's merge_and_unload) as a
    plain Hugging Face model folder in `out` (float32; the caller casts). A sequence
    classification adapter (a reward model's) is folded into `base` as a one-score classifier
    padded with `pad_id`, its trained `score` head taken from the adapter."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from alloy.eval.scorer import load_pretrained

    task = json.loads((adapter / "adapter_config.json").read_text()).get("task_type")
    if task == "SEQ_CLS":
        from alloy.train.objectives.reward import reward_config

        config = load_pretrained(Path(base), AutoConfig)
        config = reward_config(config, pad_id if pad_id is not None else config.pad_token_id)
        model = load_pretrained(
            Path(base),
            AutoModelForSequenceClassification,
            "model",
            config=config,
            dtype=torch.float32,
        )
    else:
        model = load_pretrained(Path(base), AutoModelForCausalLM, "model", dtype=torch.float32)
    from alloy.train.adapter import _peft

    with _peft() as peft:
        merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
