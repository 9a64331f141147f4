"""Model Stock: move from the base towards the average of the models by their agreement.

With task vectors tau_i = theta_i - theta_base (N >= 2 models) and cos the mean pairwise cosine
similarity of the tau_i (over pairs i < j, norm products clamped at 1e-6):
    t     = N cos / (1 + (N - 1) cos)     (0 where |1 + (N - 1) cos| < 1e-6: keep the base)
    theta = t * mean_i(theta_i) + (1 - t) * base
`filter_wise` computes t separately for each vector along the last dimension (each row of a
matrix; a 1-D tensor is one row) instead of once for the whole tensor.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alloy.merge.blocks import Block
from alloy.merge.registry import merge_method


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2403.19522",
    min_models=2,
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def model_stock(*, filter_wise: bool = False) -> ModelStock:
    """Interpolate between the base and the models' mean by the task vectors' mean cosine.

    Args:
        filter_wise: one interpolation factor per row (along the last dimension) instead of one
            per tensor
    """
    return ModelStock(filter_wise)


def interpolation_factor(cos: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos); 0 (keep the base) where the denominator vanishes."""
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))


def mean_cosine(dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine from Gram entries: dots[i, j] = tau_i . tau_j, norms[i] = |tau_i|."""
    count = norms.shape[0]
    cosines = [
        (dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    return torch.stack(cosines).mean(dim=0)


@dataclass
class ModelStock:
    """Per tensor (one pass collects the Gram matrix of the task vectors in float64), or per row
    along the last dimension (filter_wise: computed inside each block, no pass)."""

    filter_wise: bool
    gram: torch.Tensor | None = None  # [N, N]
    t: torch.Tensor | None = None
    rowwise: bool = field(default=False)

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        self.rowwise = self.filter_wise and len(shape) >= 2
        return 0 if self.rowwise else 1

    def reduce(self, step: int, block: Block) -> None:
        assert block.base is not None
        deltas = torch.stack([(m - block.base).reshape(-1) for m in block.models]).double()
        gram = deltas @ deltas.T  # [N, N]
        self.gram = gram if self.gram is None else self.gram + gram

    def end(self, step: int) -> None:
        assert self.gram is not None
        norms = self.gram.diagonal().sqrt()
        cos = mean_cosine(self.gram, norms)
        self.t = interpolation_factor(cos, len(norms))

    def apply(self, block: Block) -> torch.Tensor:
        base = block.base
        assert base is not None
        count = len(block.models)
        average = torch.stack(block.models).mean(dim=0)
        if self.rowwise:
            deltas = torch.stack([m - base for m in block.models])  # [N, ..., d]
            norms = torch.linalg.vector_norm(deltas, dim=-1)  # [N, ...]
            dots = torch.einsum("i...d,j...d->ij...", deltas, deltas)  # [N, N, ...]
            t = interpolation_factor(mean_cosine(dots, norms), count).unsqueeze(-1)
        else:
            assert self.t is not None
            t = self.t.to(base.dtype)
        return t * average + (1 - t) * base
