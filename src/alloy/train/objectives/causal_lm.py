"""`causal_lm`: next-token cross-entropy on packed text (continued pre-training)."""

from __future__ import annotations

from typing import Any

import torch

from alloy.train.objectives.base import (
    LossParts,
    Objective,
    ObjectiveContext,
    model_inputs,
    objective,
    shifted_labels,
)


class CausalLM:
    """Summed next-token NLL over the batch's targets (labels of -100 are not targets)."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        labels = shifted_labels(batch)  # (B, T)
        total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        count = (labels != -100).sum()
        return LossParts(total, count, {"ce": total.detach()})


@objective(
    "causal_lm",
    summary="next-token cross-entropy on packed documents (continued pre-training)",
    reference="https://arxiv.org/abs/2403.08763",
    rows="blocks",
)
def build_causal_lm(context: ObjectiveContext) -> Objective:
    return CausalLM()


@objective(
    "sft",
    summary="supervised fine-tuning: cross-entropy on completions / assistant turns only",
    reference="https://arxiv.org/abs/2203.02155",
    rows="examples",
)
def build_sft(context: ObjectiveContext) -> Objective:
    # The same loss as causal_lm: the data marks prompts as non-targets (completion-only loss).
    return CausalLM()
