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

from dataclasses import dataclass, field
from typing import Annotated

import torch

from alloy.merge.blocks import Block
from alloy.merge.registry import REQUIRED, merge_method
from alloy.ranges import ANY


@merge_method(
    base="optional",
    reference="https://github.com/arcee-ai/mergekit",
    per_model={"weight": REQUIRED},
    min_models=2,
    max_models=2,
    properties=("idempotent", "base_fixed_point", "order_invariant"),
)
def nuslerp(
    *,
    weight: Annotated[list[float], ANY],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> NuSlerp:
    """Spherical interpolation of two models or task vectors, t = w1 / (w0 + w1).

    Args:
        weight: the weight of each of the two models
        nuslerp_row_wise: without flattening, interpolate the vectors along dimension 0
        nuslerp_flatten: interpolate the whole tensor as one vector
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    return NuSlerp(t, nuslerp_row_wise, nuslerp_flatten)


@dataclass
class NuSlerp:
    """The interpolated vectors are the whole tensor (flatten, or any 1-D tensor), its rows along
    the last dimension (computed inside each block), or its columns along dimension 0 (row_wise).
    Whole-tensor and column statistics take one pass: |v0|^2, |v1|^2 and v0 . v1 in float64."""

    t: float
    row_wise: bool
    flatten: bool
    mode: str = "whole"
    sums: list[torch.Tensor] = field(default_factory=list)

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        if self.flatten or len(shape) < 2:
            self.mode = "whole"
        else:
            self.mode = "columns" if self.row_wise else "rows"
        return 0 if self.mode == "rows" else 1

    def _vectors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        v0, v1 = block.models
        if block.base is not None:
            v0, v1 = v0 - block.base, v1 - block.base
        return v0, v1

    def reduce(self, step: int, block: Block) -> None:
        v0, v1 = (v.double() for v in self._vectors(block))
        dims = None if self.mode == "whole" else 0
        parts = [(v0 * v0).sum(dim=dims), (v1 * v1).sum(dim=dims), (v0 * v1).sum(dim=dims)]
        self.sums = (
            parts if not self.sums else [a + b for a, b in zip(self.sums, parts, strict=True)]
        )

    def end(self, step: int) -> None:
        pass

    def apply(self, block: Block) -> torch.Tensor:
        v0, v1 = self._vectors(block)
        if self.mode == "rows":
            norm0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True)
            norm1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True)
            dot = (v0 * v1).sum(dim=-1, keepdim=True)
        else:
            norm0, norm1, dot = self.sums[0].sqrt(), self.sums[1].sqrt(), self.sums[2]
        cos = (dot / (norm0.clamp(min=1e-7) * norm1.clamp(min=1e-7))).clamp(-1, 1).to(v0.dtype)
        colinear = (1 - cos.square()) <= 1e-16
        omega = torch.acos(torch.where(colinear, 0, cos))
        t = self.t
        spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
        result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
        return result if block.base is None else block.base + result
