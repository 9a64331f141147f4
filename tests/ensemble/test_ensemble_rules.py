"""Rule and filter goldens, each derived by hand in its docstring, plus contract checks."""

from __future__ import annotations

import math

import pytest
import torch

from alloy.ensemble.filters import apply_filters, min_p, temperature, top_k, top_p
from alloy.ensemble.rules import RULES, contrastive, dexperts, linear, log_linear, proxy_tuning

NEG_INF = float("-inf")


def lp(*probs: float) -> torch.Tensor:
    """A (1, V) row of log-probabilities."""
    return torch.tensor([probs]).log()


def probs(logprobs: torch.Tensor) -> list[float]:
    return [round(v, 6) for v in logprobs.exp()[0].tolist()]


def test_linear_golden() -> None:
    """p1 = (0.5, 0.5, 0), p2 = (0.1, 0.2, 0.7), w = (0.25, 0.75):
    0.25 p1 + 0.75 p2 = (0.125 + 0.075, 0.125 + 0.15, 0.525) = (0.2, 0.275, 0.525)."""
    scores = torch.stack([lp(0.5, 0.5, 0.0), lp(0.1, 0.2, 0.7)])
    out = linear(scores, weights=torch.tensor([0.25, 0.75]))
    assert probs(out) == pytest.approx([0.2, 0.275, 0.525], abs=1e-6)


def test_log_linear_golden_with_negative_weight() -> None:
    """p1 = (0.5, 0.25, 0.25), p2 = (0.25, 0.5, 0.25), w = (2, -1):
    p1^2 / p2 = (1, 0.125, 0.25) -> normalised by 1.375 = (8/11, 1/11, 2/11)."""
    scores = torch.stack([lp(0.5, 0.25, 0.25), lp(0.25, 0.5, 0.25)])
    out = log_linear(scores, weights=torch.tensor([2.0, -1.0]))
    assert probs(out) == pytest.approx([8 / 11, 1 / 11, 2 / 11], abs=1e-6)


