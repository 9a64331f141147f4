"""Shared maths of the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

Every method of the family is: take task vectors tau_i = theta_i - theta_base, sparsify each one
(keep a fraction `density` by some rule, optionally rescale), weight them, optionally elect a sign
per entry and drop disagreeing entries, combine, optionally normalise by the weights, scale by
lambda and add back to the base:

    theta = base + lambda * sum_i(w_i * m_i * tau_i) / (normalize ? sum_i(w_i * m_i) : 1)

where m_i is 1 where tau_i survives sparsification and agrees with the elected sign (all ones
without election). `TaskVectorMerge` runs this over row blocks (see alloy.merge.blocks): rules
that rank magnitudes over the whole tensor (TIES, breadcrumbs) first make radix-selection passes
(see _ranks.py; nothing is sorted), an L1 rescale makes one more pass, then each block is merged.

mergekit picks among exactly equal magnitudes with torch's unstable sort, so its choice there is
unspecified; ours keeps the lowest indices. Everything else matches mergekit 0.1.5 bit for bit
on float32 inputs (random rules: given the same generator stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from alloy.errors import InputError
from alloy.merge.blocks import Block
from alloy.merge.methods._ranks import RankSelect, TieQuota, radix_passes

# Tensors up to this many elements (times the number of models) keep their task vectors and
# magnitudes between passes instead of recomputing them.
CACHE_ELEMENTS = 1 << 23

Election = Literal["weighted_sum", "sum", "count"]
RescaleMode = Literal["l1", "density"]
Rule = Literal["none", "magnitude", "outliers", "random", "della"]


def keep_count(numel: int, density: float) -> int:
    """How many entries a magnitude rule keeps: int(density * n), at least 1 when density > 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def outlier_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs: the ascending-magnitude ranks [low, high) that are kept.

    target = int(density * n) entries are kept: ranks n_bot .. n_bot + target - 1 where
    n_bot = max(0, n - target - int(gamma * n)), so the outlier cut (the top gamma fraction)
    shrinks when needed to keep the target density (mergekit's rule).
    """
    target = int(density * numel)
    low = max(0, numel - target - int(gamma * numel))
    return low, low + target


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: density ± epsilon spread by magnitude rank.

    Entries are ranked by magnitude along dimension 1 (a 1-D tensor is one row; for 3-D tensors
    each [i, :, k] fibre is ranked separately, as mergekit does); rank r of n gets keep
    probability p = density - epsilon + 2 * epsilon * (r - 1) / (n - 1).
    """
    values = delta.reshape(1, -1) if delta.dim() < 2 else delta
    width = values.shape[1]
    # ranks[i, j, ...] = ascending magnitude rank of entry j along dimension 1, 0-based
    order = values.abs().argsort(dim=1, stable=True)
    positions = torch.arange(width, device=delta.device).view(1, width, *([1] * (values.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order).contiguous())
    spread = ranks.to(values.dtype) / max(width - 1, 1)
    return ((density - epsilon) + 2 * epsilon * spread).reshape(delta.shape)


@dataclass
class TaskVectorMerge:
    """The task-vector family as a blockwise Merger (alloy.merge.blocks).

    Args:
        weights: one weight per model
        rule: how each task vector is sparsified ("none", "magnitude" top-k, "outliers" rank
            window, "random" Bernoulli(density), "della" rank-dependent Bernoulli)
        density, gamma, epsilon: per-model parameters of the rule
        rescale, rescale_mode: "l1" scales each sparsified vector back to its L1 norm (mergekit),
            "density" divides by the density (the DARE paper)
        election: None, or how signs are elected ("weighted_sum" mergekit, "sum" the paper)
        normalize: divide by the summed weights (of the agreeing models, with election)
        lambda_: scale of the merged task vector
    """

    weights: list[float]
    rule: Rule = "none"
    density: list[float] = field(default_factory=list)
    gamma: list[float] = field(default_factory=list)
    epsilon: list[float] = field(default_factory=list)
    rescale: bool = False
    rescale_mode: RescaleMode = "l1"
    election: Election | None = None
    normalize: bool = False
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.weights)
        self.density = self.density or [1.0] * n
        if self.rule == "della":
            for d, e in zip(self.density, self.epsilon, strict=True):
                if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                    raise InputError(
                        f"della: density ± epsilon must lie in (0, 1), got density={d}, "
                        f"epsilon={e}; lower epsilon"
                    )
        self._cuts: list[list[tuple[str, int]]] = []  # per model: ("top"|"bottom", count)
        self._selects: list[RankSelect | None] = []
        self._selection_passes = 0
        self._l1 = [[0.0, 0.0] for _ in range(n)]  # per model: |tau| and |sparsified tau| sums
        self._scale = [1.0] * n
        self._numel = 0
        self._quotas: dict[str, list[list[TieQuota]]] = {}
        self._cache: dict[int, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}

    def _active(self, i: int) -> bool:
        """Whether model i's task vector is sparsified at all (mergekit: density >= 1 is not)."""
        return self.rule != "none" and self.density[i] < 1

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Plan the passes for a tensor of `shape` computed in `dtype`; returns their number."""
        n = 1
        for size in shape:
            n *= size
        self._numel = n
        for i in range(len(self.weights)):
            cuts: list[tuple[str, int]] = []
            if self._active(i) and self.rule == "magnitude":
                cuts = [("top", keep_count(n, self.density[i]))]
            elif self._active(i) and self.rule == "outliers":
                low, high = outlier_window(n, self.density[i], self.gamma[i])
                cuts = [("bottom", min(high, n)), ("bottom", min(low, n))]
            self._cuts.append(cuts)
            # a cut of 0 or n entries needs no selection
            ranks = [m if kind == "top" else n - m + 1 for kind, m in cuts if 0 < m < n]
            self._selects.append(RankSelect(ranks, dtype) if ranks else None)
        if any(select is not None for select in self._selects):
            self._selection_passes = radix_passes(dtype)
        rescale_pass = (
            self.rescale
            and self.rescale_mode == "l1"
            and any(self._active(i) for i in range(len(self.weights)))
        )
        return self._selection_passes + int(rescale_pass)

    def _prepared(self, block: Block, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The block's task vectors [N, r, *rest] and, for ranked models, their magnitudes.

        Small tensors keep them between passes (`keep`), so each is computed once per block.
        """
        cached = self._cache.get(block.index)
        if cached is not None:
            return cached
        base = block.base
        assert base is not None
        deltas = base.new_empty((len(block.models), *base.shape))  # [N, r, *rest]
        for i, model in enumerate(block.models):
            torch.sub(model, base, out=deltas[i])
        magnitudes = [
            delta.abs() if select is not None else None
            for delta, select in zip(deltas, self._selects, strict=True)
        ]
        if keep and self._numel * len(self.weights) <= CACHE_ELEMENTS:
            self._cache[block.index] = (deltas, magnitudes)
        return deltas, magnitudes

    def reduce(self, step: int, block: Block) -> None:
        deltas, magnitudes = self._prepared(block, keep=True)
        if step < self._selection_passes:
            for values, select in zip(magnitudes, self._selects, strict=True):
                if select is not None:
                    assert values is not None
                    select.reduce(step, values)
            return
        masks = self._masks(block, deltas, magnitudes, "rescale")
        for i, delta in enumerate(deltas):
            self._l1[i][0] += float(delta.abs().sum(dtype=torch.float64))
            mask = masks[i]
            kept = delta if mask is None else delta * mask
            self._l1[i][1] += float(kept.abs().sum(dtype=torch.float64))

    def end(self, step: int) -> None:
        if step < self._selection_passes:
            for select in self._selects:
                if select is not None:
                    select.end(step)
            return
        for i, (before, after) in enumerate(self._l1):
            if self._active(i) and before >= 1e-7 and after >= 1e-7:
                self._scale[i] = before / after

    def _tie_quotas(self, stage: str) -> list[list[TieQuota]]:
        """Per model and cut, a fresh quota of threshold ties (each pass counts from zero)."""
        if stage not in self._quotas:
            quotas = []
            for cuts, select in zip(self._cuts, self._selects, strict=True):
                entry = []
                j = 0
                for kind, m in cuts:
                    if not 0 < m < self._numel:
                        continue
                    assert select is not None
                    greater, equal = select.greater[j], select.equal[j]
                    below = self._numel - greater - equal
                    quota = m - greater if kind == "top" else m - below
                    entry.append(TieQuota(quota, admits_all=quota >= equal))
                    j += 1
                quotas.append(entry)
            self._quotas[stage] = quotas
        return self._quotas[stage]

    def _masks(
        self,
        block: Block,
        deltas: torch.Tensor,
        magnitudes: list[torch.Tensor | None],
        stage: str,
    ) -> list[torch.Tensor | None]:
        """Each model's keep mask on this block (None: keep everything)."""
        generator = block.generator() if self.rule in ("random", "della") else None
        quotas = self._tie_quotas(stage) if self._selection_passes else []
        masks: list[torch.Tensor | None] = []
        for i, delta in enumerate(deltas):
            d = self.density[i]
            if not self._active(i):
                masks.append(None)
            elif self.rule == "random":
                probs = torch.full_like(delta, max(d, 0.0))
                masks.append(torch.bernoulli(probs, generator=generator).bool())
            elif self.rule == "della" and d > 0:
                probs = della_probabilities(delta, d, self.epsilon[i])
                masks.append(torch.bernoulli(probs, generator=generator).bool())
            elif self.rule == "della":
                masks.append(torch.zeros_like(delta, dtype=torch.bool))
            else:
                values = magnitudes[i]
                values = delta.abs() if values is None else values
                masks.append(self._cut_mask(i, values, quotas[i] if quotas else []))
        return masks

    def _cut_mask(self, i: int, magnitudes: torch.Tensor, quotas: list[TieQuota]) -> torch.Tensor:
        """Model i's ranked cuts on this block: top(k) for TIES, bottom(high) - bottom(low)."""
        select = self._selects[i]
        masks = []
        j = 0
        for kind, m in self._cuts[i]:
            if m <= 0 or m >= self._numel:
                masks.append(torch.full_like(magnitudes, m > 0, dtype=torch.bool))
                continue
            assert select is not None
            threshold = select.threshold[j]
            quota = quotas[j]
            if quota.admits_all:  # every entry equal to the threshold is kept
                masks.append(magnitudes >= threshold if kind == "top" else magnitudes <= threshold)
            elif quota.left <= 0:
                masks.append(magnitudes > threshold if kind == "top" else magnitudes < threshold)
            else:
                strict = magnitudes > threshold if kind == "top" else magnitudes < threshold
                masks.append(strict | quota.take(magnitudes == threshold))
            j += 1
        if len(masks) == 1:
            return masks[0]
        below_high, below_low = masks
        return below_high & ~below_low

    # -- merging a block -------------------------------------------------------------------------

    def apply(self, block: Block) -> torch.Tensor:
        base = block.base
        assert base is not None
        deltas, magnitudes = self._prepared(block, keep=False)
        self._cache.pop(block.index, None)
        masks = self._masks(block, deltas, magnitudes, "apply")
        for i, mask in enumerate(masks):
            if mask is None:
                continue
            deltas[i].mul_(mask)
            scale = 1.0
            if self.rescale and self.rescale_mode == "l1":
                scale = self._scale[i]
            elif self.rescale and self.density[i] > 0:
                scale = 1 / self.density[i]
            if scale != 1.0:
                deltas[i].mul_(scale)
        return combine(
            base,
            deltas,
            self.weights,
            election=self.election,
            normalize=self.normalize,
            lambda_=self.lambda_,
        )


def elect(deltas: torch.Tensor, election: Election) -> torch.Tensor:
    """TIES sign election: per entry, which models agree with the elected sign.

    Args:
        deltas: sparsified task vectors, weighted for "weighted_sum" and "count" (mergekit
            elects on weighted vectors), unweighted for "sum" (the paper)  # [N, *shape]
        election: "weighted_sum" and "sum" elect the sign of the sum, "count" the sign held by
            more models. A zero total elects +.

    Returns:
        bool mask  # [N, *shape]; zero entries never agree
    """
    if election == "count":
        total = torch.zeros_like(deltas[0])
        for delta in deltas:
            total.add_(torch.sign(delta))
    else:
        total = deltas.sum(dim=0)  # [*shape]
    majority = torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)  # [*shape], +1 or -1
    del total
    agree = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    for i, delta in enumerate(deltas):
        # same sign as the majority, and not zero
        torch.gt(delta * majority, 0, out=agree[i])
    return agree


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
    # The paper elects on the unweighted vectors; mergekit weights first.
    agree = elect(deltas, "sum") if election == "sum" else None
    for delta, w in zip(deltas, weights, strict=True):
        if w != 1:
            delta.mul_(w)
    if election is None:
        merged = deltas.sum(dim=0)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged /= total
    else:
        if agree is None:
            agree = elect(deltas, election)
        deltas.mul_(agree)
        merged = deltas.sum(dim=0)
        if normalize:
            merged /= _agreeing_weight(agree, weights, base)
    if lambda_ != 1:
        merged *= lambda_
    return merged.add_(base)


def _agreeing_weight(agree: torch.Tensor, weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per entry, the summed weight of the models that agree (1 where none does)."""
    if len(set(weights)) == 1 and weights[0] > 0:
        # One positive weight w: w * (number agreeing); where none agrees the numerator is 0,
        # so any positive divisor (here w) gives the right 0.
        count = agree.sum(dim=0, dtype=like.dtype).clamp_(min=1)
        return count if weights[0] == 1 else count.mul_(weights[0])
    divisor = torch.zeros_like(like)
    for mask, w in zip(agree, weights, strict=True):
        divisor += mask * w
    return divisor.masked_fill_(divisor == 0, 1)
