"""Training objectives, one file each, registered by name (see base.py)."""

from alloy.train.objectives import causal_lm as _causal_lm  # noqa: F401  (registers)
from alloy.train.objectives import context_distill as _context_distill  # noqa: F401
from alloy.train.objectives import distill as _distill  # noqa: F401
from alloy.train.objectives import dpo as _dpo  # noqa: F401
from alloy.train.objectives import mtp as _mtp  # noqa: F401
from alloy.train.objectives import reward as _reward  # noqa: F401
from alloy.train.objectives.base import (
    OBJECTIVES,
    LossParts,
    Objective,
    ObjectiveContext,
    ObjectiveSpec,
    objective,
)

__all__ = ["OBJECTIVES", "LossParts", "Objective", "ObjectiveContext", "ObjectiveSpec", "objective"]