def test_logits_and_logprobs_give_the_same_result() -> None:
    """Adding a per-row constant to a member's logits changes nothing: every rule normalises."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 50) * 3  # (K, B, V)
    shifted = logits + torch.randn(3, 4, 1) * 10
    logprobs = torch.log_softmax(logits, dim=-1)
    for name, spec in RULES.items():
        k = len(spec.roles) if spec.roles else 3
        kwargs = {"weights": torch.tensor([0.2, 0.3, 0.5])} if spec.weighted else dict(spec.params)
        expected = spec.fn(logprobs[:k], **kwargs)
        for variant in (logits[:k], shifted[:k]):
            torch.testing.assert_close(spec.fn(variant, **kwargs), expected, msg=name)


def test_proxy_tuning_golden() -> None:
    """base (0.5, 0.5), expert (0.8, 0.2), anti (0.5, 0.5), alpha 1:
    0.5 * 0.8 / 0.5 : 0.5 * 0.2 / 0.5 = 0.8 : 0.2."""
    scores = torch.stack([lp(0.5, 0.5), lp(0.8, 0.2), lp(0.5, 0.5)])
    assert probs(proxy_tuning(scores, alpha=1.0)) == pytest.approx([0.8, 0.2])
    """alpha 2: 0.5 * (0.8/0.5)^2 : 0.5 * (0.2/0.5)^2 = 1.28 : 0.08 -> 16/17, 1/17."""
    assert probs(proxy_tuning(scores, alpha=2.0)) == pytest.approx([16 / 17, 1 / 17], abs=1e-6)


def test_dexperts_truncates_the_base_first() -> None:
    """base (0.6, 0.3, 0.1), top_p 0.8 keeps (0.6, 0.3) -> (2/3, 1/3); expert favours token 2 by
    100x but it is outside the nucleus; experts (0.1, 0.2, 0.7) / (0.2, 0.1, 0.7), alpha 1:
    2/3 * 0.5 : 1/3 * 2 = 1/3 : 2/3 -> (1/3, 2/3, 0)."""
    scores = torch.stack([lp(0.6, 0.3, 0.1), lp(0.1, 0.2, 0.7), lp(0.2, 0.1, 0.7)])
    out = dexperts(scores, alpha=1.0, top_p=0.8)
    assert probs(out) == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-6)


def test_contrastive_golden() -> None:
    """expert (0.6, 0.3, 0.08, 0.02), amateur (0.7, 0.1, 0.1, 0.1), beta 1, alpha 0.1:
    token 3 has 0.02 < 0.1 * 0.6 and is masked; scores p_e^2 / p_a = (0.36/0.7, 0.09/0.1,
    0.0064/0.1) = (0.514286, 0.9, 0.064); normalised by 1.478286."""
    scores = torch.stack([lp(0.6, 0.3, 0.08, 0.02), lp(0.7, 0.1, 0.1, 0.1)])
    out = contrastive(scores, beta=1.0, alpha=0.1)
    z = 0.36 / 0.7 + 0.9 + 0.064
    assert probs(out) == pytest.approx([0.36 / 0.7 / z, 0.9 / z, 0.064 / z, 0.0], abs=1e-6)


def test_filtered_token_stays_removed_under_negative_weight() -> None:
    """A token a member filter removed (-inf) must not come back as +inf through a negative
    weight: it is removed from the product."""
    member = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), dim=-1)
    filtered = member.clone()
    filtered[0, 2] = NEG_INF
    out = log_linear(torch.stack([member, filtered]), weights=torch.tensor([1.0, -0.5]))
    assert out[0, 2] == NEG_INF and torch.isfinite(out[0, :2]).all()
    assert out.exp().sum().item() == pytest.approx(1.0)


def test_identical_members_give_the_member() -> None:
    """K copies of one distribution: linear and log-linear with weights summing to 1 return it."""
    one = torch.log_softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(1)), -1)
    stacked = torch.stack([one, one, one])
    weights = torch.tensor([0.5, 0.2, 0.3])
    torch.testing.assert_close(linear(stacked, weights=weights), one)
    torch.testing.assert_close(log_linear(stacked, weights=weights), one)


def test_filter_goldens() -> None:
    """p = (0.5, 0.3, 0.15, 0.05): top_k 2 -> (0.625, 0.375); top_p 0.8 keeps tokens whose mass
    above is < 0.8: 0, 0.5, 0.8 -> first two; min_p 0.25 keeps p >= 0.125 -> first three
    (0.5, 0.3, 0.15)/0.95; temperature 0.5 squares: (0.25, 0.09, 0.0225, 0.0025)/0.365."""
    row = lp(0.5, 0.3, 0.15, 0.05)
    assert probs(top_k(row, 2)) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    assert probs(top_p(row, 0.8)) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    kept = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]
    assert probs(min_p(row, 0.25)) == pytest.approx(kept, abs=1e-6)
    expected = [v / 0.365 for v in (0.25, 0.09, 0.0225, 0.0025)]
    assert probs(temperature(row, 0.5)) == pytest.approx(expected, abs=1e-6)


def test_top_p_always_keeps_the_top_token() -> None:
    row = lp(0.9, 0.05, 0.05)
    assert probs(top_p(row, 0.01)) == pytest.approx([1.0, 0.0, 0.0])


def test_apply_filters_order_is_canonical() -> None:
    """temperature applies before top_p, whatever order the mapping lists them in:
    p = (0.6, 0.4) at temperature 0.25 -> (0.6^4, 0.4^4) -> (0.835, 0.165); top_p 0.8 then
    keeps only token 0. Had top_p come first both tokens would survive."""
    row = lp(0.6, 0.4)
    out = apply_filters(row, {"top_p": 0.8, "temperature": 0.25})
    assert probs(out) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_contract(name: str) -> None:
    """Every rule: (K, B, V) -> normalised (B, V) fp32, finite where the rule keeps a token,
    from fp16 inputs too."""
    spec = RULES[name]
    k = len(spec.roles) if spec.roles else 3
    scores = torch.randn(k, 5, 40, generator=torch.Generator().manual_seed(2)).half()
    kwargs = {"weights": torch.full((k,), 1 / k)} if spec.weighted else dict(spec.params)
    out = spec.fn(scores, **kwargs)
    assert out.shape == (5, 40) and out.dtype == torch.float32
    assert out.exp().sum(-1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)
    assert not torch.isnan(out).any() and math.isfinite(out.max().item())
    assert spec.reference and spec.summary


def test_no_common_token_falls_back_to_the_first_member() -> None:
    """Member filters that leave disjoint supports: the row takes the first member's (filtered)
    distribution instead of becoming NaN."""
    first = torch.tensor([[0.0, NEG_INF, NEG_INF]]).log_softmax(-1)
    second = torch.tensor([[NEG_INF, 0.0, 0.0]]).log_softmax(-1)
    out = log_linear(torch.stack([first, second]), weights=torch.tensor([0.5, 0.5]))
    assert probs(out) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "settings", [{"top_p": 0.7}, {"top_k": 3}, {"min_p": 0.2}, {"temperature": 0.5}]
)
def test_filters_accept_logits(settings: dict[str, float]) -> None:
    """Members hand raw logits to their filters: the result is the same as from log-probs."""
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(5)) * 3 + 7
    expected = apply_filters(torch.log_softmax(logits, -1), settings)
    torch.testing.assert_close(apply_filters(logits, settings), expected)


# Per row: a nucleus inside the top 64 (8), one beyond it (0.5), and a batch mixing both.
@pytest.mark.parametrize("scales", [[8.0] * 6, [0.5] * 6, [8.0, 0.5, 0.5, 8.0, 8.0, 0.5]])
def test_top_p_partial_sort_keeps_what_a_full_sort_keeps(scales: list[float]) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=g) * torch.tensor(scales)[:, None]
    logprobs = torch.log_softmax(logits, dim=-1)
    ranked, order = torch.sort(logprobs, dim=-1, descending=True)
    above = torch.cumsum(ranked.exp(), dim=-1) - ranked.exp()
    keep = torch.zeros_like(logprobs, dtype=torch.bool).scatter(-1, order, above < 0.9)
    got = top_p(logprobs, 0.9)
    assert torch.equal(torch.isfinite(got), keep)
    expected = torch.log_softmax(logprobs.masked_fill(~keep, float("-inf")), dim=-1)
    assert torch.allclose(got[keep], expected[keep], atol=1e-6)
