"""Shared maths of the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

Every method of the family is: take task vectors tau_i = theta_i - theta_base, sparsify each one
(keep a fraction `density` by some rule, optionally rescale), weight them, optionally elect a sign
per entry and drop disagreeing entries, combine, optionally normalise by the weights, scale by
lambda and add back to the base:

    theta = base + lambda * sum_i(w_i * m_i * tau_i) / (normalize ? sum_i(w_i * m_i) : 1)

where m_i is 1 where tau_i survives sparsification and agrees with the elected sign (all ones
without election). The functions here are pure tensor maths shared by those method files.

Magnitude selection never sorts a whole tensor (that is where mergekit 0.1.5 spends most of its
TIES time): the k-th largest magnitude comes from `torch.kthvalue` (selection, linear time), and
entries equal to it are admitted lowest index first until exactly k are kept. mergekit picks among
equal magnitudes with torch's unstable sort, so its choice there is unspecified; ours is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from alloy.errors import InputError

Election = Literal["weighted_sum", "sum", "count"]
RescaleMode = Literal["l1", "density"]


def keep_count(numel: int, density: float) -> int:
    """How many entries a magnitude rule keeps: int(density * n), at least 1 when density > 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def _first_k_of(mask_eq: torch.Tensor, k: int) -> torch.Tensor:
    """The first `k` True entries of a flat bool tensor (lowest indices), as a bool tensor."""
    return mask_eq & (torch.cumsum(mask_eq, 0, dtype=torch.int64) <= k)


def smallest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of a flat tensor, ties resolved lowest index first.

    Equals the first k positions of a stable ascending sort, in linear time.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, k).values
    below = values < threshold
    return below | _first_k_of(values == threshold, k - int(below.sum()))


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a flat tensor, ties resolved lowest index first.

    Equals the first k positions of a stable descending sort, in linear time.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, n - k + 1).values
    above = values > threshold
    return above | _first_k_of(values == threshold, k - int(above.sum()))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries of largest magnitude (TIES trimming)."""
    magnitudes = delta.abs().reshape(-1)  # [n]
    return largest_mask(magnitudes, keep_count(delta.numel(), density)).reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest magnitudes and the smallest ones.

    With n entries, target = int(density * n) are kept: those ranked n_bot .. n_bot + target - 1
    in ascending magnitude, where n_bot = max(0, n - target - int(gamma * n)), so the outlier
    cut shrinks when needed to keep the target density (mergekit's rule).
    """
    n = delta.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    magnitudes = delta.abs().reshape(-1)  # [n]
    keep = smallest_mask(magnitudes, n_bottom + target) & ~smallest_mask(magnitudes, n_bottom)
    return keep.reshape(delta.shape)


def della_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA MagPrune: drop entries at random, less often the larger their magnitude.

    Entries are ranked by magnitude along dimension 1 (a 1-D tensor is one row; for 3-D tensors
    each [i, :, k] fibre is ranked separately, as mergekit does); rank r of n gets keep
    probability p = density - epsilon + 2 * epsilon * (r - 1) / (n - 1).
    """
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise InputError(
            f"della: density ± epsilon must lie in (0, 1), got density={density}, "
            f"epsilon={epsilon}; lower epsilon"
        )
    values = delta.reshape(1, -1) if delta.dim() < 2 else delta
    width = values.shape[1]
    # ranks[i, j, ...] = ascending magnitude rank of entry j along dimension 1, 0-based
    order = values.abs().argsort(dim=1, stable=True)
    positions = torch.arange(width).view(1, width, *([1] * (values.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order).contiguous())
    spread = ranks.to(values.dtype) / max(width - 1, 1)
    probs = (density - epsilon) + 2 * epsilon * spread
    return torch.bernoulli(probs, generator=generator).bool().reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=generator).bool()


def sparsified(
    delta: torch.Tensor, keep: torch.Tensor, *, rescale: bool, mode: RescaleMode, density: float
) -> torch.Tensor:
    """Zero the dropped entries; optionally rescale the survivors.

    mode "l1" (mergekit): scale so the L1 norm equals the original task vector's (skipped when
    either norm is below 1e-7). mode "density" (the DARE paper): divide by the keep probability.
    """
    masked = delta * keep
    if not rescale:
        return masked
    if mode == "density":
        return masked / density if density > 0 else masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def elect(weighted: torch.Tensor, election: Election) -> torch.Tensor:
    """TIES sign election: per entry, which models agree with the elected sign.

    Args:
        weighted: weighted, sparsified task vectors  # [N, *shape]
        election: "weighted_sum" elects the sign of the weighted sum (mergekit), "sum" that of
            the unweighted sum (the TIES paper, which has no weights; pass unweighted vectors),
            "count" the sign held by more models. A zero total elects +.

    Returns:
        bool mask  # [N, *shape]; zero entries never agree
    """
    signs = torch.sign(weighted)
    total = signs.sum(dim=0) if election == "count" else weighted.sum(dim=0)
    majority = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)  # [*shape]
    return signs == majority


def task_vectors(
    models: list[torch.Tensor],
    base: torch.Tensor,
    sparsify: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stack tau_i = models[i] - base, each passed through `sparsify(i, tau_i)` if given.

    Returns:
        task vectors  # [N, *shape]
    """
    deltas = base.new_empty((len(models), *base.shape))  # [N, *shape]
    for i, model in enumerate(models):
        torch.sub(model, base, out=deltas[i])
        if sparsify is not None:
            deltas[i] = sparsify(i, deltas[i])
    return deltas


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: list[float],
    *,
    election: Election | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """base + lambda * (weighted, optionally elected and normalised) sum of task vectors.

    Args:
        base: the base tensor  # [*shape]
        deltas: sparsified task vectors, modified in place  # [N, *shape]
        weights: one weight per model
        election: None, or an Election
        normalize: divide by the sum of weights (of the models that agree, with election)
        lambda_: final scale of the merged task vector
    """
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))  # [N, 1, ...]
    # The paper elects on the unweighted vectors; mergekit weights first.
    agree = elect(deltas, "sum") if election == "sum" else None
    deltas.mul_(w)
    if election is not None:
        if agree is None:
            agree = elect(deltas, election)
        merged = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return base + merged
