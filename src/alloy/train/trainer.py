"""alloy's transformers `Trainer`: the objective's loss, the recipe's schedule, exact metrics.

`AlloyTrainer` changes four things and nothing else, so accelerate (DDP, FSDP, DeepSpeed),
mixed precision, gradient accumulation, checkpointing and resuming are Trainer's own:

- `compute_loss` asks the objective for the summed loss of a micro batch and divides by the
  number of targets of the whole optimizer step (all micro batches, all processes), counted once
  per step in `get_batch_samples`; times the number of processes, because DDP averages gradients.
  The gradient is then exactly that of the mean loss over the step's targets.
- `create_scheduler` is the recipe's schedule (schedules.py) as a `LambdaLR`.
- the train sampler is sequential: the rows are already in their training order (packing.py).
- each step's sums (loss, per-part losses, tokens, replay tokens) are reduced over processes and
  recorded by `MetricsCallback`, which survives a resume through the checkpoint folder.

Callbacks here also score eval sets during training (alloy.eval), write model-only snapshots and
report progress.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from alloy.train.objectives.base import LossParts, Objective, count_targets
from alloy.train.schedules import Schedule, as_lambda

METRICS_FILE = "alloy-metrics.json"
COMPLETE_FILE = "alloy-complete"  # written last: the checkpoint holds every callback's state


@dataclass
class StepSums:
    """What this process's micro batches of the current optimizer step added up to."""

    loss: float = 0.0
    count: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    replay_tokens: float = 0.0

    def add(self, parts: LossParts, tokens: torch.Tensor, replay_tokens: torch.Tensor) -> None:
        self.loss += float(parts.total.detach())
        self.count += float(parts.count)
        for key, value in parts.metrics.items():
            self.parts[key] = self.parts.get(key, 0.0) + float(value)
        self.tokens += float(tokens)
        self.replay_tokens += float(replay_tokens)


