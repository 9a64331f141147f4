"""RAM+ (tensor-local): RAM with each model's unique changes amplified by its overlap ratio.

As RAM (ram.py): task vectors tau_i = theta_i - theta_base, m_i = |tau_i| > epsilon, c = sum_i
m_i. Per tensor and model, with S_i the entries model i shares with others (m_i and c > 1) and
U_i those it changes alone (m_i and c == 1):
    rho_i    = |S_i| / max(|U_i|, epsilon)
    lambda_i = 1 + r * clamp(rho_i, 0, alpha)
    theta    = base + sum_i m_i tau_i * (lambda_i if c == 1 else 1 / c)
A model whose changes mostly overlap others' loses more to averaging, so its few unique changes
are scaled up, by at most 1 + r * alpha. The counts need the whole tensor: one reduction pass.
"Tensor-local" (mergekit's name) means rho is counted per tensor, not over the whole model as in
the paper. rho and lambda are computed in float32 as mergekit 0.1.5 does.

"Reinforced Agent Merging" (mergekit 0.1.5's reference for ram and ramplus_tl),
https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from alloy.merge.blocks import Block
from alloy.merge.methods.ram import changes, ram_sum
from alloy.merge.registry import merge_method
from alloy.ranges import NON_NEGATIVE, POSITIVE


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2601.13572",
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def ramplus_tl(
    *,
    r: Annotated[float, NON_NEGATIVE] = 0.1,
    alpha: Annotated[float, NON_NEGATIVE] = 0.2,
    epsilon: Annotated[float, POSITIVE] = 1e-5,
) -> RamPlus:
    """RAM with unique changes scaled by 1 + r * clamp(shared / unique, 0, alpha) per model.

    Args:
        r: how strongly the overlap ratio amplifies a model's unique changes
        alpha: the cap on the overlap ratio
        epsilon: a task-vector entry counts as changed when its magnitude exceeds this
    """
    return RamPlus(r, alpha, epsilon)


def amplification(
    shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """lambda_i = 1 + r * clamp(|S_i| / max(|U_i|, epsilon), 0, alpha), in float32.

    Args:
        shared, unique: per model, the entries it changes with others / alone  # [N] int64
    """
    rho = shared.float() / unique.float().clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)  # [N]


@dataclass
class RamPlus:
    """One pass counts each model's shared and unique changes; then each block is RAM's sum
    with the unique changes scaled."""

    r: float
    alpha: float
    epsilon: float
    counts: list[torch.Tensor] = field(default_factory=list)  # shared, unique: [N] each
    scales: torch.Tensor | None = None

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return 1

    def reduce(self, step: int, block: Block) -> None:
        _, changed = changes(block, self.epsilon)
        flat = changed.reshape(len(changed), -1)  # [N, n]
        count = flat.sum(dim=0)  # [n]
        parts = [(flat & (count > 1)).sum(dim=1), (flat & (count == 1)).sum(dim=1)]
        self.counts = (
            parts if not self.counts else [a + b for a, b in zip(self.counts, parts, strict=True)]
        )

    def end(self, step: int) -> None:
        shared, unique = self.counts
        self.scales = amplification(shared, unique, self.r, self.alpha, self.epsilon)

    def apply(self, block: Block) -> torch.Tensor:
        assert block.base is not None and self.scales is not None
        deltas, changed = changes(block, self.epsilon)
        return block.base + ram_sum(deltas, changed, self.scales)
