"""Weight-averaging rules: pure maths over lists of fp32 tensors, one fused multi-tensor op each.

Notation: x_1, x_2, ... are the model weights at the steps that are averaged (`start`, then every
`every` optimizer steps); s_n is the average after n of them; t = n - 1 counts the models already
in the average when x_n arrives.

EMA (Polyak-Juditsky averaging with exponential weights; Polyak & Juditsky 1992,
https://doi.org/10.1137/0330046, as used by e.g. https://arxiv.org/abs/1412.6980 section 7.2):

    s_1 = x_1                                   (copy init, torch's AveragedModel convention)
    s_n = beta_t * s_{n-1} + (1 - beta_t) * x_n = lerp(s_{n-1}, x_n, 1 - beta_t)

    beta_t = decay                              (no warm-up)
    beta_t = min(decay, (1 + t) / (10 + t))     (warm-up, TensorFlow's ExponentialMovingAverage
                                                 with num_updates = t: 2/11, 3/12, ... early on)

  With bias correction the average starts at zero instead (Adam's correction, Kingma & Ba 2015,
  https://arxiv.org/abs/1412.6980 section 3):

    s_0 = 0,  s_n = lerp(s_{n-1}, x_n, 1 - beta_t) for every n,  average = s_n / (1 - prod_t beta_t)

  which weighs x_i by (1 - beta_i) * prod_{j > i} beta_j / (1 - prod_j beta_j): a normalised
  exponential average in which x_1 gets no extra mass (copy init gives x_1 the weight
  prod_{t >= 1} beta_t, everything that "came before" it).

SWA (stochastic weight averaging, Izmailov et al. 2018, https://arxiv.org/abs/1803.05407): the
running mean of the collected models,

    s_1 = x_1,  s_n = s_{n-1} + (x_n - s_{n-1}) / n = lerp(s_{n-1}, x_n, 1 / n).

LaWA (latest weight averaging: Kaddour 2022, https://arxiv.org/abs/2209.14981; Sanyal et al. 2023,
https://arxiv.org/abs/2306.03241): the uniform mean of the latest k collected models,

    average_n = (1 / min(n, k)) * sum_{i = max(1, n - k + 1)}^{n} x_i.

Offline, over a sequence of n saved checkpoints, every rule is a fixed weighted sum
sum_i w_i x_i with sum_i w_i = 1 (see `uniform_weights`, `ema_weights`, `lawa_weights`), which is
what the streaming merge engine executes.

Every function here is pure: tensors in, tensors (or floats) out, no devices, files or dtypes
chosen; the averager (alloy.average.averager) owns precision, placement and step counting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensors = list[torch.Tensor]


def ema_decay(t: int, *, decay: float, warmup: bool = False) -> float:
    """beta_t: the decay applied when a model joins an average that already holds `t` models."""
    return min(decay, (1 + t) / (10 + t)) if warmup else decay


def ema_weight(decay: float) -> float:
    """The lerp weight of one EMA update: s <- lerp(s, x, 1 - decay)."""
    return 1.0 - decay


def swa_weight(count: int) -> float:
    """The lerp weight that folds one more model into a mean of `count` models."""
    return 1.0 / (count + 1)


def lerp_(average: Tensors, current: Tensors, *, weight: float) -> None:
    """s <- s + weight * (x - s), in place, as one fused lerp over all tensors: the one update
    EMA and SWA share (the averager applies it with `ema_weight` or `swa_weight`)."""
    torch._foreach_lerp_(average, current, weight)


def ema_update_(average: Tensors, current: Tensors, *, decay: float) -> None:
    """s <- decay * s + (1 - decay) * x, in place."""
    lerp_(average, current, weight=ema_weight(decay))


def swa_update_(average: Tensors, current: Tensors, *, count: int) -> None:
    """s <- s + (x - s) / (count + 1): fold one more model into a mean of `count` models."""
    lerp_(average, current, weight=swa_weight(count))


def lerp_cast_(average: Tensors, current: Tensors, weight: torch.Tensor) -> None:
    """s <- lerp(s, float(x), weight) per tensor: the update of a low-precision model into an
    fp32 average, written for `torch.compile`, which fuses the cast into the lerp (one pass that
    reads x and s and writes s; eager torch has no such op). `weight` is a 0-d tensor so that a
    new weight each step does not recompile."""
    for s, x in zip(average, current, strict=True):
        s.lerp_(x.float(), weight)


def lawa_mean(snapshots: Sequence[torch.Tensor]) -> torch.Tensor:
    """The uniform mean of one tensor's snapshots, accumulated in fp32.

    The snapshots are exact copies of the model's weights in the model's own dtype; summing k
    bf16 values in bf16 would lose up to log2(k) bits, so the sum is always carried in fp32.
    """
    if not snapshots:
        raise ValueError("lawa_mean needs at least one snapshot")
    total = snapshots[0].to(torch.float32, copy=True)
    for snapshot in snapshots[1:]:
        total.add_(snapshot)
    return total.div_(len(snapshots))


def uniform_weights(n: int) -> list[float]:
    """w_i = 1 / n."""
    _check_count(n)
    return [1.0 / n] * n


def ema_weights(n: int, *, decay: float) -> list[float]:
    """The weights that the copy-init EMA recursion gives n models in order (oldest first).

    Unrolling s_1 = x_1, s_i = decay * s_{i-1} + (1 - decay) * x_i:

        w_1 = decay^(n-1),  w_i = (1 - decay) * decay^(n-i)  for i >= 2,

    and sum_i w_i = decay^(n-1) + (1 - decay) * (1 - decay^(n-1)) / (1 - decay) = 1.
    """
    _check_count(n)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - i) for i in range(2, n + 1)]


def lawa_weights(n: int, *, k: int) -> list[float]:
    """w_i = 1 / min(n, k) for the latest min(n, k) models, 0 for the older ones."""
    _check_count(n)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    kept = min(n, k)
    return [0.0] * (n - kept) + [1.0 / kept] * kept


def swa_lr_factor(
    step: int,
    *,
    start: int,
    swa_factor: float,
    anneal_steps: int = 0,
    anneal: Literal["cos", "linear"] = "cos",
    before: Callable[[int], float] | None = None,
) -> float:
    """Learning-rate multiplier for SWA (what torch's SWALR does, per step and as a function).

    Before `start` the multiplier is `before(step)` (1 if not given: the optimizer's own learning
    rate). From `start` it anneals from `before(start)` to `swa_factor` over `anneal_steps`
    steps (cosine or linear), then stays at `swa_factor`; Izmailov et al. 2018 collect models
    under this constant (or cyclical) rate. Use it with `torch.optim.lr_scheduler.LambdaLR`:

    >>> import functools
    >>> factor = functools.partial(swa_lr_factor, start=100, swa_factor=0.1, anneal_steps=10)
    >>> factor(50), factor(100), round(factor(105), 3), factor(110), factor(500)
    (1.0, 1.0, 0.55, 0.1, 0.1)
    """
    base = before or (lambda _: 1.0)
    if step < start:
        return base(step)
    start_factor = base(start)
    if anneal_steps <= 0 or step >= start + anneal_steps:
        return swa_factor
    progress = (step - start) / anneal_steps  # in [0, 1)
    if anneal == "cos":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return start_factor + (swa_factor - start_factor) * progress


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"need at least one model to average, got {n}")
