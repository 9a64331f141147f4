"""DELLA (linear): magnitude-aware random drop (MagPrune), rescale, weighted sum.

With task vectors tau_i = theta_i - theta_base:
    1. MagPrune: within each row, the entry of magnitude rank r (1 = smallest) of n is kept with
       probability p_r = density - epsilon + 2 * epsilon * (r - 1) / (n - 1), then the survivors
       are rescaled ("l1", mergekit: match the L1 norm of tau_i; "density": divide by density,
       the mean keep probability, where the paper divides each entry by its own p_r)
    2. theta = base + lambda * sum_i w_i * tau_i' / (normalize ? sum_i w_i : 1)
As in mergekit, density >= 1 keeps tau_i whole and density <= 0 zeroes it.

The drop is random: the engine seeds `generator` per tensor, so a merge is reproducible, but it
matches mergekit 0.1.5 only statistically (mergekit draws from torch's global RNG).

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024, https://arxiv.org/abs/2406.11617
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.methods._task_vectors import RescaleMode, TaskVectorMerge
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, UNIT, Range


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2406.11617",
    per_model={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    random=True,
    properties=("idempotent", "base_fixed_point"),
)
def della_linear(
    *,
    weight: Annotated[list[float], ANY],
    density: Annotated[list[float], UNIT],
    epsilon: Annotated[list[float], Range(0, 1, high_open=True)],
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: Annotated[float, ANY] = 1.0,
    int8_mask: bool = False,
) -> TaskVectorMerge:
    """Magnitude-aware random drop of each task vector, then a weighted sum.

    Args:
        weight: the weight of each model's task vector
        density: the mean probability that an entry of a task vector is kept
        epsilon: keep probabilities spread over density ± epsilon by magnitude rank
        normalize: divide the sum by the sum of the weights
        rescale: rescale each pruned task vector (see rescale_mode)
        rescale_mode: "l1" keeps the L1 norm (mergekit), "density" divides by the density
        lambda_: scale of the merged task vector
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect

    Raises:
        InputError: if 0 < density < 1 and density ± epsilon leaves (0, 1).
    """
    return TaskVectorMerge(
        weight,
        rule="della",
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        rescale_mode=rescale_mode,
        normalize=normalize,
        lambda_=lambda_,
    )
