"""Learning-rate schedules: pure functions of the optimizer step.

A schedule is a frozen dataclass; `schedule(step)` is the learning rate of optimizer step `step`
(0-based: step 0 is the first update, as for torch's `LambdaLR`). Nothing here knows about
optimizers, so a schedule can be plotted, tested against hand-computed values, or handed to any
training loop (`as_lambda` turns one into the multiplier `LambdaLR` wants).

Conventions shared by every schedule, chosen to agree with transformers' own schedulers:
- warm-up is linear from `initial_lr` at step 0 to `lr` at step `warmup` (so with
  `initial_lr = 0` the first step has learning rate 0, as in `get_cosine_schedule_with_warmup`);
- a decay phase of `n` steps that starts at step `s0` has progress `p = (step - s0) / n`, in
  [0, 1) over the run; after the last step a schedule holds its final value (`min_lr`).

Schedules (η_max = `lr`):
- `constant`: warm-up, then η_max.
- `cosine`: warm-up, then η_min + (η_max - η_min) (1 + cos πp) / 2 until `total`.
- `rewarm`: the same curve started from a pre-trained checkpoint: the warm-up starts at the LR the
  checkpoint was left at (`initial_lr`, default η_min), re-warms to η_max, and re-decays to η_min
  (Ibrahim et al. 2024, https://arxiv.org/abs/2403.08763).
- `wsd`: warmup-stable-decay: warm-up, η_max until the last `decay` steps, then a linear, cosine
  or 1-sqrt decay to η_min (Hägele et al. 2024, https://arxiv.org/abs/2405.18392).
- `infinite`: Ibrahim et al. 2024, section 7: warm-up to η_max; cool-down over `cooldown` steps to
  η_const, by cosine, η_const + (η_max - η_const)(1 + cos πp)/2, or inverse square root,
  η_max + (η_const - η_max) h(p)/h(1) with h(x) = 1/sqrt(1 + αx) - 1; η_const for as long as the
  run lasts; over the last `anneal` steps an exponential anneal η_const (η_min/η_const)^p. With
  `anneal: 0` the run ends in the constant phase, ready to be continued (`offset`).

Every schedule takes `offset`: the schedule step of this run's first step, so a run that continues
an earlier one (an infinite schedule over several data sets, say) carries on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

DecayShape = Literal["linear", "cosine", "1-sqrt"]
CooldownShape = Literal["cosine", "inv_sqrt"]


def warmup_lr(step: float, warmup: int, initial_lr: float, lr: float) -> float:
    """Linear warm-up: `initial_lr` at step 0, `lr` at step `warmup`."""
    return initial_lr + (lr - initial_lr) * step / warmup


def decay(progress: float, high: float, low: float, shape: DecayShape = "cosine") -> float:
    """From `high` at progress 0 towards `low` at progress 1, by `shape`."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        factor = 1.0 - p
    elif shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    else:  # 1-sqrt (Hägele et al.)
        factor = 1.0 - math.sqrt(p)
    return low + (high - low) * factor


@dataclass(frozen=True)
class Constant:
    lr: float
    warmup: int = 0
    initial_lr: float = 0.0
    offset: int = 0

    def __call__(self, step: int) -> float:
        s = step + self.offset
        return warmup_lr(s, self.warmup, self.initial_lr, self.lr) if s < self.warmup else self.lr


@dataclass(frozen=True)
class Cosine:
    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0
    initial_lr: float = 0.0
    offset: int = 0

    def __call__(self, step: int) -> float:
        s = step + self.offset
        if s < self.warmup:
            return warmup_lr(s, self.warmup, self.initial_lr, self.lr)
        if s >= self.total:
            return self.min_lr
        progress = (s - self.warmup) / max(1, self.total - self.warmup)
        return decay(progress, self.lr, self.min_lr, "cosine")


@dataclass(frozen=True)
class Rewarm:
    """Cosine re-warmed from the LR a pre-trained run ended at (`initial_lr`, default `min_lr`)."""

    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0
    initial_lr: float | None = None
    offset: int = 0

    def __call__(self, step: int) -> float:
        start = self.min_lr if self.initial_lr is None else self.initial_lr
        curve = Cosine(self.lr, self.total, self.warmup, self.min_lr, start, self.offset)
        return curve(step)


