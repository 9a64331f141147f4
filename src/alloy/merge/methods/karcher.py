"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere.

Each tensor is one vector. With norms n_i = |theta_i|, directions u_i = theta_i / n_i of the
models with n_i > tol and equal weights a_i (1/N, renormalised over those models), the mean
direction mu starts at the normalised sum_i a_i u_i (u of the first such model if that is
shorter than tol) and takes at most max_iter Riemannian gradient steps:
    theta_i = acos(clamp(mu . u_i, -1, 1))                       (terms with theta_i < tol: 0)
    g       = sum_i a_i theta_i / sin(theta_i) (u_i - (mu . u_i) mu)   (the log maps' mean)
    mu      = cos(|g|) mu + sin(|g|) g / |g|,  renormalised           (stop once |g| < tol)
    theta   = (sum_i n_i / N) mu
so the direction minimises the summed squared geodesic distances and the norm is the mean norm.
Every iterate lies in the span of the u_i, so alloy iterates on N coefficients with the Gram
matrix of the models (one pass, float64, see _gram.py) instead of on whole tensors as mergekit
0.1.5 does (float32); the results agree up to float rounding. The base, if any, is not used.

Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977;
mergekit's reference for the merge method: https://arxiv.org/abs/2603.04972
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from alloy.merge.methods._gram import GramCombination
from alloy.merge.registry import merge_method
from alloy.ranges import POSITIVE, Range


@merge_method(
    base="none",
    reference="https://arxiv.org/abs/2603.04972",
    properties=("idempotent", "order_invariant"),
)
def karcher(
    *, max_iter: Annotated[int, Range(1)] = 10, tol: Annotated[float, POSITIVE] = 1e-5
) -> GramCombination:
    """The spherical (Karcher) mean of the models' directions, scaled to their mean norm.

    Args:
        max_iter: the most gradient steps on the sphere
        tol: norms, angles and steps below this count as zero
    """
    return GramCombination(lambda gram: karcher_coefficients(gram, max_iter, tol))


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The c with theta = sum_i c_i theta_i, from G[i, j] = theta_i . theta_j (float64)."""
    count = gram.shape[0]
    if count == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()  # [N]
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(count, dtype=torch.float64)
    inverse = torch.where(valid, 1 / torch.where(valid, norms, 1), 0)
    units = gram * inverse[:, None] * inverse[None, :]  # U[i, j] = u_i . u_j; 0 off the valid
    weights = valid.double() / float(valid.sum())  # a_i
    first = int(valid.nonzero()[0])

    def norm(b: torch.Tensor) -> float:
        return math.sqrt(max(float(b @ units @ b), 0.0))

    mean = weights.clone()  # mu = sum_i mean_i u_i
    if norm(mean) < tol:
        mean = torch.zeros(count, dtype=torch.float64)
        mean[first] = 1
    else:
        mean = mean / norm(mean)
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)  # mu . u_i
        angles = torch.acos(dots)
        step = valid & (angles >= tol)
        factor = torch.where(step, weights * angles / torch.sin(torch.where(step, angles, 1)), 0)
        # g = sum_i factor_i (u_i - dots_i mu): coefficients factor on the u_i, less on mu
        tangent = factor - float(factor @ dots) * mean
        length = norm(tangent)
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        if norm(mean) > tol:
            mean = mean / norm(mean)
    return float(norms.sum()) / count * mean * inverse
