"""RAM (Reinforced Agent Merging): sum the entries one model changed, average the shared ones.

With task vectors tau_i = theta_i - theta_base, an entry counts for model i when
|tau_i| > epsilon (m_i = 1), and c = sum_i m_i models change it:
    theta = base + sum_i m_i tau_i * (1 if c == 1 else 1 / c)
An entry only one model changed keeps that change whole (a plain average would dilute it by N);
entries several models changed get the mean of their changes; entries nobody changed stay at the
base. Elementwise, no pass. See ramplus_tl.py for the variant that amplifies unique changes.

"Reinforced Agent Merging" (mergekit 0.1.5's reference for ram and ramplus_tl),
https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

from typing import Annotated

import torch

from alloy.merge.blocks import Block, Elementwise
from alloy.merge.registry import merge_method
from alloy.ranges import NON_NEGATIVE


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2601.13572",
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def ram(*, epsilon: Annotated[float, NON_NEGATIVE] = 1e-5) -> Elementwise:
    """Keep changes made by one model whole, average changes made by several.

    Args:
        epsilon: a task-vector entry counts as changed when its magnitude exceeds this
    """

    def merge_block(block: Block) -> torch.Tensor:
        assert block.base is not None
        deltas, changed = changes(block, epsilon)
        return block.base + ram_sum(deltas, changed)

    return Elementwise(merge_block)


def changes(block: Block, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's task vectors, and where each counts as changed (|tau_i| > epsilon)."""
    deltas = block.task_vectors()  # [N, r, *rest]
    return deltas, deltas.abs() > epsilon  # [N, r, *rest] twice


def ram_sum(
    deltas: torch.Tensor, changed: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i m_i tau_i * (scale_i where one model changed the entry, 1 / c where several did).

    Args:
        deltas: task vectors  # [N, *shape]
        changed: m_i, where each task vector counts as changed  # [N, *shape] bool
        scales: per model, the factor of its unique changes (None: 1, RAM; lambda_i, RAM+)  # [N]
    """
    counts = changed.sum(dim=0, keepdim=True)  # [1, *shape]
    unique, shared = counts == 1, counts > 1
    kept = deltas * changed
    alone = kept * unique
    if scales is not None:
        alone = alone * scales.to(deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    return (alone + kept * shared / counts.clamp(min=1)).sum(dim=0)
