"""Exact rank thresholds over a stream of blocks, in linear time, without sorting.

Magnitude trimming needs "the k largest of n magnitudes". Sorting costs O(n log n) and is where
mergekit spends most of a TIES merge, and it needs the whole tensor at once. Magnitudes are
non-negative, so their IEEE-754 bit patterns, read as integers, sort exactly like the values:
radix selection on those bits finds the k-th largest value with one histogram of 16-bit digits
per pass (2 passes for float32, 4 for float64), each pass a `bincount` over the blocks. The
blocks can come from disk one at a time.

Entries equal to the threshold are admitted lowest index first (what a stable sort does), counted
across blocks in order by a `TieQuota`, so the selection is exact and deterministic.
"""

from __future__ import annotations

import torch

_DIGIT = 16
_BINS = 1 << _DIGIT
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
_MAGNITUDE = {torch.float32: (1 << 31) - 1, torch.float64: (1 << 63) - 1}


def radix_passes(dtype: torch.dtype) -> int:
    """Passes needed to select among values of `dtype` (float32: 2, float64: 4)."""
    if dtype not in _INT:
        raise ValueError(f"rank selection works on float32 or float64, not {dtype}")
    return dtype.itemsize * 8 // _DIGIT


class RankSelect:
    """Find the r-th largest of non-negative values seen in blocks, for several ranks r.

    Feed every block's values to `reduce(step, values)` for step = 0 .. passes - 1, calling
    `end(step)` after each pass. Then `threshold[j]`, `greater[j]` (entries strictly larger) and
    `equal[j]` (entries equal to it) describe rank `ranks[j]` (1-based, counted from the top).
    """

    def __init__(self, ranks: list[int], dtype: torch.dtype) -> None:
        self.ranks = ranks
        self.dtype = dtype
        self.passes = radix_passes(dtype)
        self._bits = dtype.itemsize * 8
        self._prefix = [0] * len(ranks)  # digits found so far, per rank
        self._above = [0] * len(ranks)  # entries above the prefix's range, per rank
        self._counts: list[torch.Tensor | None] = [None] * len(ranks)
        self.threshold: list[torch.Tensor] = []
        self.greater: list[int] = []
        self.equal: list[int] = []

    def reduce(self, step: int, values: torch.Tensor, *, signed: bool = False) -> None:
        """Count one block of non-negative `values` (with `signed`, of their magnitudes: the
        sign bit is masked off, which is cheaper than taking the absolute value)."""
        bits = values.reshape(-1).view(_INT[self.dtype])  # [n]; ordered like the values
        if signed:
            bits = bits & _MAGNITUDE[self.dtype]
        shift = self._bits - _DIGIT * (step + 1)
        # The top digit needs no mask: the sign bit of a magnitude is clear.
        top = bits >> shift if step == 0 else None
        for j in range(len(self.ranks)):
            # After the first pass, only entries whose higher digits equal the prefix take part.
            if top is not None:
                selected = top
            else:
                inside = bits[(bits >> (shift + _DIGIT)) == self._prefix[j]]
                selected = (inside >> shift) & (_BINS - 1)
            counts = torch.bincount(selected, minlength=_BINS)
            current = self._counts[j]
            self._counts[j] = counts if current is None else current + counts

    def end(self, step: int) -> None:
        for j, rank in enumerate(self.ranks):
            counts = self._counts[j]
            assert counts is not None, "end() before any reduce()"
            from_top = counts.flip(0).cumsum(0)  # [bins]
            need = rank - self._above[j]
            target = torch.tensor(need, dtype=from_top.dtype, device=from_top.device)
            index = int(torch.searchsorted(from_top, target))
            if index > 0:
                self._above[j] += int(from_top[index - 1])
            digit = _BINS - 1 - index
            self._prefix[j] = (self._prefix[j] << _DIGIT) | digit
            self._counts[j] = None
            if step == self.passes - 1:
                pattern = torch.tensor(self._prefix[j], dtype=torch.int64).to(_INT[self.dtype])
                self.threshold.append(pattern.view(self.dtype))
                self.greater.append(self._above[j])
                self.equal.append(int(counts[digit]))


class TieQuota:
    """Admits entries equal to a threshold, lowest index first, up to `quota`, across blocks.

    `admits_all` says the quota covers every equal entry (callers can then skip counting).
    """

    def __init__(self, quota: int, *, admits_all: bool = False) -> None:
        self.left = quota
        self.admits_all = admits_all

    def take(self, equal: torch.Tensor) -> torch.Tensor:
        """From a block's equality mask, the entries admitted (in flat order)."""
        if self.left <= 0:
            return torch.zeros_like(equal)
        count = int(equal.count_nonzero())
        if count <= self.left:
            self.left -= count
            return equal
        flat = equal.reshape(-1)
        chosen = flat.nonzero().squeeze(1)[: self.left]
        admitted = torch.zeros_like(flat)
        admitted[chosen] = True
        self.left = 0
        return admitted.reshape(equal.shape)


def select(values: torch.Tensor, ranks: list[int]) -> RankSelect:
    """RankSelect run over one in-memory tensor."""
    selection = RankSelect(ranks, values.dtype)
    for step in range(selection.passes):
        selection.reduce(step, values)
        selection.end(step)
    return selection


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest of non-negative `values` (a stable descending sort's first k)."""
    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full(values.shape, k > 0, dtype=torch.bool, device=values.device)
    chosen = select(values, [k])
    quota = TieQuota(k - chosen.greater[0])
    threshold = chosen.threshold[0]
    return (values > threshold) | quota.take(values == threshold)


def smallest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest of non-negative `values` (a stable ascending sort's first k)."""
    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full(values.shape, k > 0, dtype=torch.bool, device=values.device)
    chosen = select(values, [n - k + 1])
    below = n - chosen.greater[0] - chosen.equal[0]
    quota = TieQuota(k - below)
    threshold = chosen.threshold[0]
    return (values < threshold) | quota.take(values == threshold)