@dataclass(frozen=True)
class WarmupStableDecay:
    lr: float
    total: int
    decay: int
    warmup: int = 0
    min_lr: float = 0.0
    initial_lr: float = 0.0
    shape: DecayShape = "1-sqrt"
    offset: int = 0

    def __call__(self, step: int) -> float:
        s = step + self.offset
        if s < self.warmup:
            return warmup_lr(s, self.warmup, self.initial_lr, self.lr)
        start = self.total - self.decay
        if s < start:
            return self.lr
        if s >= self.total:
            return self.min_lr
        return decay((s - start) / max(1, self.decay), self.lr, self.min_lr, self.shape)


@dataclass(frozen=True)
class Infinite:
    lr: float
    constant_lr: float
    total: int
    warmup: int = 0
    cooldown: int = 0
    anneal: int = 0
    min_lr: float = 0.0
    initial_lr: float = 0.0
    cooldown_shape: CooldownShape = "cosine"
    alpha: float = 10.0  # steepness of the inverse-square-root cool-down
    offset: int = 0

    def __call__(self, step: int) -> float:
        s = step + self.offset
        if s < self.warmup:
            return warmup_lr(s, self.warmup, self.initial_lr, self.lr)
        if s < self.warmup + self.cooldown:
            p = (s - self.warmup) / self.cooldown
            if self.cooldown_shape == "cosine":
                return decay(p, self.lr, self.constant_lr, "cosine")
            h = _inv_sqrt_h(p, self.alpha) / _inv_sqrt_h(1.0, self.alpha)
            return self.lr + (self.constant_lr - self.lr) * h
        start = self.total - self.anneal
        if s < start:
            return self.constant_lr
        if s >= self.total:
            return self.min_lr
        p = (s - start) / self.anneal
        return self.constant_lr * (self.min_lr / self.constant_lr) ** p


def _inv_sqrt_h(x: float, alpha: float) -> float:
    return 1.0 / math.sqrt(1.0 + alpha * x) - 1.0


Schedule = Constant | Cosine | Rewarm | WarmupStableDecay | Infinite

SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "cosine": Cosine,
    "rewarm": Rewarm,
    "wsd": WarmupStableDecay,
    "infinite": Infinite,
}


def schedule_parameters(name: str) -> dict[str, Any]:
    """Parameter name -> default (`...` when required) of the schedule `name`."""
    from dataclasses import MISSING

    return {f.name: (... if f.default is MISSING else f.default) for f in fields(SCHEDULES[name])}


def schedule_name(schedule: Schedule) -> str:
    return next(name for name, cls in SCHEDULES.items() if isinstance(schedule, cls))


def describe(schedule: Schedule) -> dict[str, Any]:
    return {"name": schedule_name(schedule), **asdict(schedule)}


def peak(schedule: Schedule, steps: int) -> float:
    """The largest learning rate of the first `steps` steps (at least the schedule's `lr`)."""
    return max([schedule.lr, *(schedule(s) for s in key_steps(schedule, steps))])


def key_steps(schedule: Schedule, steps: int) -> list[int]:
    """The steps where a schedule's phases begin and end, within a run of `steps` steps."""
    points = {0, max(0, steps - 1)}
    s = schedule
    marks = [getattr(s, "warmup", 0)]
    if isinstance(s, WarmupStableDecay):
        marks.append(s.total - s.decay)
    if isinstance(s, Infinite):
        marks += [s.warmup + s.cooldown, s.total - s.anneal]
    offset = getattr(s, "offset", 0)
    points |= {m - offset for m in marks if 0 <= m - offset < steps}
    return sorted(points)


def as_lambda(schedule: Schedule) -> Callable[[int], float]:
    """The multiplier of `schedule.lr` for torch's `LambdaLR` (whose base LR must be `lr`).

    A closure rather than the dataclass itself: `LambdaLR.state_dict` pickles callable objects'
    attributes into checkpoints, and a checkpoint should hold plain numbers only.
    """
    base = schedule.lr

    def multiplier(step: int) -> float:
        return schedule(step) / base

    return multiplier
