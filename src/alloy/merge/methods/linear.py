"""Linear merge: a weighted average of the models (uniform "model soup" with equal weights).

    theta = sum_i w_i * theta_i / sum_i w_i      (normalize: true, the default)
    theta = sum_i w_i * theta_i                  (normalize: false)

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import torch

from alloy.errors import InputError
from alloy.merge.registry import REQUIRED, merge_method


@merge_method(
    base="none",
    reference="https://arxiv.org/abs/2203.05482",
    per_model={"weight": REQUIRED},
    properties=("idempotent", "order_invariant"),
)
def linear(
    models: list[torch.Tensor], *, weight: list[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average of the models.

    Args:
        weight: the weight of each model
        normalize: divide by the sum of the weights (false: plain weighted sum)
    """
    result = torch.zeros_like(models[0])
    for model, w in zip(models, weight, strict=True):
        result.add_(model, alpha=w)
    if normalize:
        total = sum(weight)
        if abs(total) < 1e-12:
            raise InputError(f"linear: weights {weight} sum to zero; cannot normalize")
        result.div_(total)
    return result
