"""NuSLERP: spherical interpolation of two models (or of their task vectors) by weight.

With weights w0, w1 the factor is t = w1 / (w0 + w1) (0.5 when |w0 + w1| < 1e-6). The vectors
v0, v1 are the two models, or with a base their task vectors tau_i = theta_i - theta_base. With
unit directions u_i = v_i / max(|v_i|, 1e-7) and Omega = acos(clamp(u0 . u1, -1, 1)):
    slerp(v0, v1) = (sin((1 - t) Omega) v0 + sin(t Omega) v1) / sin(Omega)
falling back to (1 - t) v0 + t v1 where 1 - cos^2(Omega) <= 1e-16 (colinear), and
    theta = slerp(v0, v1)              (no base)
    theta = base + slerp(tau0, tau1)   (with a base)
`nuslerp_flatten` (the default) treats the whole tensor as one vector; otherwise each vector
runs along the last dimension (rows of a matrix), or along dimension 0 (columns) with
`nuslerp_row_wise`, mergekit's naming. The flatten option wins over the row-wise one.

There is no paper; this follows mergekit 0.1.5's `nuslerp`, https://github.com/arcee-ai/mergekit
"""

from __future__ import annotations

import torch

from alloy.merge.registry import REQUIRED, merge_method


@merge_method(
    base="optional",
    reference="https://github.com/arcee-ai/mergekit",
    per_model={"weight": REQUIRED},
    min_models=2,
    max_models=2,
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def nuslerp(
    models: list[torch.Tensor],
    *,
    base: torch.Tensor | None,
    weight: list[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """Spherical interpolation of two models or task vectors, t = w1 / (w0 + w1).

    Args:
        weight: the weight of each of the two models
        nuslerp_row_wise: without flattening, interpolate the vectors along dimension 0
        nuslerp_flatten: interpolate the whole tensor as one vector
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    shape = models[0].shape
    v0, v1 = (models[0], models[1]) if base is None else (models[0] - base, models[1] - base)
    transpose = nuslerp_row_wise and not nuslerp_flatten
    if nuslerp_flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)  # [n]
    elif transpose:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)  # vectors along the last dimension
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # [..., 1]
    colinear = (1 - cos.square()) <= 1e-16
    omega = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if transpose:
        result = result.transpose(0, -1)
    result = result.reshape(shape)
    return result if base is None else base + result
