"""Ensemble rules: pure functions from the members' next-token scores to one distribution.

Every rule takes `scores`, a (K, B, V) tensor of K members' logits *or* log-probabilities (each
member row is first normalised with log_softmax, so the two give the same answer), and returns
normalised fp32 log-probabilities (B, V). A token a member filter removed arrives as -inf and stays
removed. Rules with roles receive the members in the order of `RuleSpec.roles`; weighted rules take
one weight per member.

Shapes: K members, B rows, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from alloy.ensemble.filters import NEG_INF, top_p
from alloy.ranges import ANY, NON_NEGATIVE, Range


@dataclass(frozen=True)
class RuleSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    reference: str
    roles: tuple[str, ...] | None  # None: any number of members, one weight each
    params: dict[str, float] = field(default_factory=dict)  # name -> default
    ranges: dict[str, Range] = field(default_factory=dict)  # name -> valid values
    signed_weights: bool = False  # weights may be negative (otherwise >= 0 and summing to 1)
    layers: bool = False  # contrasts layers of one model: its final layer, then early exits

    @property
    def weighted(self) -> bool:
        return self.roles is None and not self.layers


RULES: dict[str, RuleSpec] = {}


def _rule(
    summary: str,
    reference: str,
    roles: tuple[str, ...] | None = None,
    signed_weights: bool = False,
    layers: bool = False,
    **params: tuple[float, Range],
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a rule; each keyword parameter is given as (default, valid range)."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if fn.__name__ in RULES:
            raise ValueError(f"ensemble rule {fn.__name__!r} is registered twice")
        defaults = {name: default for name, (default, _) in params.items()}
        ranges = {name: valid for name, (_, valid) in params.items()}
        RULES[fn.__name__] = RuleSpec(
            fn.__name__, fn, summary, reference, roles, defaults, ranges, signed_weights, layers
        )
        return fn

    return register


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """(..., V) logits or log-probabilities -> fp32 log-probabilities."""
    return torch.log_softmax(scores.float(), dim=-1)


def _weighted_sum(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * logprobs[k] (K, B, V) -> (B, V), with -inf wherever any member has -inf.

    Without the mask a filtered-out token (-inf) times a negative weight would become +inf. The
    clamp keeps the arithmetic finite (no inf - inf = NaN); those tokens are masked anyway.
    """
    removed = logprobs.amin(dim=0) == NEG_INF  # (B, V)
    total = torch.einsum("k,kbv->bv", weights, logprobs.clamp(min=-1e30))
    return total.masked_fill(removed, NEG_INF)


