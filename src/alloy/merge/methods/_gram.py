"""Methods whose result is a per-tensor linear combination of the inputs, found from their Gram
matrix (multislerp, karcher).

Spherical means of whole tensors need only inner products: every point the algorithms visit lies
in the span of the inputs v_1 .. v_N, so it can be held as N coefficients and its inner products
read from the Gram matrix G[i, j] = v_i . v_j. One reduction pass sums G over the row blocks (in
float64); the method turns G into coefficients c, and each output block is sum_i c_i v_i, plus
the base when the vectors are task vectors. Memory stays at one block; the maths is on N x N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alloy.merge.blocks import Block


def vectors(block: Block) -> torch.Tensor:
    """The block's vectors: the models, or their task vectors when there is a base.  # [N, ...]"""
    models = torch.stack(block.models)
    return models if block.base is None else models - block.base


@dataclass
class GramCombination:
    """One pass sums the Gram matrix; `solve(G)` gives the coefficients [N] (float64)."""

    solve: Callable[[torch.Tensor], torch.Tensor]
    gram: torch.Tensor | None = None  # [N, N] float64
    coefficients: torch.Tensor | None = None  # [N] float64

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        self.gram, self.coefficients = None, None
        return 1

    def reduce(self, step: int, block: Block) -> None:
        flat = vectors(block).reshape(len(block.models), -1).double()  # [N, n]
        gram = flat @ flat.T  # [N, N]
        self.gram = gram if self.gram is None else self.gram + gram

    def end(self, step: int) -> None:
        assert self.gram is not None
        self.coefficients = self.solve(self.gram)

    def apply(self, block: Block) -> torch.Tensor:
        assert self.coefficients is not None
        v = vectors(block)  # [N, r, *rest]
        c = self.coefficients.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
        result = (c * v).sum(dim=0)
        return result if block.base is None else block.base + result
