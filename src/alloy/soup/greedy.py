"""Uniform and greedy model soups as pure selection rules over ingredient ids.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482 (Recipe 1):

    sort the ingredients by their own held-out score, best first
    soup <- {best}
    for each next ingredient theta_i:
        if score(average(soup + {theta_i})) is not worse than score(average(soup)):
            soup <- soup + {theta_i}

The uniform soup is the average of every ingredient. Both are written here against an injected
`score(subset) -> float` and a direction (`higher_is_better`), so the rule knows nothing of
models, files or data and is tested with a scripted evaluator.

Tie rules (documented in docs/soup.md):
- "Not worse" is `>=` when higher is better (accuracy) and `<=` when lower is better
  (perplexity), as in the paper: an ingredient that leaves the held-out score unchanged is kept,
  on the view that more averaging rarely hurts on unseen data.
- Ingredients with equal own scores keep the order they were given in (the sort is stable).
- A NaN score is never "not worse": a NaN ingredient is ranked last, a NaN soup is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class Step(Generic[T]):
    """One evaluation of a candidate soup."""

    tried: tuple[T, ...]  # what this step adds (one ingredient; all of them for a uniform soup)
    soup: tuple[T, ...]  # the candidate soup that was scored, best-ranked ingredient first
    score: float
    kept: bool  # whether the soup after this step is `soup`


@dataclass(frozen=True)
class Selection(Generic[T]):
    """The outcome of a soup: what went in, in which order, and every score on the way."""

    method: str  # "greedy" or "uniform"
    higher_is_better: bool
    individual: dict[T, float]  # each ingredient's own score
    order: tuple[T, ...]  # ingredients by own score, best first
    steps: tuple[Step[T], ...]
    chosen: tuple[T, ...]  # the final soup, in `order`
    score: float  # the final soup's score

    @property
    def best_ingredient(self) -> T:
        return self.order[0]


def not_worse(new: float, current: float, *, higher_is_better: bool) -> bool:
    """The greedy acceptance test: `new >= current` (or `<=`); False when either is NaN."""
    return new >= current if higher_is_better else new <= current


def rank(individual: dict[T, float], *, higher_is_better: bool) -> tuple[T, ...]:
    """Ingredients best first by their own score; equal scores keep their order; NaN last."""

    def key(ingredient: T) -> tuple[bool, float]:
        value = individual[ingredient]
        if math.isnan(value):
            return (True, 0.0)
        return (False, -value if higher_is_better else value)

    return tuple(sorted(individual, key=key))  # sorted() is stable


def _own_scores(
    ingredients: Sequence[T], score: Callable[[tuple[T, ...]], float]
) -> dict[T, float]:
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    if len(set(ingredients)) != len(ingredients):
        raise ValueError(f"ingredients must be distinct, got {list(ingredients)}")
    return {ingredient: float(score((ingredient,))) for ingredient in ingredients}


def greedy_soup(
    ingredients: Sequence[T],
    score: Callable[[tuple[T, ...]], float],
    *,
    higher_is_better: bool,
) -> Selection[T]:
    """Greedy soup: add ingredients best-first while the soup's score does not get worse.

    `score` is called once per ingredient alone, then once per further candidate soup
    (2n - 1 calls for n ingredients). The first step is the best ingredient alone; it is always
    kept, so the result is never worse than the best ingredient on the same data.

    Args:
        ingredients: distinct ids, in the order that breaks ties between equal own scores.
        score: held-out score of the uniform average of a subset (given best-ranked first).
        higher_is_better: True for accuracy, False for perplexity.
    """
    individual = _own_scores(ingredients, score)
    order = rank(individual, higher_is_better=higher_is_better)
    soup: tuple[T, ...] = (order[0],)
    current = individual[order[0]]
    steps = [Step((order[0],), soup, current, kept=True)]
    for ingredient in order[1:]:
        candidate = (*soup, ingredient)
        value = float(score(candidate))
        kept = not_worse(value, current, higher_is_better=higher_is_better)
        steps.append(Step((ingredient,), candidate, value, kept))
        if kept:
            soup, current = candidate, value
    return Selection("greedy", higher_is_better, individual, order, tuple(steps), soup, current)


def uniform_soup(
    ingredients: Sequence[T],
    score: Callable[[tuple[T, ...]], float],
    *,
    higher_is_better: bool,
) -> Selection[T]:
    """Uniform soup: every ingredient, averaged with equal weights (n + 1 calls of `score`).

    The ingredients are still scored alone, so the report can compare the soup with the best of
    them; the soup is kept whatever its score.
    """
    individual = _own_scores(ingredients, score)
    order = rank(individual, higher_is_better=higher_is_better)
    value = individual[order[0]] if len(order) == 1 else float(score(order))
    steps = (Step(order, order, value, kept=True),)
    return Selection("uniform", higher_is_better, individual, order, steps, order, value)


METHODS = {"greedy": greedy_soup, "uniform": uniform_soup}
