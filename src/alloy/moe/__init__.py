"""Sparse mixtures of experts: the routing layer, and upcycling dense models into MoE checkpoints
(Mixtral, Qwen2-MoE, Qwen3-MoE) with a routing report."""

from alloy.moe.layer import Routed, SparseMoE
from alloy.moe.recipe import MoeRecipe, load_moe_recipe, upcycle_recipe
from alloy.moe.upcycle import UpcycleResult, upcycle

__all__ = [
    "MoeRecipe",
    "Routed",
    "SparseMoE",
    "UpcycleResult",
    "load_moe_recipe",
    "upcycle",
    "upcycle_recipe",
]
