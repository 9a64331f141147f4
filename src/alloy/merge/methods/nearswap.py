"""NearSwap: take the model's value where it is near the base, keep the base where it is far.

With a = base, b = the model and d = |a - b| per entry:
    w     = clamp(t / max(d, 1e-6), 0, 1)
    theta = w * b + (1 - w) * a
Entries that differ by at most t take the model's value outright (w = 1); farther ones move
towards it by t / d, so no entry moves by more than t. Elementwise (no pass); the same floating
point operations as mergekit 0.1.5, so float32 results are bit-identical.

There is no paper; the method comes from alchemonaut's QuartetAnemoi merges (mergekit's
reference): https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

from typing import Annotated

import torch

from alloy.merge.blocks import Block, Elementwise
from alloy.merge.registry import merge_method
from alloy.ranges import NON_NEGATIVE


@merge_method(
    base="required",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_models=1,
    max_models=1,
    properties=("idempotent", "base_fixed_point"),
)
def nearswap(*, t: Annotated[float, NON_NEGATIVE]) -> Elementwise:
    """Swap in the model's entries within t of the base; move farther ones by at most t.

    Args:
        t: the distance within which the model's value is taken whole (0 keeps the base)
    """

    def merge_block(block: Block) -> torch.Tensor:
        base, model = block.base, block.models[0]
        assert base is not None
        weight = (t / (base - model).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * model + (1 - weight) * base

    return Elementwise(merge_block)
