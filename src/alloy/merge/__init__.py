"""Weight-space merging: recipe -> plan -> streaming engine, over the methods in the registry.

alloy.merge.merge("recipe.yaml", "out")          # files in, files out
alloy.merge.merge_state_dicts("ties", [a, b], base=base, weight=[1, 1], density=0.5)
"""

from alloy.merge.api import merge, merge_state_dicts, plan

__all__ = ["merge", "merge_state_dicts", "plan"]
