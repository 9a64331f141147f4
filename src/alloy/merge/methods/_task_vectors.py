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
        self._cache: dict[int, torch.Tensor] = {}  # task vectors per block, between passes

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
            self._selects.append(RankSelect(ranks, dtype, n) if ranks else None)
        if any(select is not None for select in self._selects):
            self._selection_passes = radix_passes(dtype)
        rescale_pass = (
            self.rescale
            and self.rescale_mode == "l1"
            and any(self._active(i) for i in range(len(self.weights)))
        )
        return self._selection_passes + int(rescale_pass)

    def _prepared(self, block: Block, keep: bool) -> torch.Tensor:
        """The block's task vectors [N, r, *rest]; small tensors keep them between passes."""
        cached = self._cache.get(block.index)
        if cached is not None:
            return cached
        deltas = block.task_vectors()  # [N, r, *rest]
        if keep and self._numel * len(self.weights) <= CACHE_ELEMENTS:
            self._cache[block.index] = deltas
        return deltas

    def wants(self, step: int) -> bool:
        """Whether pass `step` is still needed (radix selection may finish a pass early)."""
        if 0 < step < self._selection_passes:
            return not all(s is None or s.finished_early for s in self._selects)
        return True

    def reduce(self, step: int, block: Block) -> None:
        if not self.wants(step):
            return
        deltas = self._prepared(block, keep=True)
        if step < self._selection_passes:
            for delta, select in zip(deltas, self._selects, strict=True):
                if select is not None:
                    select.reduce(step, delta, signed=True)
            return
        kept = deltas.clone()
        self._sparsify(block, kept, "rescale")
        for i in range(len(self.weights)):
            self._l1[i][0] += float(deltas[i].abs().sum(dtype=torch.float64))
            self._l1[i][1] += float(kept[i].abs().sum(dtype=torch.float64))

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

    def _sparsify(self, block: Block, deltas: torch.Tensor, stage: str) -> None:
        """Zero, in place, the entries of each task vector that its rule drops on this block."""
        generator = block.generator() if self.rule in ("random", "della") else None
        quotas = self._tie_quotas(stage) if self._selection_passes else []
        for i, delta in enumerate(deltas):
            d = self.density[i]
            if not self._active(i):
                continue
            if self.rule == "random":
                probs = torch.full_like(delta, max(d, 0.0))
                delta.mul_(torch.bernoulli(probs, generator=generator))
            elif self.rule == "della" and d > 0:
                probs = della_probabilities(delta, d, self.epsilon[i])
                delta.mul_(torch.bernoulli(probs, generator=generator))
            elif d <= 0:
                delta.zero_()
            else:
                self._cut(i, delta, quotas[i] if quotas else [])

    def _cut(self, i: int, delta: torch.Tensor, quotas: list[TieQuota]) -> None:
        """Apply model i's ranked cuts in place: top(k) for TIES, bottom(high) - bottom(low)
        for breadcrumbs."""
        cuts, select = self._cuts[i], self._selects[i]
        if len(cuts) == 1 and 0 < cuts[0][1] < self._numel:
            # TIES: keep |delta| above the threshold (hardshrink is the fast kernel for that),
            # or at least at it when every tie is admitted; count ties only when some are.
            assert select is not None
            threshold, quota = select.threshold[0], quotas[0]
            if quota.admits_all or quota.left <= 0:
                below = torch.nextafter(threshold, torch.zeros_like(threshold))
                bound = below if quota.admits_all else threshold
                delta.copy_(torch.nn.functional.hardshrink(delta, float(bound)))
                return
        magnitudes = delta.abs()
        keep = torch.ones_like(magnitudes, dtype=torch.bool)
        j = 0
        for side, (kind, m) in enumerate(cuts):
            if m <= 0 or m >= self._numel:
                cut = torch.full_like(keep, m > 0)
            else:
                assert select is not None
                threshold = select.threshold[j]
                strict = magnitudes > threshold if kind == "top" else magnitudes < threshold
                cut = strict | quotas[j].take(magnitudes == threshold)
                j += 1
            keep &= cut if side == 0 else ~cut
        delta.mul_(keep)

    # -- merging a block -------------------------------------------------------------------------

    def apply(self, block: Block) -> torch.Tensor:
        base = block.base
        assert base is not None
        deltas = self._prepared(block, keep=False)
        self._cache.pop(block.index, None)
        self._sparsify(block, deltas, "apply")
        for i in range(len(self.weights)):
            scale = 1.0
            if self._active(i) and self.rescale and self.rescale_mode == "l1":
                scale = self._scale[i]
            elif self._active(i) and self.rescale and self.density[i] > 0:
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


def majority_sign(deltas: torch.Tensor, election: Election) -> torch.Tensor:
    """TIES sign election: +1 or -1 per entry.

    Args:
        deltas: sparsified task vectors, weighted for "weighted_sum" and "count" (mergekit
            elects on weighted vectors), unweighted for "sum" (the paper)  # [N, *shape]
        election: "weighted_sum" and "sum" elect the sign of the sum, "count" the sign held by
            more models. A zero total elects + (an exact cancellation sums to +0.0; a total of
            -0.0 only arises when every entry is zero, and zeros never agree anyway).
    """
    total = torch.sign(deltas[0]) if election == "count" else deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(torch.sign(delta) if election == "count" else delta)
    return torch.ones_like(total).copysign_(total)  # [*shape]


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

    With election, model i agrees at an entry when its task vector is non-zero with the elected
    sign s; relu(s * tau_i) is |tau_i| there and 0 elsewhere, so the agreeing sum and the
    agreeing weight are built from relu and sign alone (no boolean masks: on CPU, masked
    selects cost several times a multiply).

    Args:
        base: the base tensor  # [*shape]
        deltas: sparsified task vectors, modified in place  # [N, *shape]
        weights: one weight per model
        election: None, or an Election
        normalize: divide by the sum of weights (of the models that agree, with election)
        lambda_: final scale of the merged task vector
    """
    if election is None:
        merged = deltas[0] * weights[0]
        for delta, w in zip(deltas[1:], weights[1:], strict=True):
            merged.add_(delta, alpha=w)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged /= total
    else:
        # The paper elects on the unweighted vectors; mergekit weights first.
        weighted_first = election != "sum"
        if weighted_first:
            for delta, w in zip(deltas, weights, strict=True):
                if w != 1:
                    delta.mul_(w)
        sign = majority_sign(deltas, election)
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for delta, w in zip(deltas, weights, strict=True):
            agreeing = delta.mul_(sign).relu_()  # |tau_i| where model i agrees, else 0
            if divisor is not None:
                divisor.add_(torch.sign(agreeing), alpha=w)
            merged.add_(agreeing, alpha=1 if weighted_first else w)
        merged.mul_(sign)
        if divisor is not None:
            if min(weights) > 0:
                # Agreeing entries have divisor >= min weight; elsewhere merged is 0 anyway.
                divisor.clamp_(min=min(weights))
            else:
                divisor[divisor == 0] = 1
            merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return merged.add_(base)
