"""Evaluation: the referee every other capability is judged by (perplexity, bits per byte,
multiple-choice and preference accuracy) behind one `Scorer` protocol."""

from alloy.eval.data import EvalSet, load_eval_sets
from alloy.eval.run import EvalSettings, evaluate, markdown_table
from alloy.eval.scorer import ModelScorer, RewardScorer, Scorer, load_scorer

__all__ = [
    "EvalSet",
    "EvalSettings",
    "ModelScorer",
    "RewardScorer",
    "Scorer",
    "evaluate",
    "load_eval_sets",
    "load_scorer",
    "markdown_table",
]
