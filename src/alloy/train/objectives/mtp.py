"""`mtp`: multi-token prediction heads trained beside a checkpoint (Gloeckle et al. 2024,
https://arxiv.org/abs/2404.19737).

The model gets `mtp.heads` extra heads (alloy.mtp.heads: one decoder layer and norm each, the
model's unembedding), attached as its `mtp_heads` submodule so that Trainer's optimizer,
checkpoints and resume treat them like any weight. By default only the heads train: the trunk
and the model's own next-token head are frozen, so the model written (and the verifier of
speculative decoding) is exactly the start model, and the forward pass stops at the input of the
last decoder layer (the model's own logits are never computed). With `train_trunk`, the model's
next-token loss (weight `next_token_weight`, default 1) is added and everything trains.

The loss is alloy.mtp.losses.multi_token_loss, summed over targets like every objective; the
trainer divides it by the step's next-token targets (head i has i fewer per row). The output
folder holds the heads in mtp_heads.safetensors beside the plain HF files (outputs.py).
"""

from __future__ import annotations

from typing import Any

import torch

from alloy.train.objectives.base import (
    LossParts,
    Objective,
    ObjectiveContext,
    model_inputs,
    objective,
)


class MultiToken:
    def __init__(self, weights: list[float], next_token_weight: float | None, sequential: bool):
        self.weights = weights  # per extra head
        self.next_token_weight = next_token_weight  # None: the model's own head is frozen
        self.sequential = sequential

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        from alloy.mtp.heads import ATTRIBUTE, decoder_parts, trunk, unembed
        from alloy.mtp.losses import multi_token_loss

        heads = getattr(getattr(model, "module", model), ATTRIBUTE)  # DDP wraps the model
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.next_token_weight is not None):
            states, layer_kwargs = trunk(model, model_inputs(batch))  # (B, T, H)

        def head_logits(i: int) -> Any:
            return lambda h: unembed(model, heads.hidden(i, h, layer_kwargs))  # (B, T, V)

        specs: list[tuple[int, float, Any]] = [
            (2 + i, w, head_logits(i)) for i, w in enumerate(self.weights)
        ]
        if self.next_token_weight is not None:
            layers, norm = decoder_parts(model)

            def own(h: torch.Tensor) -> torch.Tensor:
                out = layers[-1](h, **layer_kwargs)
                return unembed(model, norm(out[0] if isinstance(out, tuple) else out))

            specs.insert(0, (1, self.next_token_weight, own))
        total, parts = multi_token_loss(states, batch["labels"], specs, sequential=self.sequential)
        count = (batch["labels"][:, 1:] != -100).sum()
        metrics: dict[str, torch.Tensor] = {}
        for k, ce, hits in parts:
            metrics[f"ce_{k}"] = ce
            metrics[f"top1_{k}"] = hits.to(ce.dtype)
        return LossParts(total, count, metrics)


def load_mtp_model(plan: Any) -> Any:
    """The recipe's model with `mtp.heads` new heads as its `mtp_heads` submodule; everything
    but the heads frozen unless `train_trunk`."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from alloy.eval.scorer import load_pretrained
    from alloy.mtp.heads import ATTRIBUTE, MTPHeads
    from alloy.mtp.settings import mtp_settings

    spec = plan.recipe.spec
    settings = mtp_settings(spec)
    assert spec.model.path is not None  # checked with the recipe (mtp_issues)
    path = Path(spec.model.path)
    model = load_pretrained(path, AutoModelForCausalLM, "model", dtype=torch.float32)
    if not settings.train_trunk:
        model.requires_grad_(False)
    setattr(model, ATTRIBUTE, MTPHeads.from_model(model, settings.heads))
    return model


def split_saved_heads(plan: Any, model: Any, folder: Any) -> None:
    """Move the heads out of a saved run's weight files into mtp_heads.safetensors + json."""
    from alloy.mtp.heads import head_info, split_heads
    from alloy.mtp.settings import head_weights, mtp_settings

    spec = plan.recipe.spec
    settings = mtp_settings(spec)
    info = {
        **head_info(model),
        "trunk": "trained" if settings.train_trunk else "frozen",
        "weights": head_weights(settings),
        "start_model": spec.model.path,
    }
    split_heads(folder, info)  # an average may hold no heads: then nothing moves


@objective(
    "mtp",
    summary="multi-token prediction heads (trunk frozen by default) for speculative decoding",
    reference="https://arxiv.org/abs/2404.19737",
    rows="blocks",
    load_model=load_mtp_model,
)
def build_mtp(context: ObjectiveContext) -> Objective:
    from alloy.mtp.settings import head_weights, mtp_settings

    settings = mtp_settings(context.recipe.spec)
    next_token = None
    if settings.train_trunk:
        weight = settings.next_token_weight
        next_token = 1.0 if weight is None else float(weight)
    return MultiToken(head_weights(settings), next_token, settings.sequential)
