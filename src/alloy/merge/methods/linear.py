"""Linear merge: a weighted average of the models (uniform "model soup" with equal weights).

    theta = sum_i w_i * theta_i / sum_i w_i      (normalize: true, the default)
    theta = sum_i w_i * theta_i                  (normalize: false)

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from typing import Annotated

import torch

from alloy.errors import InputError
from alloy.merge.blocks import Block, Elementwise
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY


@merge_method(
    base="none",
    reference="https://arxiv.org/abs/2203.05482",
    per_model={"weight": REQUIRED},
    properties=("idempotent", "order_invariant"),
)
def linear(*, weight: Annotated[list[float], ANY], normalize: bool = True) -> Elementwise:
    """Weighted average of the models.

    Args:
        weight: the weight of each model
        normalize: divide by the sum of the weights (false: plain weighted sum)
    """
    total = sum(weight)
    if normalize and abs(total) < 1e-12:
        raise InputError(
            f"linear: weights {weight} sum to zero, so they cannot be normalized "
            "(change a weight, or set normalize: false for a plain weighted sum)"
        )

    def average(block: Block) -> torch.Tensor:
        result = block.models[0] * weight[0]
        for model, w in zip(block.models[1:], weight[1:], strict=True):
            result.add_(model, alpha=w)
        return result.div_(total) if normalize else result

    return Elementwise(average)
