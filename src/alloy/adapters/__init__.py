"""Adapters: PEFT adapter folders read and written by alloy, their exact maths, and folding.

`delta.py` holds the pure maths (updates, folding, exact sums, SVD truncation), `peftfile.py`
the PEFT folder format, `adapted.py` the `BASE+ADAPTER` view the merge engine and MoE read.
PEFT itself is imported only where adapter modules are trained (alloy.train).
"""

from alloy.adapters.adapted import AdaptedCheckpoint, open_adapted, open_model, split_spec
from alloy.adapters.delta import Factors, Truncation, concat, delta, fold, truncate
from alloy.adapters.peftfile import Adapter, is_adapter, read_adapter, write_lora

__all__ = [
    "AdaptedCheckpoint",
    "Adapter",
    "Factors",
    "Truncation",
    "concat",
    "delta",
    "fold",
    "is_adapter",
    "open_adapted",
    "open_model",
    "read_adapter",
    "split_spec",
    "truncate",
    "write_lora",
]
