"""SCE: select the entries where the models disagree most, weight each model by its energy,
erase the entries against the elected sign.

With task vectors tau_i = theta_i - theta_base (N models, n entries per tensor):
    1. select: v = Var_i(tau_i) per entry (population variance over the models); with
       select_topk < 1, keep the k = int(topk * count(v != 0)) entries of largest v in every
       tau_i (ties: lowest index first) and zero the rest
    2. calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) over the tensor (1 / N when the sum
       is below 1e-6)
    3. erase: per entry, elect the sign of sum_i tau_i; m_i = sign(tau_i) == elected (a zero
       entry never agrees)
    theta = base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)
The variance count, the k-th largest variance (radix selection, _ranks.py) and the energies each
need the whole tensor: 1 + 2 + 1 passes over the row blocks with select_topk < 1 (float32),
1 without. The same float32 operations as mergekit 0.1.5, so results are bit-identical, except
two documented cases: among exactly equal variances at the cut mergekit's torch.topk picks in an
unspecified order, and on tensors of more than one row block (over 2^20 entries) the energies
are summed blockwise in float64, so w_i can differ from mergekit's in the last float32 bit.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, https://arxiv.org/abs/2408.07990
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch

from alloy.merge.blocks import Block
from alloy.merge.methods._ranks import RankSelect, TieQuota, radix_passes
from alloy.merge.registry import merge_method
from alloy.ranges import UNIT


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2408.07990",
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def sce(
    *,
    select_topk: Annotated[float, UNIT] = 1.0,
    int8_mask: bool = False,
) -> Sce:
    """Top-variance selection, energy weights, sign-consensus erase of task vectors.

    Args:
        select_topk: the fraction of the entries with nonzero variance across the models that
            is kept (1 keeps every entry; 0 keeps none, giving the base)
        int8_mask: accepted for mergekit compatibility (a memory option there); no effect
    """
    return Sce(select_topk)


def variance(deltas: torch.Tensor) -> torch.Tensor:
    """Per entry, the population variance of the task vectors over the models: [r, *rest]."""
    return torch.var(deltas, dim=0, unbiased=False)


@dataclass
class Sce:
    """Passes: count the nonzero variances, select the k-th largest (radix), sum the energies
    of the selected task vectors; then merge each block."""

    topk: float
    _shape: tuple[int, ...] = ()
    _numel: int = 0
    _nonzero: int = 0
    _keep: int = 0
    _select: RankSelect | None = None
    _radix: int = 0
    _dtype: torch.dtype = torch.float32
    _energy_sums: list[float] = field(default_factory=list)
    _energies: torch.Tensor | None = None  # [N], float32
    _quota: TieQuota | None = None

    @property
    def _selecting(self) -> bool:
        return 0 < self.topk < 1

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        self._shape, self._numel, self._dtype = shape, math.prod(shape), dtype
        self._nonzero, self._keep, self._select = 0, 0, None
        self._energy_sums, self._energies = [], None
        self._radix = radix_passes(dtype) if self._selecting else 0
        # count pass + radix passes (selection), then the energy pass
        return (1 + self._radix if self._selecting else 0) + 1

    def wants(self, step: int) -> bool:
        if self._selecting and 1 <= step <= self._radix:
            return self._select is not None and not (step > 1 and self._select.finished_early)
        return True

    def reduce(self, step: int, block: Block) -> None:
        if not self.wants(step):
            return
        deltas = block.task_vectors()
        if self._selecting and step == 0:
            self._nonzero += int(torch.count_nonzero(variance(deltas)))
        elif self._selecting and step <= self._radix:
            assert self._select is not None
            self._select.reduce(step - 1, variance(deltas))
        else:
            self._add_energies(block, self._selected(deltas))

    def end(self, step: int) -> None:
        if self._selecting and step == 0:
            self._keep = int(self._nonzero * self.topk)
            if 0 < self._keep < self._numel:
                self._select = RankSelect([self._keep], self._dtype, self._numel)
        elif self._selecting and step <= self._radix:
            if self._select is not None and not (step > 1 and self._select.finished_early):
                self._select.end(step - 1)
        elif self._energies is None:
            # several blocks: mean of tau_i^2 from float64 sums
            self._energies = (
                torch.tensor(self._energy_sums, dtype=torch.float64) / self._numel
            ).to(torch.float32)
        self._quota = None

    def _add_energies(self, block: Block, deltas: torch.Tensor) -> None:
        rows = self._shape[0] if self._shape else 1
        if block.start == 0 and (not self._shape or block.models[0].shape[0] == rows):
            # one block holds the tensor: mergekit's expression exactly
            self._energies = deltas.square().reshape(len(deltas), -1).mean(dim=1)
            return
        sums = deltas.square().reshape(len(deltas), -1).sum(dim=1, dtype=torch.float64)
        if not self._energy_sums:
            self._energy_sums = [0.0] * len(deltas)
        self._energy_sums = [a + float(b) for a, b in zip(self._energy_sums, sums, strict=True)]

    def _selected(self, deltas: torch.Tensor) -> torch.Tensor:
        """The task vectors with unselected entries zeroed (multiplied by 0, as mergekit)."""
        if not self._selecting:
            return deltas
        if self._keep <= 0:
            mask = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
        elif self._keep >= self._numel:
            mask = torch.ones(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
        else:
            assert self._select is not None
            threshold = self._select.threshold[0].to(deltas.device)
            if self._quota is None:  # each pass admits ties afresh, in block order
                self._quota = TieQuota(self._keep - self._select.greater[0])
            v = variance(deltas)
            mask = ((v > threshold) | self._quota.take(v == threshold)).to(deltas.dtype)
        return deltas * mask.unsqueeze(0)

    def apply(self, block: Block) -> torch.Tensor:
        assert block.base is not None and self._energies is not None
        deltas = self._selected(block.task_vectors())
        weights = energy_weights(self._energies).to(deltas.device)
        weights = weights.view(-1, *([1] * (deltas.dim() - 1)))  # [N, 1, ...]
        # erase: the sign elected by the plain sum (TIES's "sum" election)
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        erased = weights * (deltas.sign() == elected)
        merged = (deltas * erased).sum(dim=0)
        return block.base + merged / erased.sum(dim=0).clamp(min=1e-6)


def energy_weights(energies: torch.Tensor) -> torch.Tensor:
    """w_i = e_i / sum_j e_j; uniform when the sum is below 1e-6 (mergekit's rule)."""
    total = torch.sum(energies).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energies) / energies.shape[0]
    return energies / total
