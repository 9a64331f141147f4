"""Arcee Fusion: take the model's change only where it is unusually important.

With a = base, b = the model, per entry
    importance = |b - a| * KL(softmax(b) || softmax(a))
where the KL divergence (softmax over the last dimension, 1e-8 added to both distributions) is
one number per row (per tensor for 0-d and 1-d tensors). The threshold is the Tukey fence
    t = Q2 + 1.5 * (Q3 - Q1)
of the importances over the whole tensor, with Qj the order statistic at index
floor(j/4 * (n - 1)) (computed in float32, as mergekit does), and
    theta = a + (b - a) * [importance >= t].
One pass gathers the tensor's importances (one float per entry of this tensor, never the whole
model) to find the quantiles exactly; then each block is merged. The same float32 operations as
mergekit 0.1.5: bit-identical on tensors of at most 10^6 entries; on larger ones mergekit
estimates the quantiles from 10^6 random draws, and alloy keeps the exact ones.

There is no paper; mergekit's reference is https://arcee.ai
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alloy.merge.blocks import Block
from alloy.merge.registry import merge_method

QUARTILES = (0.25, 0.5, 0.75)


@merge_method(
    base="required",
    reference="https://arcee.ai",
    min_models=1,
    max_models=1,
    properties=("idempotent", "base_fixed_point"),
)
def arcee_fusion() -> Fusion:
    """Keep the model's entries whose importance |b - a| * KL(b || a) passes the Tukey fence."""
    return Fusion()


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|b - a| times the per-row KL(softmax(b) || softmax(a)), both smoothed by 1e-8."""
    eps = 1e-8
    p = torch.softmax(model, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fence(scores: torch.Tensor) -> torch.Tensor:
    """Q2 + 1.5 * (Q3 - Q1) of all `scores`, quantile j at index floor(float32(j) * (n - 1))."""
    flat = scores.reshape(-1)
    index = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long()
    q1, median, q3 = (flat.kthvalue(int(i) + 1).values for i in index)
    return median + 1.5 * (q3 - q1)


@dataclass
class Fusion:
    """One pass gathers the importances; `apply` masks each block against the fence."""

    _rowwise: bool = True
    _parts: list[torch.Tensor] = field(default_factory=list)
    _whole: torch.Tensor | None = None  # 0-d and 1-d tensors: importances of the whole tensor
    _threshold: torch.Tensor | None = None

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        self._rowwise = len(shape) >= 2
        self._parts, self._whole, self._threshold = [], None, None
        return 1

    def reduce(self, step: int, block: Block) -> None:
        assert block.base is not None
        if self._rowwise:
            self._parts.append(importance(block.models[0], block.base).reshape(-1))
        else:  # the softmax spans the whole vector: gather the inputs first
            self._parts.append(torch.stack([block.models[0], block.base]).reshape(2, -1))

    def end(self, step: int) -> None:
        gathered = torch.cat(self._parts, dim=-1)
        self._parts = []
        if not self._rowwise:
            gathered = importance(gathered[0], gathered[1])
            self._whole = gathered
        self._threshold = fence(gathered)

    def apply(self, block: Block) -> torch.Tensor:
        base, model = block.base, block.models[0]
        assert base is not None and self._threshold is not None
        if self._rowwise:
            scores = importance(model, base)
        else:
            assert self._whole is not None
            scores = self._whole[block.start : block.start + max(base.numel(), 1)]
            scores = scores.reshape(base.shape)
        return base + (model - base) * (scores >= self._threshold).to(base.dtype)
