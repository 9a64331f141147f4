"""Multi-SLERP: spherical barycentric interpolation of several models (or task vectors).

Each tensor is one vector. With vectors v_i (the models, or with a base the task vectors
tau_i = theta_i - theta_base), weights w_i (divided by their sum when normalize_weights),
norms n_i = |v_i| and unit directions u_i = v_i / (n_i + eps):
    m     = sum_i w_i u_i                      (the weighted Euclidean mean of the directions)
    theta = (sum_i w_i n_i) * m / |m|          (plus the base, with a base)
so the direction is the normalised mean direction and the norm the weighted mean norm.

mergekit 0.1.5 writes this as a projection of the u_i onto the tangent space at m / |m|, a
weighted sum there and the exponential map back. At that point the weighted tangent sum is
sum_i w_i (u_i - (u_i . m/|m|) m/|m|) = m - |m| m/|m| = 0 exactly, so the map returns m / |m|;
alloy computes the closed form from the Gram matrix of the v_i (one pass, see _gram.py), and the
two agree up to float rounding. When |m| < eps: two models fall back to sum_i w_i v_i; when
every v_i is zero the result is the base (or zero); otherwise it is an error (mergekit raises for
both of the last two).

One model returns it unchanged.

Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from alloy.errors import InputError
from alloy.merge.methods._gram import GramCombination
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY, POSITIVE


@merge_method(
    base="optional",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    per_model={"weight": REQUIRED},
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def multislerp(
    *,
    weight: Annotated[list[float], ANY],
    normalize_weights: bool = True,
    eps: Annotated[float, POSITIVE] = 1e-8,
) -> GramCombination:
    """Spherical weighted mean of several models or task vectors, with their mean norm.

    Args:
        weight: the weight of each model
        normalize_weights: divide the weights by their sum
        eps: added to each norm before dividing by it; a mean direction shorter than this is
            degenerate
    """
    total = sum(weight)
    if normalize_weights and abs(total) < 1e-12:
        raise InputError(
            f"multislerp: weights {weight} sum to zero, so they cannot be normalized "
            "(change them, or set normalize_weights: false)"
        )
    weights = [w / total for w in weight] if normalize_weights else list(weight)
    return GramCombination(lambda gram: multislerp_coefficients(gram, weights, eps))


def multislerp_coefficients(gram: torch.Tensor, weights: list[float], eps: float) -> torch.Tensor:
    """The c with theta = sum_i c_i v_i (plus the base), from G[i, j] = v_i . v_j.

    c_i = (sum_k w_k n_k) * w_i / ((n_i + eps) |m|), |m|^2 = a^T G a with a_i = w_i / (n_i + eps).
    """
    count = len(weights)
    if count == 1:
        return torch.ones(1, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)  # m = sum_i a_i v_i
    mean_norm = math.sqrt(max(float(a @ gram @ a), 0.0))
    if mean_norm < eps:
        if float(norms.max()) == 0:
            return torch.zeros(count, dtype=torch.float64)
        if count == 2:
            return w
        raise InputError(
            "multislerp: the weighted mean of the models' directions is zero (opposite "
            "directions whose weights cancel); change the weights"
        )
    return float(w @ norms) * a / mean_norm
