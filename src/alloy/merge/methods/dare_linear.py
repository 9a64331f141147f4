"""DARE (linear): drop task-vector entries at random, rescale the survivors, add them up.

With task vectors tau_i = theta_i - theta_base and m_i ~ Bernoulli(density_i) per entry:
    tau_i' = rescale(m_i * tau_i)
    theta  = base + lambda * sum_i w_i * tau_i' / (normalize ? sum_i w_i : 1)

rescale_mode "density" divides by density_i (the paper's 1/p); "l1" (mergekit's only mode)
scales tau_i' to the L1 norm of tau_i. density >= 1 leaves tau_i untouched (no draw).

The drop is random: the engine seeds `generator` per tensor, so a merge is reproducible, but it
matches mergekit 0.1.5 only statistically (mergekit draws from torch's global RNG).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import RescaleMode, TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, UNIT


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2311.03099",
    per_model={"weight": REQUIRED, "density": 1.0},
    random=True,
    properties=("idempotent", "base_fixed_point"),
)
def dare_linear(
    *,
    weight: Annotated[list[float], ANY],
    density: Annotated[list[float], UNIT],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Random drop and rescale of each task vector, then a weighted sum.

    Args:
        weight: the weight of each model's task vector
        density: the probability that each entry of a task vector is kept
        normalize: divide the sum by the sum of the weights
        rescale: rescale each dropped-out task vector (see rescale_mode)
        rescale_mode: "l1" keeps the L1 norm (mergekit), "density" divides by the density (paper)
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return TaskVectorMerge(
        weight,
        rule="random",
        density=density,
        rescale=rescale,
        rescale_mode=rescale_mode,
        normalize=normalize,
        lambda_=lambda_,
    )
