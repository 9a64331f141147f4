"""SLERP: spherical linear interpolation between the base and one other model.

Each tensor is one vector (flattened). With unit directions u0 = base/|base|, u1 = model/|model|
(a norm <= eps counts as 1) and Omega = acos(clamp(u0 . u1, -1, 1)):
    theta = sin((1 - t) Omega) / sin(Omega) * base + sin(t Omega) / sin(Omega) * model
The coefficients multiply the unnormalised tensors, so norms are interpolated too. Nearly
parallel (or antiparallel) tensors, |u0 . u1| > dot_threshold, fall back to the linear
(1 - t) * base + t * model. t = 0 gives the base, t = 1 the model.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985;
https://en.wikipedia.org/wiki/Slerp (mergekit's reference)
"""

from __future__ import annotations

import torch

from alloy.merge.registry import merge_method


@merge_method(
    base="required",
    reference="https://en.wikipedia.org/wiki/Slerp",
    min_models=1,
    max_models=1,
    properties=("idempotent", "base_fixed_point"),
)
def slerp(
    models: list[torch.Tensor],
    *,
    base: torch.Tensor,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the model (t = 1).

    Args:
        t: the interpolation factor, 0 for the base and 1 for the model
        dot_threshold: above this |cosine| the tensors count as parallel; interpolate linearly
        eps: norms at or below this count as 1 (a zero tensor has no direction)
    """
    model = models[0]
    flat_base, flat_model = base.reshape(-1), model.reshape(-1)  # [n]
    norm_base = torch.linalg.vector_norm(flat_base)
    norm_model = torch.linalg.vector_norm(flat_model)
    norm_base = torch.where(norm_base > eps, norm_base, 1)
    norm_model = torch.where(norm_model > eps, norm_model, 1)
    # Normalise before the product so the dot of large tensors cannot overflow.
    dot = ((flat_base / norm_base) * (flat_model / norm_model)).sum().clamp(-1, 1)
    # torch.where instead of a Python branch: no device sync, and acos never sees the
    # parallel case, so the unused spherical branch stays finite.
    parallel = dot.abs() > dot_threshold
    omega = torch.acos(torch.where(parallel, 0, dot))
    sin_omega = torch.sin(omega)
    coef_base = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / sin_omega)
    coef_model = torch.where(parallel, t, torch.sin(t * omega) / sin_omega)
    return coef_base * base + coef_model * model