def _renormalise(scores: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """log_softmax of `scores` (B, V); a row where every token was removed takes `fallback`'s row
    (only possible when member filters leave no token in common)."""
    empty = scores.amax(dim=-1, keepdim=True) == NEG_INF  # (B, 1)
    # torch.where instead of `if empty.any()`: no host synchronisation per decoding step.
    return torch.log_softmax(torch.where(empty, fallback, scores), dim=-1)


@_rule(
    "mixture of probabilities: log sum_k w_k p_k (weights >= 0, summing to 1)",
    "Jelinek & Mercer (1980), interpolated estimation of Markov source parameters",
)
def linear(scores: torch.Tensor, *, weights: torch.Tensor) -> torch.Tensor:
    """log p(x) = logsumexp_k (log w_k + log p_k(x)), computed in log space (no underflow)."""
    logprobs = normalise(scores)  # (K, B, V)
    log_weights = torch.log(weights.float()).to(logprobs.device)[:, None, None]  # (K, 1, 1)
    return torch.logsumexp(logprobs + log_weights, dim=0)  # already normalised


@_rule(
    "product of experts: softmax(sum_k w_k log p_k); a negative weight is evidence against",
    "Klakow (1998), log-linear interpolation of LMs; Hinton (2002), products of experts",
    signed_weights=True,
)
def log_linear(scores: torch.Tensor, *, weights: torch.Tensor) -> torch.Tensor:
    """log p(x) = sum_k w_k log p_k(x) - log Z."""
    logprobs = normalise(scores)
    total = _weighted_sum(logprobs, weights.float().to(logprobs.device))
    return _renormalise(total, logprobs[0])


@_rule(
    "base + alpha (expert - anti_expert): steer a large base with a small tuned pair",
    "https://arxiv.org/abs/2401.08565",
    roles=("base", "expert", "anti_expert"),
    alpha=(1.0, ANY),  # negative steers away from the expert
)
def proxy_tuning(scores: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """log p(x) = log p_base(x) + alpha (log p_expert(x) - log p_anti(x)) - log Z.

    Liu et al. (2024) add logits; per-row constants cancel in the softmax, so log-probabilities
    give the same distribution.
    """
    logprobs = normalise(scores)
    weights = torch.tensor([1.0, alpha, -alpha], device=logprobs.device)
    return _renormalise(_weighted_sum(logprobs, weights), logprobs[0])


@_rule(
    "DExperts: the base's top-p nucleus, re-scored by + alpha (expert - anti_expert)",
    "https://arxiv.org/abs/2105.03023",
    roles=("base", "expert", "anti_expert"),
    alpha=(2.0, NON_NEGATIVE),
    top_p=(0.9, Range(0, 1, low_open=True)),
)
def dexperts(scores: torch.Tensor, *, alpha: float, top_p: float) -> torch.Tensor:
    """log p(x) = log p_base(x) + alpha (log p_expert(x) - log p_anti(x)) - log Z for x in the
    base's top-p nucleus, -inf outside it (Liu et al., 2021, section 2.1)."""
    logprobs = normalise(scores)
    base = _top_p(logprobs[0], top_p)
    return proxy_tuning(torch.stack([base, logprobs[1], logprobs[2]]), alpha=alpha)


_top_p = top_p  # the parameter named top_p shadows the filter inside `dexperts`


@_rule(
    "contrastive decoding: (1 + beta) expert - beta amateur, on the expert's plausible tokens",
    "https://arxiv.org/abs/2309.09117",
    roles=("expert", "amateur"),
    beta=(0.5, NON_NEGATIVE),
    alpha=(0.1, Range(0, 1, low_open=True)),  # the plausibility threshold
)
def contrastive(scores: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """score(x) = (1 + beta) log p_e(x) - beta log p_a(x) for x with p_e(x) >= alpha max p_e,
    -inf otherwise, then normalised (O'Brien & Lewis, 2023; the mask is Li et al.'s,
    https://arxiv.org/abs/2210.15097)."""
    logprobs = normalise(scores)
    expert = logprobs[0]
    floor = expert.max(dim=-1, keepdim=True).values + math.log(alpha)  # (B, 1)
    weights = torch.tensor([1.0 + beta, -beta], device=logprobs.device)
    total = _weighted_sum(logprobs, weights).masked_fill(expert < floor, NEG_INF)
    return _renormalise(total, expert)


@_rule(
    "DoLa: the final layer contrasted with the early layer that differs from it most (per token)",
    "https://arxiv.org/abs/2309.03883",
    layers=True,
    alpha=(0.1, Range(0, 1)),  # the adaptive plausibility threshold; 0: every token
    beta=(1.0, NON_NEGATIVE),  # strength of the contrast; 0 is the final layer alone
)
def dola(scores: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    """score(x) = log q_N(x) - beta log q_M(x) for x with q_N(x) >= alpha max q_N, -inf
    otherwise, then normalised (Chuang et al., ICLR 2024, eq. 2-4); alpha 0 drops that head.
    `scores[0]` is the model's final layer N, `scores[1:]` its candidate early exits; M is, for
    each row, the candidate with the largest Jensen-Shannon divergence from the final layer
    (`premature_layers`)."""
    logprobs = normalise(scores)  # (1 + J, B, V)
    mature = logprobs[0]
    chosen = premature_layers(logprobs)  # (B,) index into the candidates
    early = logprobs[1:].gather(0, chosen[None, :, None].expand(1, *mature.shape))[0]  # (B, V)
    # alpha 0 keeps every token the final layer allows (scoring a text, not decoding one)
    floor = mature.max(dim=-1, keepdim=True).values + (math.log(alpha) if alpha > 0 else NEG_INF)
    total = (mature - beta * early.clamp(min=-1e30)).masked_fill(mature < floor, NEG_INF)
    return _renormalise(total, mature)


def premature_layers(logprobs: torch.Tensor) -> torch.Tensor:
    """(1 + J, B, V) log-probabilities, final layer first -> (B,) index of the candidate farthest
    from the final layer by `layer_divergences`; the first of tied candidates wins.
    (transformers' DoLa picks one layer for the whole batch; this picks per row, as the paper
    describes.)"""
    return layer_divergences(logprobs).argmax(dim=0)


def layer_divergences(logprobs: torch.Tensor) -> torch.Tensor:
    """(1 + J, B, V) -> (J, B) JSD(q_N || q_j) = KL(q_N || m) / 2 + KL(q_j || m) / 2 with
    m = (q_N + q_j) / 2, in nats."""
    mature, early = logprobs[:1], logprobs[1:]  # (1, B, V), (J, B, V)
    middle = torch.logaddexp(mature, early) - math.log(2.0)  # log m, (J, B, V)

    def kl(lp: torch.Tensor) -> torch.Tensor:  # KL(p || m) summed over V; 0 log 0 = 0
        terms = lp.exp() * (lp - middle)
        return torch.where(lp == NEG_INF, 0.0, terms).sum(dim=-1)  # (J, B)

    return 0.5 * kl(mature) + 0.5 * kl(early)


def parameter_problems(
    spec: RuleSpec, params: Mapping[str, float]
) -> list[tuple[str, str, str | None]]:
    """(name, message, hint) for each of `params` that `spec` lacks or that is out of range."""
    from alloy.errors import did_you_mean

    problems: list[tuple[str, str, str | None]] = []
    for key, value in params.items():
        if key not in spec.ranges:
            problems.append((key, "unknown parameter", did_you_mean(key, spec.ranges, "takes")))
        elif problem := spec.ranges[key].problem(value):
            problems.append((key, problem, None))
    return problems


def get_rule(name: str) -> RuleSpec:
    from alloy.errors import InputError, did_you_mean

    if name not in RULES:
        raise InputError(f"unknown ensemble rule {name!r}; {did_you_mean(name, RULES, 'rules')}")
    return RULES[name]