class AlloyTrainer(Trainer):
    """Trainer with an alloy objective and schedule (see the module docstring)."""

    loss_is_scaled_for_ga = True

    def __init__(
        self, *args: Any, objective: Objective, schedule: Schedule, replay_from: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective: Objective = objective
        self.schedule = schedule
        self.replay_from = replay_from
        self.step_sums = StepSums()

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)  # type: ignore[arg-type]

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            target = optimizer if optimizer is not None else self.optimizer
            assert target is not None, "the optimizer is created before the scheduler"
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(target, as_lambda(self.schedule))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | None]:
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        count = torch.stack([count_targets(b) for b in batches]).sum().to(device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batches, count

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        parts = self.objective.loss(model, inputs)
        if num_items_in_batch is None:  # evaluation or a caller outside the training loop
            num_items_in_batch = parts.count
        denominator = torch.as_tensor(num_items_in_batch, device=parts.total.device).clamp(min=1)
        loss = parts.total * self.accelerator.num_processes / denominator
        if model.training:
            lengths, source = inputs["lengths"], inputs["source"]
            self.step_sums.add(parts, lengths.sum(), lengths[source >= self.replay_from].sum())
        return (loss, None) if return_outputs else loss


class MetricsCallback(TrainerCallback):
    """One row of metrics per optimizer step, exact over processes; kept across resumes."""

    def __init__(
        self,
        trainer: AlloyTrainer,
        schedule: Schedule,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.trainer = trainer
        self.schedule = schedule
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.offset = 0.0  # seconds already spent before a resume

    @property
    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.started

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        if state.global_step:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / METRICS_FILE
            if saved.is_file():
                record = json.loads(saved.read_text())
                self.rows = [r for r in record["rows"] if r["step"] <= state.global_step]
                self.evals = [e for e in record["evals"] if e["step"] <= state.global_step]
                self.offset = float(record.get("seconds", 0.0))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sums = self.trainer.step_sums
        keys = sorted(sums.parts)
        local = [
            sums.loss,
            sums.count,
            sums.tokens,
            sums.replay_tokens,
            *(sums.parts[k] for k in keys),
        ]
        values = torch.tensor(local, dtype=torch.float64, device=self.trainer.args.device)
        if self.trainer.accelerator.num_processes > 1:
            values = self.trainer.accelerator.reduce(values, reduction="sum")
        total = values.cpu().tolist()
        loss, count, tokens, replay = total[:4]
        self.trainer.step_sums = StepSums()
        previous = self.rows[-1] if self.rows else {"tokens_total": 0, "replay_total": 0}
        tokens_total = previous["tokens_total"] + int(tokens)
        replay_total = previous["replay_total"] + int(replay)
        seconds = self.elapsed
        row: dict[str, Any] = {
            "step": state.global_step,
            "lr": self.schedule(state.global_step - 1),
            "loss": loss / max(count, 1),
            **{k: v / max(count, 1) for k, v in zip(keys, total[4:], strict=True)},
            "targets": int(count),
            "tokens": int(tokens),
            "tokens_total": tokens_total,
            "replay_total": replay_total,
            "replay_fraction": replay_total / max(tokens_total, 1),
            "seconds": seconds,
        }
        first = self.rows[0] if self.rows else None
        if first is not None and seconds > first["seconds"]:
            row["tokens_per_s"] = (tokens_total - first["tokens_total"]) / (
                seconds - first["seconds"]
            )
        self.rows.append(row)
        if self.on_row is not None and state.is_world_process_zero:
            self.on_row(row)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            record = {"rows": self.rows, "evals": self.evals, "seconds": self.elapsed}
            (folder / METRICS_FILE).write_text(json.dumps(record))


class EvalCallback(TrainerCallback):
    """Scores eval sets with `alloy.eval` before, during (every `every` steps) and after."""

    def __init__(
        self,
        trainer: AlloyTrainer,
        metrics: MetricsCallback,
        sets: list[Any],
        settings: Any,
        *,
        every: int,
        at_start: bool,
        tokenizer: Any,
        say: Callable[[str], None],
    ) -> None:
        self.trainer, self.metrics, self.sets, self.settings = trainer, metrics, sets, settings
        self.every, self.at_start, self.tokenizer, self.say = every, at_start, tokenizer, say
        self.last: dict[str, Any] = {}

    def score(self, step: int) -> dict[str, Any]:
        from alloy.eval import ModelScorer, evaluate

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        context = int(getattr(model.config, "max_position_embeddings", 0) or 1024)
        device = next(model.parameters()).device
        scorer = ModelScorer("training", model, self.tokenizer, context, device, check_finite=False)
        try:
            results = evaluate(scorer, self.sets, self.settings)
        finally:
            model.train(was_training)
        for name, result in results.items():
            self.metrics.evals.append({"step": step, "set": name, **result})
        self.last = results
        headline = ", ".join(
            f"{name} {r.get('perplexity', r.get('accuracy', math.nan)):.4g}"
            for name, r in results.items()
        )
        self.say(f"eval at step {step}: {headline}")
        return results

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at_start and state.global_step == 0 and state.is_world_process_zero:
            self.score(0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = state.global_step >= state.max_steps
        due = self.every and state.global_step % self.every == 0
        if due and not done and state.is_world_process_zero:
            self.score(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.score(state.global_step)


class SnapshotCallback(TrainerCallback):
    """Model-only Hugging Face folders every `every` steps (for averaging along training).

    With `averaging` (the run's `AveragingCallback`, added before this one so its averages are
    already updated for the step), each snapshot also holds `averaged-<name>/`: every weight
    average as it stood at that step, a complete model folder.
    """

    def __init__(
        self,
        trainer: AlloyTrainer,
        folder: Path,
        every: int,
        tokenizer: Any,
        averaging: Any = None,
    ) -> None:
        self.trainer, self.folder, self.every, self.tokenizer = trainer, folder, every, tokenizer
        self.averaging = averaging

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every or not state.is_world_process_zero:
            return
        from alloy.io.atomic import AtomicFolder

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        with AtomicFolder(self.folder / f"checkpoint-{state.global_step}", force=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            for name, averager in getattr(self.averaging, "averagers", {}).items():
                if averager.count:
                    averager.save_pretrained(
                        model, tmp / f"averaged-{name}", tokenizer=self.tokenizer
                    )


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint complete once every other callback has saved its state into it.

    Added last, so its `on_save` runs last: a run killed while a checkpoint is being written
    leaves it unmarked, and resuming skips it for the previous complete one.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / COMPLETE_FILE).write_text(str(state.global_step))
