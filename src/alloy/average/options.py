"""The options of an online averager, checked once with every problem reported together.

Kept apart from the averager so that `AveragingCallback` can check its recipes when it is built,
long before the Trainer hands it a model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from alloy.errors import InputError, ProblemCollector
from alloy.ranges import Range

Method = Literal["ema", "swa", "lawa"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_DECAY = 0.999
DEFAULT_K = 5

# The valid range of every numeric option, shared by the online averagers and `alloy average`.
RANGES: dict[str, Range] = {
    "decay": Range(0, 1, high_open=True),
    "start": Range(0),
    "every": Range(1),
    "k": Range(1),
}
# Options that only one method reads; giving them to another is an error, not silently ignored.
_ONLY = {"decay": "ema", "warmup": "ema", "bias_correction": "ema", "k": "lawa"}


@dataclass(frozen=True)
class AveragingOptions:
    """What to average and when (see `WeightAverager` for the meaning of each field)."""

    method: Method
    decay: float = DEFAULT_DECAY
    warmup: bool = False
    bias_correction: bool = False
    start: int = 0
    every: int = 1
    k: int = DEFAULT_K
    offload: bool = False
    average_buffers: bool = False
    trainable_only: bool = False
    # Fuse the cast of low-precision weights into the lerp (torch.compile); None: decide from
    # the model (see WeightAverager).
    compile: bool | None = None

    @classmethod
    def check(cls, method: str, *, where: str = "", **given: Any) -> AveragingOptions:
        """Validate `method` and the options a user gave (None meaning "not given").

        Raises:
            InputError: listing every problem: unknown method or option, an option of another
                method, a value of the wrong type or out of range.
        """
        problems = ProblemCollector()
        at = f"{where}." if where else ""
        fields = set(cls.__dataclass_fields__) - {"method"}
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose {', '.join(METHODS)}"
            problems.add(f"{at}method", f"unknown averaging method {method!r}", hint)
        values: dict[str, Any] = {}
        for name, value in given.items():
            if name not in fields:
                close = difflib.get_close_matches(name, sorted(fields), n=1)
                problems.add(
                    f"{at}{name}",
                    "unknown option",
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"options: {', '.join(sorted(fields))}",
                )
            elif value is None:
                continue
            elif name in _ONLY and method in METHODS and _ONLY[name] != method:
                problems.add(
                    f"{at}{name}", f"applies to method {_ONLY[name]!r} only, not {method!r}"
                )
            else:
                values[name] = value
        for name, value in values.items():
            problem = _check_value(name, value)
            if problem:
                problems.add(f"{at}{name}", problem)
        problems.raise_if_any(InputError, "invalid weight-averaging options")
        if "decay" in values:
            values["decay"] = float(values["decay"])
        return cls(method=cast(Method, method), **values)


def _check_value(name: str, value: Any) -> str | None:
    if name == "decay":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        return RANGES[name].problem(value)
    if name in RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        return RANGES[name].problem(value)
    if not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    return None
