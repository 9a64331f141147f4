"""Hand-derived goldens for the entrywise methods ported from mergekit: nearswap, ram,
ramplus_tl (and sce, arcee_fusion below). Each derivation is in the docstring."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from alloy.merge.blocks import run
from alloy.merge.registry import get_method


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(name: str, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return get_method(name)(models, **params)  # type: ignore[arg-type]


# nearswap


def test_nearswap_near_entries_swap_far_ones_move_by_t() -> None:
    """a = [0, 1, 2, 3], b = [0.05, 1.5, 1, 3], t = 0.1: d = [0.05, 0.5, 1, 0];
    w = clamp(0.1 / max(d, 1e-6), 0, 1) = [1, 0.2, 0.1, 1];
    theta = w b + (1 - w) a = [0.05, 1.1, 1.9, 3]."""
    out = merge("nearswap", [t(0.05, 1.5, 1, 3)], base=t(0, 1, 2, 3), t=0.1)
    assert_close(out, t(0.05, 1.1, 1.9, 3))


def test_nearswap_t_zero_keeps_the_base() -> None:
    """t = 0: w = 0 everywhere, theta = a."""
    base = t(0, 1, 2, 3)
    assert torch.equal(merge("nearswap", [t(5, 5, 5, 5)], base=base, t=0.0), base)


# ram and ramplus_tl: base 1, task vectors tau0 = [1, 2, 0, 1e-6, 4], tau1 = [3, 0, 0, 0, -2]

BASE = t(1, 1, 1, 1, 1)
MODELS = [BASE + t(1, 2, 0, 1e-6, 4), BASE + t(3, 0, 0, 0, -2)]


def test_ram_unique_whole_shared_averaged() -> None:
    """epsilon 1e-5: m0 = [1, 1, 0, 0, 1] (1e-6 is below epsilon), m1 = [1, 0, 0, 0, 1],
    c = [2, 1, 0, 0, 2]; merged tau = [(1 + 3) / 2, 2, 0, 0, (4 - 2) / 2] = [2, 2, 0, 0, 1];
    theta = [3, 3, 1, 1, 2]."""
    assert_close(merge("ram", MODELS, base=BASE), t(3, 3, 1, 1, 2))


@pytest.mark.parametrize(("alpha", "unique"), [(1.0, 3.0), (0.4, 2.4)])
def test_ramplus_amplifies_unique_changes(alpha: float, unique: float) -> None:
    """r = 0.5. Model 0 shares entries 0 and 4 (|S0| = 2) and changes entry 1 alone
    (|U0| = 1): rho0 = 2, lambda0 = 1 + 0.5 * min(2, alpha): 1.5 for alpha 1, 1.2 for 0.4.
    Model 1 has no unique entry (rho1 = 2 / 1e-5, clamped; it scales nothing). Merged tau =
    [2, 2 * lambda0, 0, 0, 1] -> theta = [3, 1 + 2 lambda0, 1, 1, 2]."""
    out = merge("ramplus_tl", MODELS, base=BASE, r=0.5, alpha=alpha)
    assert_close(out, t(3, 1 + unique, 1, 1, 2))


def test_ramplus_r_zero_is_ram() -> None:
    assert torch.equal(
        merge("ramplus_tl", MODELS, base=BASE, r=0.0), merge("ram", MODELS, base=BASE)
    )


def test_ramplus_counts_over_the_whole_tensor() -> None:
    """The overlap counts are per tensor: summed over row blocks they give the one-block
    result."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(12, 5, generator=g)
    models = [
        base + torch.randn(12, 5, generator=g) * (torch.rand(12, 5, generator=g) < 0.5)
        for _ in range(3)
    ]
    spec = get_method("ramplus_tl")
    whole = run(spec.make(3, r=0.5, alpha=0.9), models, base)
    blocked = run(spec.make(3, r=0.5, alpha=0.9), models, base, block_elements=10)
    assert torch.equal(blocked, whole)
