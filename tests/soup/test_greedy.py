"""Greedy and uniform soups as selection rules, driven by scripted evaluators.

Each scripted evaluator maps a subset of ingredient ids (as a frozenset) to a made-up held-out
score; the derivation of the expected soup is written in each test's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pytest

from alloy.soup import greedy_soup, not_worse, rank, uniform_soup

Script = dict[frozenset[str], float]


def scripted(table: dict[str, float]) -> tuple[Callable[[tuple[str, ...]], float], list[tuple]]:
    """A score function reading `table` (keys: ingredient ids joined by '+', any order)."""
    script: Script = {frozenset(key.split("+")): value for key, value in table.items()}
    calls: list[tuple] = []

    def score(subset: tuple[str, ...]) -> float:
        calls.append(subset)
        key = frozenset(subset)
        assert len(key) == len(subset), f"duplicate ingredient in {subset}"
        if key not in script:
            raise AssertionError(f"the scripted evaluator was not asked for {sorted(key)}")
        return script[key]

    return score, calls


def kept(steps: Iterable) -> list[bool]:
    return [step.kept for step in steps]


def test_accuracy_keeps_improvements_and_ties() -> None:
    """Higher is better. Own scores A .60, B .70, C .50, D .65 -> order B, D, A, C.

    step 1: {B} = .70, always kept.
    step 2: {B, D} = .72 >= .70 -> kept (soup .72).
    step 3: {B, D, A} = .71 < .72 -> rejected.
    step 4: {B, D, C} = .72 >= .72 -> kept: a tie counts as not worse (the paper's >=).
    Chosen {B, D, C} with .72; 4 own scores + 3 soups = 7 evaluations, no more.
    """
    score, calls = scripted(
        {
            "A": 0.60,
            "B": 0.70,
            "C": 0.50,
            "D": 0.65,
            "B+D": 0.72,
            "B+D+A": 0.71,
            "B+D+C": 0.72,
        }
    )
    result = greedy_soup(["A", "B", "C", "D"], score, higher_is_better=True)
    assert result.order == ("B", "D", "A", "C")
    assert [s.tried for s in result.steps] == [("B",), ("D",), ("A",), ("C",)]
    assert kept(result.steps) == [True, True, False, True]
    assert result.chosen == ("B", "D", "C")
    assert result.score == 0.72
    assert len(calls) == 2 * 4 - 1
    assert result.best_ingredient == "B"


def test_perplexity_lower_is_better() -> None:
    """Lower is better. Own perplexities p 12, q 10, r 11, s 30 -> order q, r, p, s.

    step 2: {q, r} = 9.5 <= 10 -> kept.
    step 3: {q, r, p} = 9.6 > 9.5 -> rejected (with accuracy's >= it would have been kept).
    step 4: {q, r, s} = 9.5 <= 9.5 -> kept (tie).
    """
    score, _ = scripted(
        {
            "p": 12.0,
            "q": 10.0,
            "r": 11.0,
            "s": 30.0,
            "q+r": 9.5,
            "q+r+p": 9.6,
            "q+r+s": 9.5,
        }
    )
    result = greedy_soup(["p", "q", "r", "s"], score, higher_is_better=False)
    assert result.order == ("q", "r", "p", "s")
    assert kept(result.steps) == [True, True, False, True]
    assert result.chosen == ("q", "r", "s")
    assert result.score == 9.5


def test_nothing_helps_keeps_the_best_ingredient_alone() -> None:
    """Every soup is worse than the best ingredient C (.9): the greedy soup is C alone, so it is
    never worse than the best ingredient on the held-out data."""
    score, _ = scripted({"A": 0.8, "B": 0.7, "C": 0.9, "C+A": 0.85, "C+B": 0.6})
    result = greedy_soup(["A", "B", "C"], score, higher_is_better=True)
    assert result.chosen == ("C",)
    assert result.score == 0.9
    assert kept(result.steps) == [True, False, False]


def test_a_rejected_ingredient_does_not_block_later_ones() -> None:
    """Order A .9, B .8, C .7: {A, B} = .85 rejected, then {A, C} (not {A, B, C}) = .95 kept."""
    score, calls = scripted({"A": 0.9, "B": 0.8, "C": 0.7, "A+B": 0.85, "A+C": 0.95})
    result = greedy_soup(["C", "B", "A"], score, higher_is_better=True)
    assert result.chosen == ("A", "C")
    assert calls[-1] == ("A", "C")


def test_equal_own_scores_keep_the_given_order() -> None:
    """A, B, C all score .5: the stable sort keeps the given order C, A, B, so C is the first
    ingredient; every soup also scores .5, so each is kept on the tie rule."""
    score, _ = scripted(
        {"A": 0.5, "B": 0.5, "C": 0.5, "C+A": 0.5, "C+A+B": 0.5},
    )
    result = greedy_soup(["C", "A", "B"], score, higher_is_better=True)
    assert result.order == ("C", "A", "B")
    assert result.chosen == ("C", "A", "B")


def test_nan_is_never_kept_and_ranks_last() -> None:
    """Higher is better. B's own score is NaN (e.g. a diverged fine-tune), so the order is
    C .7, A .6, B. {C, A} = NaN is rejected (NaN >= .7 is false); {C, B} = .1 < .7 is rejected.
    Lower is better: {A, B} = NaN is rejected as well (NaN <= 2 is false)."""
    score, _ = scripted({"A": 0.6, "B": math.nan, "C": 0.7, "C+A": math.nan, "C+B": 0.1})
    result = greedy_soup(["B", "A", "C"], score, higher_is_better=True)
    assert result.order == ("C", "A", "B")
    assert result.chosen == ("C",)
    lower, _ = scripted({"A": 2.0, "B": math.nan, "A+B": math.nan})
    assert greedy_soup(["B", "A"], lower, higher_is_better=False).chosen == ("A",)


def test_uniform_takes_everything_whatever_the_score() -> None:
    """Uniform: own scores (to rank and report), then the soup of all three, even though it is
    worse than the best ingredient (perplexity 15 > 10)."""
    score, calls = scripted({"a": 10.0, "b": 12.0, "c": 11.0, "a+b+c": 15.0})
    result = uniform_soup(["a", "b", "c"], score, higher_is_better=False)
    assert result.chosen == ("a", "c", "b")
    assert result.score == 15.0
    assert len(result.steps) == 1 and result.steps[0].kept
    assert len(calls) == 4


def test_single_ingredient_and_bad_input() -> None:
    score, calls = scripted({"a": 1.0})
    assert greedy_soup(["a"], score, higher_is_better=True).chosen == ("a",)
    assert uniform_soup(["a"], score, higher_is_better=True).score == 1.0
    assert len(calls) == 2
    with pytest.raises(ValueError, match="distinct"):
        greedy_soup(["a", "a"], score, higher_is_better=True)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], score, higher_is_better=True)


@pytest.mark.parametrize(
    ("new", "current", "higher", "expected"),
    [
        (0.5, 0.5, True, True),
        (0.4, 0.5, True, False),
        (9.0, 9.0, False, True),
        (9.1, 9.0, False, False),
        (math.nan, 1.0, True, False),
        (math.nan, 1.0, False, False),
    ],
)
def test_not_worse(new: float, current: float, higher: bool, expected: bool) -> None:
    assert not_worse(new, current, higher_is_better=higher) is expected


def test_rank_is_stable() -> None:
    assert rank({"x": 1.0, "y": 2.0, "z": 1.0}, higher_is_better=False) == ("x", "z", "y")
    assert rank({"x": 1.0, "y": 2.0, "z": 1.0}, higher_is_better=True) == ("y", "x", "z")
