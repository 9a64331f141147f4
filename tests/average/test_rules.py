"""Averaging rules: hand-derived goldens (derivations in the docstrings) and their invariants."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from alloy.average import rules


def test_ema_decay_warmup_golden() -> None:
    """beta_t = min(decay, (1 + t) / (10 + t)): t=0 -> 1/10, t=1 -> 2/11, t=8 -> 9/18 = 0.5,
    and from there on the cap 0.5."""
    decays = [rules.ema_decay(t, decay=0.5, warmup=True) for t in (0, 1, 2, 8, 9, 1000)]
    assert decays == pytest.approx([0.1, 2 / 11, 0.25, 0.5, 0.5, 0.5])
    assert rules.ema_decay(0, decay=0.5) == 0.5


def test_ema_and_swa_updates_golden() -> None:
    """EMA at decay 0.75 from s=4 towards x=8: 0.75*4 + 0.25*8 = 5 (exact in binary).
    SWA with 3 models averaged, s=4, x=8: 4 + (8-4)/4 = 5."""
    average = [torch.tensor([4.0, -2.0]), torch.tensor([[1.0]])]
    rules.ema_update_(average, [torch.tensor([8.0, 2.0]), torch.tensor([[5.0]])], decay=0.75)
    assert average[0].tolist() == [5.0, -1.0] and average[1].item() == 2.0
    mean = [torch.tensor([4.0])]
    rules.swa_update_(mean, [torch.tensor([8.0])], count=3)
    assert mean[0].item() == 5.0


def test_offline_weights_golden() -> None:
    """ema, n=3, decay 0.5: s1=x1, s2=.5x1+.5x2, s3=.5s2+.5x3 = .25x1 + .25x2 + .5x3.
    lawa k=2 of 4: the last two at 1/2 each."""
    assert rules.ema_weights(3, decay=0.5) == [0.25, 0.25, 0.5]
    assert rules.ema_weights(1, decay=0.9) == [1.0]
    assert rules.lawa_weights(4, k=2) == [0.0, 0.0, 0.5, 0.5]
    assert rules.lawa_weights(2, k=5) == [0.5, 0.5]
    assert rules.uniform_weights(4) == [0.25] * 4


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_ema_weights_sum_to_one_and_match_the_recursion(decay: float, n: int) -> None:
    weights = rules.ema_weights(n, decay=decay)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    xs = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    s = xs[0].clone()
    for x in xs[1:]:
        s = decay * s + (1 - decay) * x
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    assert torch.allclose(s, expected, atol=1e-12)


def test_lawa_mean_accumulates_in_fp32() -> None:
    """Eight bf16 snapshots 1 + i/128 (exact in bf16): the mean 1 + 3.5/128 = 1.02734375 is
    exact in fp32; a bf16 running sum would round at 8.x (ulp 1/16)."""
    snapshots = [torch.tensor([1 + i / 128], dtype=torch.bfloat16) for i in range(8)]
    mean = rules.lawa_mean(snapshots)
    assert mean.dtype == torch.float32 and mean.item() == 1 + 3.5 / 128
    assert snapshots[0].item() == 1.0  # not modified
    with pytest.raises(ValueError):
        rules.lawa_mean([])


def test_swa_lr_factor_golden() -> None:
    """Before start: the base schedule; cosine anneal from base(start)=0.5 to 0.1 over 4 steps:
    step start+2 is halfway, (0.5 + 0.1) / 2 = 0.3; linear at start+1: 0.5 - 0.4/4 = 0.4."""
    factor = functools.partial(
        rules.swa_lr_factor, start=10, swa_factor=0.1, anneal_steps=4, before=lambda s: 0.5
    )
    assert factor(3) == 0.5
    assert factor(10) == 0.5
    assert factor(12) == pytest.approx(0.3)
    assert factor(14) == factor(1000) == 0.1
    assert factor(11, anneal="linear") == pytest.approx(0.4)
    assert rules.swa_lr_factor(10, start=10, swa_factor=0.2) == 0.2  # no anneal: a step


def test_rules_reject_bad_counts() -> None:
    with pytest.raises(ValueError):
        rules.uniform_weights(0)
    with pytest.raises(ValueError):
        rules.lawa_weights(3, k=0)
    with pytest.raises(ValueError):
        rules.ema_weights(3, decay=1.5)
