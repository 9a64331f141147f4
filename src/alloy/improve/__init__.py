"""Self-improvement loops: sample, score, select, train, repeat (RAFT, ReST, self-rewarding).

Each iteration's training is an ordinary `alloy train` run; sampling goes through
`alloy.Ensemble`; reward models score as in `alloy eval`. See loop.py.
"""

from alloy.improve.judge import Judge, RewardModels, expected_score, parse_score, render
from alloy.improve.loop import improve
from alloy.improve.recipe import ImprovePlan, is_improve_recipe, load_improve_recipe

__all__ = [
    "ImprovePlan",
    "Judge",
    "RewardModels",
    "expected_score",
    "improve",
    "is_improve_recipe",
    "load_improve_recipe",
    "parse_score",
    "render",
]
