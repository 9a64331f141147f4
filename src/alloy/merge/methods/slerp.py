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

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch

from alloy.merge.blocks import Block
from alloy.merge.registry import merge_method
from alloy.ranges import POSITIVE, UNIT


@merge_method(
    base="required",
    reference="https://en.wikipedia.org/wiki/Slerp",
    min_models=1,
    max_models=1,
    properties=("idempotent", "base_fixed_point"),
)
def slerp(
    *,
    t: Annotated[float, UNIT],
    dot_threshold: Annotated[float, UNIT] = 0.9995,
    eps: Annotated[float, POSITIVE] = 1e-8,
) -> Slerp:
    """Spherical interpolation from the base (t = 0) to the model (t = 1).

    Args:
        t: the interpolation factor, 0 for the base and 1 for the model
        dot_threshold: above this |cosine| the tensors count as parallel; interpolate linearly
        eps: norms at or below this count as 1 (a zero tensor has no direction)
    """
    return Slerp(t, dot_threshold, eps)


@dataclass
class Slerp:
    """One pass sums |base|^2, |model|^2 and base . model (in float64); then each block is
    coef_base * base + coef_model * model."""

    t: float
    dot_threshold: float
    eps: float
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    coefs: tuple[float, float] = (0.0, 0.0)

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return 1

    def reduce(self, step: int, block: Block) -> None:
        assert block.base is not None
        base, model = block.base.double(), block.models[0].double()
        self.sums[0] += float((base * base).sum())
        self.sums[1] += float((model * model).sum())
        self.sums[2] += float((base * model).sum())

    def end(self, step: int) -> None:
        norm_base, norm_model = math.sqrt(self.sums[0]), math.sqrt(self.sums[1])
        norm_base = norm_base if norm_base > self.eps else 1.0
        norm_model = norm_model if norm_model > self.eps else 1.0
        dot = min(1.0, max(-1.0, self.sums[2] / (norm_base * norm_model)))
        t = self.t
        if abs(dot) > self.dot_threshold:
            self.coefs = (1 - t, t)
        else:
            omega = math.acos(dot)
            sin_omega = math.sin(omega)
            self.coefs = (math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega)

    def apply(self, block: Block) -> torch.Tensor:
        assert block.base is not None
        coef_base, coef_model = self.coefs
        return torch.add(block.base * coef_base, block.models[0], alpha=coef_model)
