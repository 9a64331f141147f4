"""Filters over one next-token distribution: temperature, top-k, top-p (nucleus) and min-p.

The same pure functions serve two named stages of the decoder: *member filters*, applied to one
member's distribution before the rule combines members (DExperts truncates its base this way), and
*warpers*, applied to the combined distribution before a token is picked. Each takes fp32 logits
or log-probabilities `(B, V)` and returns normalised log-probabilities; a removed token gets
`-inf`. The top token of a row always survives, so no row is ever left empty.

Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def temperature(logprobs: torch.Tensor, value: float) -> torch.Tensor:
    """Sharpen (`value < 1`) or flatten (`> 1`): `log_softmax(logprobs / value)`."""
    return torch.log_softmax(logprobs / value, dim=-1)


def top_k(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` most likely tokens of each row (ties at the k-th value are all kept)."""
    if k >= logprobs.shape[-1]:
        return torch.log_softmax(logprobs, dim=-1)
    kth = torch.topk(logprobs, k, dim=-1).values[:, -1:]  # (B, 1)
    return torch.log_softmax(logprobs.masked_fill(logprobs < kth, NEG_INF), dim=-1)


def top_p(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus).

    A token is kept when the probability of the tokens ranked strictly above it is below `p`, so
    the top token always stays and the set is the smallest reaching `p` (Holtzman et al., 2020).
    """
    logprobs = torch.log_softmax(logprobs, dim=-1)  # the mass needs probabilities
    if p >= 1.0:
        return logprobs
    vocab = logprobs.shape[-1]
    # A peaked nucleus is a few dozen tokens: rank only each row's top 64 (a partial sort, far
    # cheaper than sorting the vocabulary), and fully sort just the rows whose top 64 hold less
    # than p. The kept set is the same as a full sort's (up to the order of exactly tied
    # probabilities).
    out = torch.full_like(logprobs, NEG_INF)
    ranked, order = torch.topk(logprobs, min(64, vocab), dim=-1)  # (B, m), descending
    short = torch.cumsum(ranked.exp(), dim=-1)[:, -1] < p  # (B,) rows needing the full sort
    out.scatter_(-1, order, _nucleus(ranked, p))
    if bool(short.any()):
        rows = short.nonzero().squeeze(1)
        ranked, order = torch.sort(logprobs[rows], dim=-1, descending=True)
        out[rows] = torch.full_like(ranked, NEG_INF).scatter(-1, order, _nucleus(ranked, p))
    return torch.log_softmax(out, dim=-1)


def _nucleus(ranked: torch.Tensor, p: float) -> torch.Tensor:
    """Descending log-probabilities with the tokens outside the nucleus set to -inf."""
    probs = ranked.exp()
    above = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each ranked token
    return ranked.masked_fill(above >= p, NEG_INF)


def min_p(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `p` times the top probability (Nguyen et al.,
    2024, https://arxiv.org/abs/2407.01082)."""
    if p <= 0.0:
        return torch.log_softmax(logprobs, dim=-1)
    threshold = logprobs.max(dim=-1, keepdim=True).values + math.log(p)  # (B, 1)
    return torch.log_softmax(logprobs.masked_fill(logprobs < threshold, NEG_INF), dim=-1)


def repetition_penalty(logprobs: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019, https://arxiv.org/abs/1909.05858) on the
    tokens a row has already seen (`seen`: (B, V) bool): a score s becomes s * penalty when s < 0
    and s / penalty otherwise, then the row is normalised. On log-probabilities (never positive)
    that multiplies a seen token's log-probability by `penalty`; transformers applies the same
    map to raw logits, so on a plain model the two differ. DoLa's decoding uses 1.2."""
    scores = torch.log_softmax(logprobs, dim=-1)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.log_softmax(torch.where(seen, penalised, scores), dim=-1)


@dataclass(frozen=True)
class FilterSpec:
    fn: Callable[[torch.Tensor, float], torch.Tensor]
    kind: type
    valid: Callable[[float], bool]
    requirement: str


# Applied in this order whatever order a recipe lists them in (temperature first, as transformers'
# samplers do, so truncation sees the tempered distribution).
FILTERS: dict[str, FilterSpec] = {
    "temperature": FilterSpec(temperature, float, lambda v: v > 0, "a number > 0"),
    "top_k": FilterSpec(top_k, int, lambda v: v >= 1, "an integer >= 1"),  # type: ignore[arg-type]
    "top_p": FilterSpec(top_p, float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": FilterSpec(min_p, float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def check_filters(settings: Mapping[str, object]) -> list[tuple[str, str]]:
    """Problems with a filter mapping, as (key, message) pairs."""
    from alloy.errors import did_you_mean

    problems = []
    for name, value in settings.items():
        spec = FILTERS.get(name)
        if spec is None:
            problems.append((name, f"unknown filter; {did_you_mean(name, FILTERS, 'filters')}"))
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if spec.kind is int and not isinstance(value, int):
            number = False
        if not number or not spec.valid(value):  # type: ignore[arg-type]
            problems.append((name, f"must be {spec.requirement}, got {value!r}"))
    return problems


def apply_filters(logprobs: torch.Tensor, settings: Mapping[str, float | int]) -> torch.Tensor:
    """Apply the filters named in `settings` (name -> value) in the canonical order."""
    for name, spec in FILTERS.items():
        if name in settings and settings[name] is not None:
            logprobs = spec.fn(logprobs, settings[name])
    return logprobs
