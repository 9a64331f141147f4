"""Merges as passes over row blocks: how every method is written, and why.

A merge method is a factory: given its parameters it returns a `Merger`, which sees the tensors
only as a sequence of row blocks (slices along the first dimension). It may first make
`passes` reduction passes over all blocks (to learn per-tensor statistics: a magnitude
threshold, a norm, a dot product), then produces the output block by block in `apply`.

Writing methods this way lets the engine stream: it reads one block of each input at a time, so
memory stays at a few blocks however large the tensor (a 128k x 4096 embedding included), and a
block that fits in cache makes the elementwise maths cheap. Run over tensors already in memory
(`run`), the same code is the method's plain "tensors in, tensor out" function; there is one
implementation, not a fast one and a reference one.

Blocks follow one canonical partition of each shape (`partition`), and random methods draw from a
generator seeded per block (`block_seed`), so a merge gives the same bits whether it runs from
files or in memory.

Shapes: a block of a tensor of shape [R, *rest] is [r, *rest]; a 0-d tensor is one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

BLOCK_ELEMENTS = 1 << 20  # target elements per block; part of the format of random draws
_GOLDEN = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


@dataclass
class Block:
    """One row block of every input of one tensor."""

    models: list[torch.Tensor]  # N x [r, *rest]
    base: torch.Tensor | None  # [r, *rest]
    index: int  # position in the partition
    start: int  # first row
    seed: int  # seeds this block's random draws

    def generator(self) -> torch.Generator:
        device = self.models[0].device if self.models else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(self.seed)

    def task_vectors(self) -> torch.Tensor:
        """Each model minus the base, in one new tensor: [N, r, *rest]."""
        base = self.base
        assert base is not None, "task vectors need a base model"
        deltas = base.new_empty((len(self.models), *base.shape))
        for i, model in enumerate(self.models):
            torch.sub(model, base, out=deltas[i])
        return deltas


class Merger(Protocol):
    """What a merge method's factory returns."""

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Prepare for one tensor of `shape` computed in `dtype`; return the number of
        reduction passes over all blocks that precede `apply` (0 for elementwise methods)."""
        ...

    def reduce(self, step: int, block: Block) -> None:
        """Accumulate statistics of pass `step` from one block (blocks come in order)."""
        ...

    def end(self, step: int) -> None:
        """All blocks of pass `step` have been seen."""
        ...

    def apply(self, block: Block) -> torch.Tensor:
        """The output rows of one block (blocks come in order, once each)."""
        ...


def wants(merger: Merger, step: int) -> bool:
    """Whether a merger still needs reduction pass `step`; a merger may define `wants(step)` to
    say a pass became unnecessary (e.g. a selection finished early). Skipped passes get neither
    `reduce` nor `end` calls."""
    method = getattr(merger, "wants", None)
    return True if method is None else bool(method(step))


def partition(shape: Sequence[int], block_elements: int | None = None) -> list[tuple[int, int]]:
    """The canonical row blocks [start, stop) of a tensor shape (one block for 0-d tensors)."""
    if len(shape) == 0 or shape[0] == 0:
        return [(0, shape[0] if shape else 1)]
    row = math.prod(shape[1:])
    rows = max(1, (block_elements or BLOCK_ELEMENTS) // max(row, 1))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def block_seed(seed: int, index: int) -> int:
    """The seed of block `index` of a tensor whose draws are seeded by `seed` (block 0: `seed`)."""
    return (seed + index * _GOLDEN) & _MASK63


def run_blocks(
    merger: Merger,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    block_elements: int | None = None,
) -> Iterator[tuple[int | None, torch.Tensor]]:
    """Run a merger over in-memory tensors (views, no copies), yielding (first row, output
    block); the row is None for a 0-d tensor.

    `block_elements` changes the partition (tests use it to check that blocking changes
    nothing; random draws depend on it).
    """
    shape = tuple(models[0].shape)
    if len(shape) == 0:
        blocks = [Block(list(models), base, 0, 0, block_seed(seed, 0))]
    else:
        blocks = [
            Block(
                [m[start:stop] for m in models],
                None if base is None else base[start:stop],
                index,
                start,
                block_seed(seed, index),
            )
            for index, (start, stop) in enumerate(partition(shape, block_elements))
        ]
    for step in range(merger.start(shape, models[0].dtype)):
        if not wants(merger, step):
            continue
        for block in blocks:
            merger.reduce(step, block)
        merger.end(step)
    for block in blocks:
        yield (block.start if shape else None), merger.apply(block)


def run(
    merger: Merger,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    block_elements: int | None = None,
) -> torch.Tensor:
    """Run a merger over in-memory tensors and return the whole result."""
    parts = [
        part
        for _, part in run_blocks(merger, models, base, seed=seed, block_elements=block_elements)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Elementwise:
    """A Merger with no reduction pass, from a function of one block."""

    def __init__(self, fn: Callable[[Block], torch.Tensor]) -> None:
        self.fn = fn

    def start(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return 0

    def reduce(self, step: int, block: Block) -> None:
        raise AssertionError("elementwise mergers have no reduction pass")

    def end(self, step: int) -> None:
        raise AssertionError("elementwise mergers have no reduction pass")

    def apply(self, block: Block) -> torch.Tensor:
        return self.fn(block)
