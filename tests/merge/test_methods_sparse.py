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


# sce: base 0, tau0 = [3, 0, -1, 1], tau1 = [2, 4, 1, 1]

SCE_BASE = t(0, 0, 0, 0)
SCE_MODELS = [t(3, 0, -1, 1), t(2, 4, 1, 1)]


def test_sce_energy_weights_and_erase() -> None:
    """select_topk 1: energies mean(tau^2) = [11/4, 22/4] -> w = [1/3, 2/3]. Elected signs
    (sum [5, 4, 0, 2] >= 0) are all +; tau0 disagrees at entries 1 (zero) and 2 (-1).
    Entry 0: (3/3 + 4/3) / 1 = 7/3; entries 1, 2: only model 1 -> 4, 1; entry 3: 1."""
    out = merge("sce", SCE_MODELS, base=SCE_BASE)
    assert_close(out, t(7 / 3, 4, 1, 1))


def test_sce_selects_top_variance() -> None:
    """select_topk 0.5: variances (d/2)^2 = [0.25, 4, 1, 0], 3 nonzero -> k = int(1.5) = 1:
    only entry 1 survives; energies [0, 4] -> w = [0, 1]; the zeroed entries never agree with
    the elected sign, so they stay at the base."""
    out = merge("sce", SCE_MODELS, base=SCE_BASE, select_topk=0.5)
    assert_close(out, t(0, 4, 0, 0))


def test_sce_selection_is_per_tensor() -> None:
    """Blocking does not change the selection (counts, ranks and tie quotas cross blocks)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(12, 5, generator=g)
    models = [base + torch.randn(12, 5, generator=g) for _ in range(3)]
    spec = get_method("sce")
    whole = run(spec.make(3, select_topk=0.3), models, base)
    blocked = run(spec.make(3, select_topk=0.3), models, base, block_elements=10)
    # energies are summed in float64 across blocks: last-bit differences only
    assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(whole == base, blocked == base)


# arcee_fusion


def test_arcee_fusion_keeps_entries_past_the_fence() -> None:
    """One row, base 0, b = [1, 2, 2, 2, 9]: importance = c * [1, 2, 2, 2, 9] with c the
    row's KL > 0. n = 5: quartile indices floor([0.25, 0.5, 0.75] * 4) = [1, 2, 3] of the
    sorted scores -> Q1 = Q2 = Q3 = 2c, fence 2c: entry 0 (c < 2c) keeps the base."""
    out = merge("arcee_fusion", [t(1, 2, 2, 2, 9).view(1, 5)], base=torch.zeros(1, 5))
    assert_close(out, t(0, 2, 2, 2, 9).view(1, 5))


def test_arcee_fusion_blocks_match_whole() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20, 6, generator=g)
    model = base + torch.randn(20, 6, generator=g)
    spec = get_method("arcee_fusion")
    for shape in [(20, 6), (120,)]:
        b, m = base.reshape(shape), model.reshape(shape)
        whole = run(spec.make(1), [m], b)
        assert torch.equal(run(spec.make(1), [m], b, block_elements=7), whole)
        assert 0 < int((whole != b).sum()) < b.numel()
