"""Preference strength: how strongly an ensemble of scorers agrees with each pair's label.

For pair i and scorer k, d_ki = score_k(prompt + chosen) − score_k(prompt + rejected): a reward
model's reward difference, or a causal LM's difference of summed answer log-probabilities. Over
the K scorers, the pair's strength is the mean μ_i of d_ki and its spread the sample standard
deviation σ_i (Secrets of RLHF II). With a band b (default 1):

- `clean`:        μ_i >  b·σ_i  (the scorers agree with the label beyond their disagreement)
- `ambiguous`:   |μ_i| ≤ b·σ_i  (the sign of μ_i is within the scorers' disagreement)
- `mislabelled`:  μ_i < −b·σ_i  (they agree the other answer is better)

With one scorer σ = 0 and the flag is the sign of d (0: ambiguous). `standardize` divides each
scorer's differences by their standard deviation over the pairs first, so that scorers on other
scales (a reward model and an LM's log-likelihood) weigh the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Flag = Literal["clean", "ambiguous", "mislabelled"]
FLAGS: tuple[Flag, ...] = ("clean", "ambiguous", "mislabelled")


@dataclass(frozen=True)
class Strength:
    """Per pair: mean and standard deviation of the differences, and the flag they give."""

    mean: torch.Tensor  # (N,) float64
    std: torch.Tensor  # (N,) float64; zeros for one scorer
    flags: tuple[Flag, ...]


def standardize(differences: torch.Tensor) -> torch.Tensor:
    """Each scorer's row (K, N) divided by its standard deviation over the pairs it scored (NaN:
    not scored); a scorer that scores every pair alike is left as it is."""
    rows = []
    for row in differences:
        seen = row[~torch.isnan(row)]
        scale = float(seen.std()) if seen.numel() > 1 else 0.0
        rows.append(row / scale if scale > 0 else row)
    return torch.stack(rows)


def holdout_assignment(pairs: int, models: int, held: int, seed: int = 0) -> torch.Tensor:
    """(models, pairs) bool: True where a model holds a pair out of its training data. Each pair
    is held out by exactly `held` models, chosen at random (seeded), and the models' shares are
    balanced, so every pair gets `held` scores from models that never saw it.

    Raises:
        ValueError: not 1 <= held < models.
    """
    if not 1 <= held < models:
        raise ValueError(f"held must be in [1, {models}), got {held}")
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros((models, pairs), dtype=torch.bool)
    load = torch.zeros(models)
    for i in torch.randperm(pairs, generator=generator).tolist():
        # The least-loaded models first, ties broken at random: shares stay within one pair.
        noise = torch.rand(models, generator=generator)
        chosen = torch.argsort(load + noise * 0.5)[:held]
        out[chosen, i] = True
        load[chosen] += 1
    return out


def strength(differences: torch.Tensor, band: float = 1.0) -> Strength:
    """`differences` (K scorers, N pairs) -> per-pair mean, spread and flag (module docstring).
    A NaN entry is a pair that scorer did not score (it trained on it): the pair's statistics
    use the other scorers.

    Raises:
        ValueError: `differences` is not a non-empty 2-D tensor, or `band` is negative.
    """
    if differences.dim() != 2 or differences.numel() == 0:
        raise ValueError(f"differences must be (scorers, pairs), got {tuple(differences.shape)}")
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    d = differences.double()
    seen = ~torch.isnan(d)
    count = seen.sum(dim=0)
    if bool((count == 0).any()):
        raise ValueError("every pair needs at least one score (a column is all NaN)")
    mean = torch.where(seen, d, 0.0).sum(dim=0) / count
    spread = torch.where(seen, d - mean, 0.0).pow(2).sum(dim=0)
    std = torch.where(count > 1, spread / (count - 1).clamp(min=1), 0.0).sqrt()
    flags: list[Flag] = []
    for m, s in zip(mean.tolist(), std.tolist(), strict=True):
        flags.append("clean" if m > band * s else "mislabelled" if m < -band * s else "ambiguous")
    return Strength(mean, std, tuple(flags))


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` ranking the `positive` items first: the chance that
    a random positive scores above a random negative, ties counted half (Mann-Whitney U).

    Raises:
        ValueError: lengths differ, or one class is empty.
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores for {len(positive)} labels")
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        raise ValueError("auroc needs at least one positive and one negative item")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


Action = Literal["keep", "drop", "flip"]


def filter_records(
    records: Sequence[dict[str, Any]],
    flags: Sequence[Flag],
    *,
    mislabelled: Action = "flip",
    ambiguous: Action = "drop",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The data set cleaned by the flags: clean pairs kept, mislabelled and ambiguous ones kept,
    dropped or flipped (chosen and rejected swapped) as asked. Every other field of a record is
    kept. Returns the records and the count of each action taken."""
    if len(records) != len(flags):
        raise ValueError(f"{len(records)} records for {len(flags)} flags")
    out: list[dict[str, Any]] = []
    counts = {"kept": 0, "dropped": 0, "flipped": 0}
    for record, flag in zip(records, flags, strict=True):
        action: Action = (
            "keep" if flag == "clean" else mislabelled if flag == "mislabelled" else ambiguous
        )
        if action == "drop":
            counts["dropped"] += 1
            continue
        if action == "flip":
            record = {**record, "chosen": record["rejected"], "rejected": record["chosen"]}
            counts["flipped"] += 1
        else:
            counts["kept"] += 1
        out.append(record)
    return out, counts


def summary(result: Strength, names: Sequence[str]) -> dict[str, Any]:
    """Counts per flag, quantiles of the mean difference, and each scorer named."""
    mean = result.mean
    quantiles = torch.quantile(mean, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=mean.dtype))
    return {
        "pairs": len(result.flags),
        "scorers": list(names),
        "flags": {flag: result.flags.count(flag) for flag in FLAGS},
        "mean_difference": {
            "mean": float(mean.mean()),
            **{
                f"q{int(q * 100):02d}": float(v)
                for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), quantiles, strict=True)
            },
        },
        "mean_std": float(result.std.mean()),
    }
