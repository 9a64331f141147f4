"""Selection rules and judge parsing: hand-derived goldens."""

from __future__ import annotations

import math

import pytest
import torch

from alloy.improve import select as pick
from alloy.improve.judge import expected_score, parse_score, render

SCORES = [[0.1, 0.9, 0.5], [None, 0.2, 0.2], [0.7, None, None]]


def test_best_of_breaks_ties_by_sample_order_and_skips_missing_scores() -> None:
    assert pick.best_of(SCORES) == [(0, 1), (1, 1), (2, 0)]
    assert pick.best_of(SCORES, top_k=2) == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 0)]
    assert pick.best_of(SCORES, top_k=2, floor=0.5) == [(0, 1), (0, 2), (2, 0)]
    with pytest.raises(ValueError):
        pick.best_of(SCORES, top_k=0)


def test_threshold_and_quantile() -> None:
    assert pick.above(SCORES, 0.5) == [(0, 1), (0, 2), (2, 0)]
    # valid scores sorted: 0.1 0.2 0.2 0.5 0.7 0.9; q=0.5 sits halfway between 0.2 and 0.5
    assert pick.quantile(SCORES, 0.5) == pytest.approx(0.35)
    assert pick.quantile(SCORES, 0.0) == pytest.approx(0.1)
    assert pick.quantile(SCORES, 1.0) == pytest.approx(0.9)
    assert math.isnan(pick.quantile([[None]], 0.5))


def test_best_and_worst_pairs_skip_ties_and_single_scores() -> None:
    assert pick.best_and_worst(SCORES) == [(0, 1, 0)]  # prompt 1 ties, prompt 2 has one score
    assert pick.best_and_worst([[1.0, 3.0, 3.0, 1.0]]) == [(0, 1, 3)]
    assert pick.best_and_worst([[1.0, 1.5]], min_gap=0.5) == []
    assert pick.best_and_worst([[1.0, 1.6]], min_gap=0.5) == [(0, 1, 0)]


def test_agreement_counts_ties_and_missing_as_half() -> None:
    result = pick.agreement([2.0, 1.0, 3.0, None], [1.0, 2.0, 3.0, 1.0])
    assert result == {"accuracy": (1 + 0.5 + 0.5) / 4, "strict": 0.25, "ties": 0.5, "pairs": 4}


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("It is relevant and direct.\nScore: 4", 4.0),
        ("Score: 2 at first... on reflection Score: 3", 3.0),
        ("score=5", 5.0),
        ("**Score:** 4.5", 4.5),
        ("Score: 7", None),  # off the 0..5 scale
        ("Score: 12", None),
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_score(text: str, score: float | None) -> None:
    assert parse_score(text) == score


def test_render_leaves_braces_in_prompt_and_answer_alone() -> None:
    template = "Q: {prompt}\nA: {response}\n"
    assert render(template, "f({response})", "{prompt}!") == "Q: f({response})\nA: {prompt}!\n"


def test_expected_score_is_the_mean_digit_under_the_renormalised_mass() -> None:
    # Vocabulary of 8: ids 0..5 spell the digits, id 6 spells " 5" as well, id 7 is a word.
    digits = [[0], [1], [2], [3], [4], [5, 6]]
    logits = torch.full((2, 8), -1e9)
    logits[0, [2, 4]] = 0.0  # equal mass on 2 and 4: expected 3
    logits[0, 7] = 5.0  # mass outside the digits is ignored
    logits[1, [5, 6]] = 0.0  # both spellings of 5 ...
    logits[1, 1] = math.log(2.0)  # ... against twice the mass on 1: (2*1 + 1*5 + 1*5) / 4
    assert expected_score(logits, digits).tolist() == pytest.approx([3.0, 3.0])
