"""Learning-rate schedules: hand-derived goldens, and parity with transformers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_wsd_schedule
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from alloy.train.schedules import (
    Constant,
    Cosine,
    Infinite,
    Rewarm,
    WarmupStableDecay,
    as_lambda,
    key_steps,
)


def test_cosine_goldens() -> None:
    """lr 1, min 0.1, warm-up 2 of 10 steps. Warm-up is linear from 0: step 1 = 0.5. Decay
    progress p = (s - 2) / 8: step 4 -> p = 1/4, 0.1 + 0.9 (1 + cos(pi/4)) / 2 = 0.868198;
    step 6 -> p = 1/2, 0.1 + 0.9 / 2 = 0.55; from step 10 on: 0.1."""
    s = Cosine(lr=1.0, total=10, warmup=2, min_lr=0.1)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.868198, 6: 0.55, 10: 0.1, 11: 0.1}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, abs=1e-6), step


def test_rewarm_starts_where_pretraining_ended() -> None:
    """Re-warming starts at min_lr (the LR a cosine pre-training ended at): step 0 = 0.1,
    step 1 = 0.1 + 0.9 / 2 = 0.55, then the same cosine as above."""
    s = Rewarm(lr=1.0, total=10, warmup=2, min_lr=0.1)
    assert [s(0), s(1), s(2), s(6)] == pytest.approx([0.1, 0.55, 1.0, 0.55])
    assert Rewarm(lr=1.0, total=10, warmup=2, min_lr=0.1, initial_lr=0.3)(1) == pytest.approx(0.65)


def test_constant_and_offset() -> None:
    s = Constant(lr=2.0, warmup=4)
    assert [s(0), s(2), s(4), s(100)] == [0.0, 1.0, 2.0, 2.0]
    # offset: this run's step 0 is the schedule's step 2.
    assert Constant(lr=2.0, warmup=4, offset=2)(0) == 1.0


@pytest.mark.parametrize(
    ("shape", "at7", "at8"),
    [
        # decay starts at step 6 over 4 steps: p(7) = 1/4, p(8) = 1/2
        ("linear", 0.75, 0.5),
        ("cosine", (1 + math.cos(math.pi / 4)) / 2, 0.5),
        ("1-sqrt", 0.5, 1 - math.sqrt(0.5)),
    ],
)
def test_wsd_goldens(shape: str, at7: float, at8: float) -> None:
    s = WarmupStableDecay(lr=1.0, total=10, decay=4, warmup=2, shape=shape)  # type: ignore[arg-type]
    assert [s(1), s(2), s(5), s(6)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert [s(7), s(8)] == pytest.approx([at7, at8])
    assert s(10) == 0.0


def test_infinite_goldens() -> None:
    """lr 1 -> constant 0.5 -> min 0.05 over 20 steps: warm-up 2, cool-down 4, anneal 4.
    Cosine cool-down at p = 1/2 (step 4): 0.5 + 0.5 / 2 = 0.75. Constant 0.5 on steps 6-15.
    Exponential anneal from step 16: step 18 is p = 1/2, 0.5 * 0.1 ** 0.5 = 0.158114."""
    s = Infinite(lr=1.0, constant_lr=0.5, total=20, warmup=2, cooldown=4, anneal=4, min_lr=0.05)
    expected = {1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 15: 0.5, 16: 0.5, 18: 0.158114, 20: 0.05}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, abs=1e-6), step


def test_infinite_inverse_sqrt_cooldown() -> None:
    """h(x) = 1/sqrt(1 + a x) - 1 with a = 3: h(1) = -1/2, h(1/2) = 1/sqrt(2.5) - 1, so at
    p = 1/2 the LR is 1 + (0.5 - 1) h(1/2)/h(1) = 1/sqrt(2.5) = 0.632456; it reaches 0.5 at the
    end of the cool-down."""
    s = Infinite(
        lr=1.0,
        constant_lr=0.5,
        total=20,
        warmup=2,
        cooldown=4,
        cooldown_shape="inv_sqrt",
        alpha=3.0,
    )
    assert s(4) == pytest.approx(1 / math.sqrt(2.5))
    assert s(2) == pytest.approx(1.0)
    assert s(6) == pytest.approx(0.5)
    assert s(19) == 0.5  # anneal 0: the run ends in the constant phase


def _hf_lrs(make_scheduler, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = make_scheduler(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _alloy_lrs(schedule, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, as_lambda(schedule))
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_parity_with_transformers_schedulers() -> None:
    """As LambdaLR multipliers, the schedules equal transformers' own at every step."""
    ours = _alloy_lrs(Cosine(lr=0.3, total=50, warmup=7), 50)
    theirs = _hf_lrs(lambda o: get_cosine_schedule_with_warmup(o, 7, 50), 50)
    assert ours == pytest.approx(theirs, abs=1e-12)
    ours = _alloy_lrs(Cosine(lr=0.3, total=50, warmup=7, min_lr=0.03), 50)
    theirs = _hf_lrs(
        lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 7, 50, min_lr=0.03), 50
    )
    assert ours == pytest.approx(theirs, abs=1e-12)
    for shape in ("linear", "cosine", "1-sqrt"):
        ours = _alloy_lrs(
            WarmupStableDecay(
                lr=0.3, total=50, decay=20, warmup=5, min_lr=0.03, initial_lr=0.03, shape=shape
            ),  # type: ignore[arg-type]
            50,
        )
        theirs = _hf_lrs(
            lambda o, s=shape: get_wsd_schedule(
                o, 5, 20, num_training_steps=50, decay_type=s, min_lr_ratio=0.1
            ),
            50,
        )
        assert ours == pytest.approx(theirs, abs=1e-12), shape


def test_key_steps_mark_phase_boundaries() -> None:
    s = Infinite(lr=1.0, constant_lr=0.5, total=20, warmup=2, cooldown=4, anneal=4, min_lr=0.05)
    assert key_steps(s, 20) == [0, 2, 6, 16, 19]
