"""Weight averaging along training: EMA, SWA and LaWA, online (`WeightAverager`,
`AveragingCallback` for transformers' Trainer) and offline over saved checkpoints
(`average_checkpoints`, the `alloy average` command).

`AveragingCallback` is imported on first use, so importing this package does not import
transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alloy.average.averager import WeightAverager
from alloy.average.offline import AveragePlan, average_checkpoints, plan_average
from alloy.average.options import METHODS, AveragingOptions
from alloy.average.rules import swa_lr_factor

if TYPE_CHECKING:
    from alloy.average.callback import AveragingCallback

__all__ = [
    "METHODS",
    "AveragePlan",
    "AveragingCallback",
    "AveragingOptions",
    "WeightAverager",
    "average_checkpoints",
    "plan_average",
    "swa_lr_factor",
]


def __getattr__(name: str) -> Any:
    if name == "AveragingCallback":
        from alloy.average.callback import AveragingCallback

        return AveragingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
