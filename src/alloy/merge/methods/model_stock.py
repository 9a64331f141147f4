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

import torch

from alloy.merge.registry import merge_method


@merge_method(
    base="required",
    reference="https://arxiv.org/abs/2403.19522",
    min_models=2,
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def model_stock(
    models: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False
) -> torch.Tensor:
    """Interpolate between the base and the models' mean by the task vectors' mean cosine.

    Args:
        filter_wise: one interpolation factor per row instead of one per tensor
    """
    shape = base.shape
    if not filter_wise:
        rows_base, rows = base.reshape(-1), [m.reshape(-1) for m in models]  # [n]
    elif base.dim() < 2:
        rows_base, rows = base.reshape(1, -1), [m.reshape(1, -1) for m in models]  # [1, n]
    else:
        rows_base, rows = base, models  # [..., d]
    deltas = torch.stack([m - rows_base for m in rows])  # [N, ..., d]
    norms = torch.linalg.vector_norm(deltas, dim=-1)  # [N, ...]
    count = len(models)
    cosines = [
        ((deltas[i] * deltas[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # [..., 1]
    denominator = 1 + (count - 1) * cos
    # Near -1/(N-1) there is no finite estimate: keep the base there.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))
    average = torch.stack(rows).mean(dim=0)
    return (t * average + (1 - t) * rows_base).reshape(shape)
