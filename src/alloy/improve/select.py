"""Which samples a loop keeps: pure functions of the scores, no models.

Samples come grouped by prompt: `scores[p][j]` is the score of prompt p's j-th sample, `None`
when the scorer gave none (a judge whose answer held no score). Every function returns indices
`(p, j)` into those groups, in prompt order, so the caller writes the kept samples in a
deterministic order.

- RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767) keeps each prompt's best `top_k`
  samples, optionally only those at or above a floor.
- ReST (Gulcehre et al. 2023, https://arxiv.org/abs/2308.08998) keeps every sample at or above
  a threshold that rises over the Improve steps of one Grow step; a threshold may be given in
  reward units or as a quantile of the Grow step's scores (reward scales are arbitrary).
- Self-rewarding (Yuan et al. 2024, https://arxiv.org/abs/2401.10020) pairs each prompt's
  highest- and lowest-scored samples, and drops prompts whose two scores tie.

`sft_record` and `pair_record` lay out what is kept as training data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Scores = Sequence[Sequence[float | None]]
Index = tuple[int, int]


def _valid(group: Sequence[float | None]) -> list[tuple[int, float]]:
    return [(j, float(s)) for j, s in enumerate(group) if s is not None and math.isfinite(s)]


def best_of(scores: Scores, top_k: int = 1, floor: float | None = None) -> list[Index]:
    """Each prompt's `top_k` highest-scored samples (ties: the earlier sample first), those
    below `floor` left out."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    kept: list[Index] = []
    for p, group in enumerate(scores):
        ranked = sorted(_valid(group), key=lambda js: (-js[1], js[0]))
        kept += [(p, j) for j, s in ranked[:top_k] if floor is None or s >= floor]
    return kept


def above(scores: Scores, threshold: float) -> list[Index]:
    """Every sample scored at or above `threshold`."""
    return [(p, j) for p, group in enumerate(scores) for j, s in _valid(group) if s >= threshold]


def quantile(scores: Scores, q: float) -> float:
    """The q-quantile (0 <= q <= 1, linear interpolation) of every valid score; NaN if none."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], not {q}")
    values = sorted(s for group in scores for _, s in _valid(group))
    if not values:
        return math.nan
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def best_and_worst(scores: Scores, min_gap: float = 0.0) -> list[tuple[int, int, int]]:
    """(prompt, best sample, worst sample) for every prompt with at least two valid scores whose
    best exceeds its worst by more than `min_gap` (ties never make a pair). Among equal scores the
    earlier sample is the best and the later the worst."""
    pairs = []
    for p, group in enumerate(scores):
        valid = _valid(group)
        if len(valid) < 2:
            continue
        best = min(valid, key=lambda js: (-js[1], js[0]))
        worst = min(valid, key=lambda js: (js[1], -js[0]))
        if best[1] - worst[1] > min_gap:
            pairs.append((p, best[0], worst[0]))
    return pairs


def agreement(chosen: Sequence[float | None], rejected: Sequence[float | None]) -> dict[str, float]:
    """How often a judge prefers the labelled-better answer: `accuracy` counts a tie (or a
    missing score) as half right; `strict` counts only strict wins; `ties` is the tie share."""
    if len(chosen) != len(rejected):
        raise ValueError("chosen and rejected scores differ in length")
    if not chosen:
        return {"accuracy": math.nan, "strict": math.nan, "ties": math.nan, "pairs": 0}
    wins = ties = 0
    for c, r in zip(chosen, rejected, strict=True):
        if c is None or r is None or c == r:
            ties += 1
        elif c > r:
            wins += 1
    n = len(chosen)
    return {"accuracy": (wins + 0.5 * ties) / n, "strict": wins / n, "ties": ties / n, "pairs": n}


def sft_record(prompt: str, answer: str, template: str | None) -> dict[str, Any]:
    """A kept answer as training data laid out as it was sampled: chat messages under the chat
    template, else the templated prompt and the answer as its completion."""
    if template == "chat":
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        }
    return {"prompt": _templated(prompt, template), "completion": answer}


def pair_record(prompt: str, chosen: str, rejected: str, template: str | None) -> dict[str, Any]:
    if template == "chat":
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": _templated(prompt, template), "chosen": chosen, "rejected": rejected}


def _templated(prompt: str, template: str | None) -> str:
    return prompt if template is None else template.replace("{prompt}", prompt)
