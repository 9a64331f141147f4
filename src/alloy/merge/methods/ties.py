"""TIES merging: trim each task vector, elect a sign per entry, average the agreeing entries.

With task vectors tau_i = theta_i - theta_base:
    1. trim: keep the top `density` fraction of |tau_i| (exactly k = int(density * n) entries)
    2. elect: per entry, the sign of sum_i w_i * tau_i (mergekit; `election: sum` elects on the
       unweighted sum as in the paper, `count` by majority of signs)
    3. disjoint mean: theta = base + lambda * sum_i w_i m_i tau_i / sum_i w_i m_i, where m_i marks
       the entries of model i that agree with the elected sign (normalize: false drops the
       division)

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import Election, RescaleMode, TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, UNIT


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2306.01708",
    per_model={"weight": REQUIRED, "density": 1.0},
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def ties(
    *,
    weight: Annotated[list[float], ANY],
    density: Annotated[list[float], UNIT],
    normalize: bool = True,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    election: Election = "weighted_sum",
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Trim, elect sign, disjoint mean of task vectors.

    Args:
        weight: the weight of each model's task vector
        density: the fraction of each task vector kept (by magnitude)
        normalize: divide by the summed weights of the agreeing models
        rescale: rescale each trimmed task vector (see rescale_mode)
        rescale_mode: "l1" keeps the L1 norm of the untrimmed vector (mergekit), "density"
            divides by the density
        election: "weighted_sum" (mergekit), "sum" (the paper: unweighted) or "count"
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return TaskVectorMerge(
        weight,
        rule="magnitude",
        density=density,
        rescale=rescale,
        rescale_mode=rescale_mode,
        election=election,
        normalize=normalize,
        lambda_=lambda_,
    )
