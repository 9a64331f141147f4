"""Sparse mixtures of experts: the routing layer (upcycling dense models lands next)."""

from alloy.moe.layer import Routed, SparseMoE

__all__ = ["Routed", "SparseMoE"]
