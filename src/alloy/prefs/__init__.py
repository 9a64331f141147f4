"""Preference data: strength of each pair under an ensemble of scorers (Secrets of RLHF II)."""

from alloy.prefs.strength import FLAGS, Strength, auroc, filter_records, standardize, strength

__all__ = ["FLAGS", "Strength", "auroc", "filter_records", "standardize", "strength"]
