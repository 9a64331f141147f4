"""Valid ranges of numeric parameters, declared once where a parameter is registered.

Merge methods, ensemble rules and averagers attach a `Range` to each numeric parameter so that
recipe validation, `alloy methods` and the docs all read the same bounds. Every range holds
finite numbers only: NaN, +-inf and magnitudes beyond float32's range are outside all of them.

>>> Range(0, 1).problem(1.5)
'must be in [0, 1], got 1.5'
>>> str(Range(0, 1, low_open=True))
'(0, 1]'
>>> Range().problem(float("nan"))
'must be a finite number (within ±3.4e38, float32 range), got nan'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT32_MAX = 3.4028234663852886e38  # parameters are applied in float32 arithmetic


@dataclass(frozen=True)
class Range:
    """An interval of finite numbers; `low`/`high` of None mean unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return self.problem(value) is None

    def problem(self, value: float) -> str | None:
        """Why `value` is outside the range, or None if it is inside."""
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            return f"must be a finite number (within ±3.4e38, float32 range), got {value:g}"
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        return f"must be {self.phrase()}, got {value:g}" if below or above else None

    def phrase(self) -> str:
        """'in [0, 1]', 'at least 1', '> 0', 'finite' — for messages."""
        if self.low is not None and self.high is not None:
            return f"in {self}"
        if self.low is not None:
            return f"> {_num(self.low)}" if self.low_open else f"at least {_num(self.low)}"
        if self.high is not None:
            return f"< {_num(self.high)}" if self.high_open else f"at most {_num(self.high)}"
        return "a finite number"

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "any"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _num(self.low)
        high = "inf" if self.high is None else _num(self.high)
        return f"{left}{low}, {high}{right}"


def _num(x: float) -> str:
    return f"{x:g}"


ANY = Range()
UNIT = Range(0, 1)  # a fraction or an interpolation factor
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
