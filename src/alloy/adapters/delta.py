"""The maths of adapters, as pure functions of tensors (fp32 inside, no files, no models).

A LoRA module holds `A` (r × in) and `B` (out × r) and a scale s (α/r, or α/√r for rsLoRA); its
weight update is ΔW = s·B·A in the (out × in) layout of `nn.Linear`. GPT-2's Conv1D stores the
transposed (in × out) weight, and embeddings store (vocab × dim) against PEFT's
`lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r): for both, ΔW = s·(B·A)ᵀ. VeRA
shares frozen random projections A, B across layers and learns two scaling vectors per module:
ΔW = (λ_b ⊙ B)·(λ_d ⊙ A). DoRA rescales each output row of the folded weight to a learned
magnitude m: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (norm over the input dimension).

Row ranges follow the stored layout, so a streaming reader can fold a block of rows without
forming the whole update: for an (out × in) weight rows [a, b) need B[a:b]; for a transposed one
they need A[:, a:b].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["lora", "vera"]


@dataclass(frozen=True)
class Factors:
    """One adapted weight: ΔW = scale · B·A (transposed when `transposed`), in fp32.

    For VeRA, `A` and `B` are the shared projections sliced to this module's shape and
    `lambda_d` (r) and `lambda_b` (out) scale them; `magnitude` (out) is DoRA's.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    transposed: bool = False
    magnitude: torch.Tensor | None = None
    lambda_b: torch.Tensor | None = None
    lambda_d: torch.Tensor | None = None
    embedding: bool = False  # PEFT's lora_embedding_A / _B (always transposed)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The stored shape of the weight this update applies to."""
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if self.transposed else (out, inp)

    @property
    def kind(self) -> Kind:
        return "vera" if self.lambda_b is not None else "lora"

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with ΔW = B'·A' in the (out × in) orientation, every scale folded into B'."""
        A, B = self.A.float(), self.B.float()
        if self.lambda_b is not None and self.lambda_d is not None:
            return self.lambda_b.float()[:, None] * B, self.lambda_d.float()[:, None] * A
        return B * self.scale, A


def delta(f: Factors, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """ΔW (fp32) in the stored layout, optionally only rows [start, stop) of it."""
    B, A = f.low_rank()
    if rows is None:
        d = B @ A
        return d.T.contiguous() if f.transposed else d
    start, stop = rows
    if f.transposed:
        return (B @ A[:, start:stop]).T.contiguous()
    return B[start:stop] @ A


def fold(weight: torch.Tensor, f: Factors, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """W + ΔW (DoRA: rescaled to its magnitudes) in the dtype of `weight`, computed in fp32.

    `weight` is the whole stored tensor, or rows [start, stop) of it when `rows` is given. A
    transposed DoRA weight normalises over stored rows, so it must be folded whole.
    """
    folded = weight.float() + delta(f, rows)
    if f.magnitude is not None:
        magnitude = f.magnitude.float()
        if f.transposed:
            if rows is not None:
                raise ValueError("a transposed DoRA weight is folded whole, not by rows")
            folded = folded * (magnitude / torch.linalg.norm(folded, dim=0))[None, :]
        else:
            if rows is not None:
                magnitude = magnitude[rows[0] : rows[1]]
            folded = folded * (magnitude / torch.linalg.norm(folded, dim=1))[:, None]
    return folded.to(weight.dtype)


def unfold(base: torch.Tensor, folded: torch.Tensor) -> torch.Tensor:
    """The fp32 update a folded weight carries over its base (plain LoRA/VeRA, not DoRA)."""
    return folded.float() - base.float()


def concat(parts: list[tuple[float, Factors]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A = Σ w_i ΔW_i exactly (out × in orientation): the ranks are stacked.

    [w_1 B_1 | w_2 B_2 | ...] · [A_1; A_2; ...] = Σ w_i B_i A_i, so the weighted sum of low-rank
    updates is itself low-rank with rank Σ r_i and no cross terms. Transposition is the caller's
    concern (all parts must share one layout).
    """
    Bs, As = [], []
    for weight, f in parts:
        B, A = f.low_rank()
        Bs.append(B * weight)
        As.append(A)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


@dataclass(frozen=True)
class Truncation:
    """A rank-`rank` factorisation B·A of a matrix M and how much of M it keeps.

    `energy` is the share of M's squared Frobenius norm retained (Σ_{k≤rank} σ_k² / Σ σ_k²);
    `error` the relative reconstruction error ‖M − B·A‖ / ‖M‖ = √(1 − energy).
    """

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    energy: float
    error: float


def truncate(
    matrix: torch.Tensor, *, rank: int | None = None, energy: float | None = None
) -> Truncation:
    """Best rank-r approximation of `matrix` (out × in, fp32) by SVD: B = U_r·Σ_r, A = V_rᵀ.

    Give `rank` (clamped to min(out, in)), or `energy` in (0, 1]: the smallest rank keeping at
    least that share of the squared norm. A zero matrix gives rank 0 and energy 1.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    m = matrix.float()
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    squares = S.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        r = 0
    elif rank is not None:
        r = min(rank, int(S.shape[0]))
    else:
        assert energy is not None
        kept = torch.cumsum(squares, 0) / total
        r = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1
        r = min(r, int(S.shape[0]))
    kept_energy = float(squares[:r].sum()) / total if total else 1.0
    error = max(0.0, 1.0 - kept_energy) ** 0.5
    B = (U[:, :r] * S[:r]).contiguous()
    A = Vh[:r].contiguous()
    return Truncation(B, A, r, kept_energy, error)


def lowrank_truncate(
    B: torch.Tensor, A: torch.Tensor, *, rank: int | None = None, energy: float | None = None
) -> Truncation:
    """`truncate(B·A)` without forming the product: QR of both factors, SVD of the small core.

    B·A = Q_B R_B R_Aᵀ Q_Aᵀ with R_B R_Aᵀ only (k × k) for k = the stacked rank, so merging
    adapters of large matrices costs O((out + in)·k²) rather than an out × in SVD.
    """
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().T)
    core = truncate(Rb @ Ra.T, rank=rank, energy=energy)
    return Truncation(Qb @ core.B, core.A @ Qa.T, core.rank, core.energy, core.error)
