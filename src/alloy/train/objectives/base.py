"""What an objective is: a loss over a micro-batch of rows, as sums the trainer normalises.

An objective never divides by its own token count: it returns the summed loss and how many
targets it covers, and the trainer divides by the number of targets of the whole optimizer step
(every gradient-accumulation micro-batch, every process). That makes the loss the exact mean over
the step's targets, whatever the padding or the split over processes, so one process and two give
the same step.

Adding an objective is one file in this folder: a builder registered with `@objective`, which
receives the `ObjectiveContext` (recipe, tokenizer, device, rows) and returns something with a
`loss(model, batch)` method (dpo.py: preference pairs, whose loss is a mean over pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

RowKind = Literal["blocks", "examples", "either", "pairs"]


@dataclass
class LossParts:
    total: torch.Tensor  # () summed loss over this micro-batch's targets, with grad
    count: torch.Tensor  # () number of targets it covers
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # () sums, detached


class Objective(Protocol):
    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts: ...


@dataclass
class ObjectiveContext:
    """What an objective may need to build itself."""

    recipe: Any  # alloy.train.recipe.Recipe
    tokenizer: Any
    device: torch.device
    rows: Any = None  # the run's TrainRows (the distillation cache reads them)
    width: int = 0  # sequence length of a row
    say: Callable[[str], None] = print
    run_dir: Path | None = None  # the run's checkpoint folder (kept across a resume)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    summary: str
    reference: str
    rows: RowKind  # blocks: packed text; examples: prompt/completion or messages; either
    needs_teacher: bool
    build: Callable[[ObjectiveContext], Objective]
    # the model to train, from the TrainPlan; None: the recipe's causal LM
    load_model: Callable[[Any], Any] | None = None


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def objective(
    name: str,
    *,
    summary: str,
    reference: str,
    rows: RowKind,
    needs_teacher: bool = False,
    load_model: Callable[[Any], Any] | None = None,
) -> Callable[[Callable[[ObjectiveContext], Objective]], Callable[[ObjectiveContext], Objective]]:
    def register(
        build: Callable[[ObjectiveContext], Objective],
    ) -> Callable[[ObjectiveContext], Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = ObjectiveSpec(
            name, summary, reference, rows, needs_teacher, build, load_model
        )
        return build

    return register


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of a causal LM's forward for a collated batch (no KV cache: in
    training it is wasted memory, and it would turn off transformers' per-document masks)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            inputs[key] = batch[key]
    return inputs


def shifted_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) labels aligned with the logits: position t holds label t + 1, the last position
    -100 (it predicts nothing). Shifting the labels, not the logits, spares a (B, T-1, V) copy
    of the logits in the forward pass and again in the backward."""
    return torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) True where position t's next token (t + 1) is a training target."""
    return batch["labels"][:, 1:] != -100


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the step's loss is a mean over: target tokens, or pairs of a preference batch."""
    if "pairs" in batch:
        return batch["pairs"].sum()
    return target_mask(batch).sum()
