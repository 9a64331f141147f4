"""DARE with TIES sign election: random drop and rescale, then a sign-agreeing combination.

With task vectors tau_i = theta_i - theta_base and d_i ~ Bernoulli(density_i) per entry:
    1. drop:  tau_i' = rescale(d_i * tau_i)  ("density": divide by density_i, the paper's 1/p;
       "l1", mergekit's only mode: match the L1 norm of tau_i); density >= 1 keeps tau_i whole
    2. elect: per entry, the sign of sum_i w_i * tau_i' (`election` as in TIES)
    3. theta = base + lambda * sum_i w_i m_i tau_i' / (normalize ? sum_i w_i m_i : 1), where m_i
       marks the entries of model i that agree with the elected sign

The drop is random: the engine seeds `generator` per tensor, so a merge is reproducible, but it
matches mergekit 0.1.5 only statistically (mergekit draws from torch's global RNG).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import Election, RescaleMode, TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, UNIT


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2311.03099",
    per_model={"weight": REQUIRED, "density": 1.0},
    random=True,
    properties=("idempotent", "base_fixed_point"),
)
def dare_ties(
    *,
    weight: Annotated[list[float], ANY],
    density: Annotated[list[float], UNIT],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    election: Election = "weighted_sum",
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Random drop and rescale of each task vector, sign election, sum of agreeing entries.

    Args:
        weight: the weight of each model's task vector
        density: the probability that each entry of a task vector is kept
        normalize: divide by the summed weights of the agreeing models
        rescale: rescale each dropped-out task vector (see rescale_mode)
        rescale_mode: "l1" keeps the L1 norm (mergekit), "density" divides by the density (paper)
        election: "weighted_sum" (mergekit), "sum" (unweighted) or "count"
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return TaskVectorMerge(
        weight,
        rule="random",
        density=density,
        rescale=rescale,
        rescale_mode=rescale_mode,
        election=election,
        normalize=normalize,
        lambda_=lambda_,
    )
