"""Task arithmetic: add weighted task vectors to the base model.

With task vectors tau_i = theta_i - theta_base:
    theta = base + lambda * sum_i w_i * tau_i                  (normalize: false, the default)
    theta = base + lambda * sum_i w_i * tau_i / sum_i w_i      (normalize: true)

A negative weight subtracts a task vector: weight -1 "forgets" what fine-tuning taught (the
paper's task negation), weights above 1 amplify it.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2212.04089",
    per_model={"weight": REQUIRED},
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def task_arithmetic(
    *,
    weight: Annotated[list[float], ANY],
    normalize: bool = False,
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Base plus a weighted sum of task vectors (negative weights negate a task).

    Args:
        weight: the weight of each model's task vector; -1 subtracts (forgets) that task
        normalize: divide the sum by the sum of the weights
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return TaskVectorMerge(
        weight,
        normalize=normalize,
        lambda_=lambda_,
    )
