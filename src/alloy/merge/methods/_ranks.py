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

    For float32 with `numel` known, the first pass also histograms the low digits inside a
    window of top-digit buckets around where the first block says the answer lies; when the
    answer's bucket falls in the window (the usual case), the selection is complete after one
    pass and `finished_early` is set: callers may skip the second pass.
    """

    WINDOW = 3  # buckets on each side of the estimate

    def __init__(self, ranks: list[int], dtype: torch.dtype, numel: int | None = None) -> None:
        self.ranks = ranks
        self.dtype = dtype
        self.passes = radix_passes(dtype)
        self.numel = numel
        self.finished_early = False
        self._bits = dtype.itemsize * 8
        self._prefix = [0] * len(ranks)  # digits found so far, per rank
        self._above = [0] * len(ranks)  # entries above the prefix's range, per rank
        self._counts: torch.Tensor | None = None  # first pass: shared by all ranks
        self._inside: list[torch.Tensor | None] = [None] * len(ranks)  # later passes
        self._windows: list[int] | None = None  # per rank: first bucket of the window
        self._window_counts: list[torch.Tensor | None] = [None] * len(ranks)
        self.threshold: list[torch.Tensor] = []
        self.greater: list[int] = []
        self.equal: list[int] = []

    def reduce(self, step: int, values: torch.Tensor, *, signed: bool = False) -> None:
        """Count one block of non-negative `values` (with `signed`, of their magnitudes: the
        sign bit is masked off, which is cheaper than taking the absolute value)."""
        if self.finished_early:
            return
        bits = values.reshape(-1).view(_INT[self.dtype])  # [n]; ordered like the values
        if signed:
            bits = bits & _MAGNITUDE[self.dtype]
        shift = self._bits - _DIGIT * (step + 1)
        if step == 0:
            # The top digit needs no mask: the sign bit of a magnitude is clear.
            counts = torch.bincount(bits >> shift, minlength=_BINS)
            self._counts = counts if self._counts is None else self._counts + counts
            if self.passes == 2 and self.numel:
                self._count_windows(bits, counts)
            return
        for j in range(len(self.ranks)):
            # Only entries whose higher digits equal this rank's prefix take part.
            inside = bits[(bits >> (shift + _DIGIT)) == self._prefix[j]]
            counts = torch.bincount((inside >> shift) & (_BINS - 1), minlength=_BINS)
            current = self._inside[j]
            self._inside[j] = counts if current is None else current + counts

    def _count_windows(self, bits: torch.Tensor, block_counts: torch.Tensor) -> None:
        """Low-digit histograms of the entries in each rank's window of top buckets."""
        assert self.numel is not None
        if self._windows is None:
            from_top = block_counts.flip(0).cumsum(0)
            self._windows = []
            for rank in self.ranks:
                expected = max(1, round(rank * bits.numel() / self.numel))
                target = torch.tensor(expected, dtype=from_top.dtype, device=from_top.device)
                bucket = _BINS - 1 - int(torch.searchsorted(from_top, target))
                self._windows.append(max(0, bucket - self.WINDOW))
        span = (2 * self.WINDOW + 1) * _BINS
        for j, low in enumerate(self._windows):
            # entries of the window map to 1 .. span, all others to 0 or span + 1
            key = (bits - (low << _DIGIT)).clamp_(-1, span).add_(1)
            counts = torch.bincount(key, minlength=span + 2)[1 : span + 1]
            current = self._window_counts[j]
            self._window_counts[j] = counts if current is None else current + counts

    def end(self, step: int) -> None:
        if self.finished_early:
            return
        last = step == self.passes - 1
        for j, rank in enumerate(self.ranks):
            counts = self._counts if step == 0 else self._inside[j]
            assert counts is not None, "end() before any reduce()"
            digit = self._descend(j, rank, counts)
            if last:
                self._finish(j, counts, digit)
        if step == 0 and self._windows is not None:
            self._try_window()
        self._counts = None
        self._inside = [None] * len(self.ranks)

    def _descend(self, j: int, rank: int, counts: torch.Tensor) -> int:
        """Fix the next digit of rank j's threshold from a histogram of that digit."""
        from_top = counts.flip(0).cumsum(0)  # [bins]
        need = rank - self._above[j]
        target = torch.tensor(need, dtype=from_top.dtype, device=from_top.device)
        index = int(torch.searchsorted(from_top, target))
        if index > 0:
            self._above[j] += int(from_top[index - 1])
        digit = _BINS - 1 - index
        self._prefix[j] = (self._prefix[j] << _DIGIT) | digit
        return digit

    def _finish(self, j: int, counts: torch.Tensor, digit: int) -> None:
        pattern = torch.tensor(self._prefix[j], dtype=torch.int64).to(_INT[self.dtype])
        self.threshold.append(pattern.view(self.dtype))
        self.greater.append(self._above[j])
        self.equal.append(int(counts[digit]))

    def _try_window(self) -> None:
        """After the first pass: finish every rank from its window, if all answers are in it."""
        assert self._windows is not None
        buckets = [prefix - low for prefix, low in zip(self._prefix, self._windows, strict=True)]
        if not all(0 <= b <= 2 * self.WINDOW for b in buckets):
            return
        for j, (rank, bucket) in enumerate(zip(self.ranks, buckets, strict=True)):
            window = self._window_counts[j]
            assert window is not None
            counts = window[bucket * _BINS : (bucket + 1) * _BINS]
            self._finish(j, counts, self._descend(j, rank, counts))
        self.finished_early = True
        self._window_counts = [None] * len(self.ranks)


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
