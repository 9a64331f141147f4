"""Decode-time combination of models: ensembles, negative evidence, DExperts, proxy-tuning,
contrastive decoding and dropout ensembles (see docs/ensemble.md)."""

from alloy.ensemble.decoder import Generation, Sampling
from alloy.ensemble.ensemble import Ensemble
from alloy.ensemble.filters import FILTERS, apply_filters
from alloy.ensemble.members import Member, MemberSpec, check_vocabularies, load_member
from alloy.ensemble.recipe import EnsembleRecipe, is_recipe_path, load_ensemble_recipe
from alloy.ensemble.rules import RULES, RuleSpec, get_rule

__all__ = [
    "FILTERS",
    "RULES",
    "Ensemble",
    "EnsembleRecipe",
    "Generation",
    "Member",
    "MemberSpec",
    "RuleSpec",
    "Sampling",
    "apply_filters",
    "check_vocabularies",
    "get_rule",
    "is_recipe_path",
    "load_ensemble_recipe",
    "load_member",
]
