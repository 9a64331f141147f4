"""Model Breadcrumbs with TIES sign election.

With task vectors tau_i = theta_i - theta_base of n entries:
    1. mask: rank |tau_i| ascending and keep the window of k = int(density_i * n) entries just
       below the top int(gamma_i * n) outliers (density >= 1 keeps tau_i whole, as mergekit does)
    2. elect: per entry, the sign of sum_i w_i * tau_i' (`election` as in TIES)
    3. theta = base + lambda * sum_i w_i m_i tau_i' / (normalize ? sum_i w_i m_i : 1), where m_i
       marks the entries of model i that agree with the elected sign

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, https://arxiv.org/abs/2312.06795
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import Election, RescaleMode, TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, UNIT


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2312.06795",
    per_model={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def breadcrumbs_ties(
    *,
    weight: Annotated[list[float], ANY],
    density: Annotated[list[float], UNIT],
    gamma: Annotated[list[float], UNIT],
    normalize: bool = False,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    election: Election = "weighted_sum",
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Keep a middle band of each task vector's magnitudes, elect signs, sum agreeing entries.

    Args:
        weight: the weight of each model's task vector
        density: the fraction of each task vector kept
        gamma: the fraction of largest-magnitude entries dropped as outliers
        normalize: divide by the summed weights of the agreeing models
        rescale: rescale each masked task vector (see rescale_mode)
        rescale_mode: "l1" keeps the L1 norm (mergekit), "density" divides by the density
        election: "weighted_sum" (mergekit), "sum" (unweighted) or "count"
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return TaskVectorMerge(
        weight,
        rule="outliers",
        density=density,
        gamma=gamma,
        rescale=rescale,
        rescale_mode=rescale_mode,
        election=election,
        normalize=normalize,
        lambda_=lambda_,
    )
