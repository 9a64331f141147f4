"""Rows of training data: packed blocks or padded examples, mixed by weight, replay included.

Every training row comes from one source:
- `BlockRows` (causal LM, distillation on text): a source's token stream cut into blocks of
  `sequence_length` tokens. Items keep their separators (see data.py), so wherever a block holds
  the end of one document and the start of the next, an EOS lies between them. With
  `document_attention`, each block also carries position ids that restart at every document, and
  transformers then masks attention between the documents of a block.
- `ExampleRows` (SFT, distillation on examples): one example per row, or several packed into a
  row without splitting any (`pack`); an example longer than a row keeps its first
  `sequence_length` tokens.

Each epoch of a source visits its rows in a fresh seeded order. Sources are mixed row by row by
a deterministic rule (the one Megatron-LM's blended datasets use): row `i` goes to the source
whose count most lags `weight * (i + 1)`, so after any number of rows each source has its share
to within one row, in every batch window as over the whole run. Replay is the same rule one level
up: the replay group gets `fraction` of the rows, the new data the rest, then each group splits
its rows among its own sources by weight. The whole order is a function of the recipe, so the
same recipe gives the same batches, resumed or not, on one process or several.

Shapes: T sequence length, B rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from alloy.train.data import TokenizedSource

IGNORE = -100


@dataclass(frozen=True)
class Row:
    ids: np.ndarray  # (T',) token ids
    mask: np.ndarray  # (T',) bool, training targets
    positions: np.ndarray | None  # (T',) position ids restarting per document, or None
    rejected: tuple[np.ndarray, np.ndarray] | None = None  # a pair's rejected (ids, mask)
    margin: float = 0.0  # a pair's margin (the reward objective's m)


class Rows(Protocol):
    name: str

    def epoch_size(self, epoch: int) -> int: ...

    def row(self, epoch: int, index: int) -> Row: ...


def _permutation(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch]).permutation(n)


class BlockRows:
    """Fixed-length blocks of a tokenised source, in a seeded order per epoch."""

    def __init__(
        self,
        source: TokenizedSource,
        length: int,
        *,
        seed: int,
        index: int,
        document_attention: bool = False,
    ) -> None:
        self.name = source.name
        self.source = source
        self.length = length
        self.blocks = source.tokens // length
        self.dropped = source.tokens - self.blocks * length  # tail shorter than a block
        self.seed, self.index = seed, index
        self.document_attention = document_attention
        self._orders: dict[int, np.ndarray] = {}

    def epoch_size(self, epoch: int) -> int:
        return self.blocks

    def row(self, epoch: int, index: int) -> Row:
        if epoch not in self._orders:
            self._orders = {epoch: _permutation(self.seed, self.index, epoch, self.blocks)}
        block = int(self._orders[epoch][index])
        a, b = block * self.length, (block + 1) * self.length
        ids = np.asarray(self.source.ids[a:b])
        mask = np.ones(self.length, dtype=bool)
        positions = None
        if self.document_attention:
            offsets = np.arange(a, b)
            starts = self.source.starts
            doc = np.searchsorted(starts, offsets, side="right") - 1  # item holding each token
            positions = offsets - np.maximum(starts[doc], a)
        return Row(ids, mask, positions)


class ExampleRows:
    """Examples in a seeded order per epoch, one per row or packed without splitting."""

    def __init__(
        self,
        source: TokenizedSource,
        length: int,
        *,
        seed: int,
        index: int,
        pack: bool = False,
    ) -> None:
        self.name = source.name
        self.source = source
        self.length = length
        self.seed, self.index = seed, index
        self.pack = pack
        sizes = np.diff(source.starts)
        self.truncated = int((sizes > length).sum())
        # Examples whose prompt fills the whole row have nothing left to learn from.
        self.empty = [
            i
            for i in np.flatnonzero(sizes > length)
            if not source.mask[source.starts[i] : source.starts[i] + length].any()
        ]
        keep = np.ones(source.items, dtype=bool)
        keep[self.empty] = False
        self.examples = np.flatnonzero(keep)
        self._epochs: dict[int, list[np.ndarray]] = {}

    def _layout(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epochs:
            order = self.examples[_permutation(self.seed, self.index, epoch, len(self.examples))]
            rows: list[np.ndarray] = []
            if not self.pack:
                rows = [order[i : i + 1] for i in range(len(order))]
            else:
                current: list[int] = []
                used = 0
                sizes = np.minimum(np.diff(self.source.starts), self.length)
                for example in order:
                    size = int(sizes[example])
                    if current and used + size > self.length:
                        rows.append(np.asarray(current))
                        current, used = [], 0
                    current.append(int(example))
                    used += size
                if current:
                    rows.append(np.asarray(current))
            self._epochs = {epoch: rows}
        return self._epochs[epoch]

    def epoch_size(self, epoch: int) -> int:
        return len(self._layout(epoch))

    def row(self, epoch: int, index: int) -> Row:
        examples = self._layout(epoch)[index]
        starts = self.source.starts
        ids, mask, positions = [], [], []
        for example in examples:
            a = int(starts[example])
            b = min(int(starts[example + 1]), a + self.length)
            ids.append(np.asarray(self.source.ids[a:b]))
            mask.append(np.asarray(self.source.mask[a:b]))
            positions.append(np.arange(b - a))
        # One example per row needs no position ids: the collator's padding mask is enough.
        restart = np.concatenate(positions) if self.pack else None
        return Row(np.concatenate(ids), np.concatenate(mask), restart)


def blend(weights: Sequence[float], count: int) -> np.ndarray:
    """(count,) source index of each row: row i goes to the source whose count lags its share
    of i + 1 rows the most (ties to the first), so every prefix is within one row of exact."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    taken = np.zeros(len(w))
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        j = int(np.argmax(w * (i + 1) - taken))
        out[i] = j
        taken[j] += 1
    return out


def mixture_order(
    weights: Sequence[float],
    count: int,
    *,
    replay: Sequence[float] = (),
    replay_fraction: float = 0.0,
) -> np.ndarray:
    """(count,) source index per row; replay sources are numbered after the new ones."""
    if not replay:
        return blend(weights, count)
    groups = blend([1.0 - replay_fraction, replay_fraction], count)
    out = np.empty(count, dtype=np.int64)
    new_rows, old_rows = np.flatnonzero(groups == 0), np.flatnonzero(groups == 1)
    out[new_rows] = blend(weights, len(new_rows))
    out[old_rows] = blend(replay, len(old_rows)) + len(weights)
    return out


class TrainRows(torch.utils.data.Dataset[dict[str, Any]]):
    """The run's rows in training order: item i is the i-th row the run trains on.

    Trainer must read it in order (alloy's trainer uses a sequential sampler): with a global batch
    of G rows, optimizer step s trains on items [s G, (s + 1) G), however the rows are split over
    processes and gradient-accumulation steps.
    """

    def __init__(self, rows: Sequence[Rows], order: np.ndarray, replay_from: int) -> None:
        self.rows = list(rows)
        self.order = order
        self.replay_from = replay_from  # sources numbered from here on are replay
        # (epoch, index) of every item, from the running count of its source.
        self.places: list[tuple[int, int]] = []
        seen = [0] * len(self.rows)
        epoch = [0] * len(self.rows)
        for source in order:
            j = int(source)
            size = self.rows[j].epoch_size(epoch[j])
            if size == 0:
                raise ValueError(f"source {self.rows[j].name!r} has no rows")
            if seen[j] == size:
                epoch[j], seen[j] = epoch[j] + 1, 0
            self.places.append((epoch[j], seen[j]))
            seen[j] += 1
        self.epochs = [e + (1 if s else 0) for e, s in zip(epoch, seen, strict=True)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        source = int(self.order[i])
        row = self.rows[source].row(*self.places[i])
        ids = torch.from_numpy(row.ids.astype(np.int64))
        labels = ids.masked_fill(~torch.from_numpy(row.mask), IGNORE)
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "source": source, "index": i}
        if row.positions is not None:
            item["position_ids"] = torch.from_numpy(row.positions.astype(np.int64))
        if row.rejected is not None:
            rejected = torch.from_numpy(row.rejected[0].astype(np.int64))
            item["rejected_input_ids"] = rejected
            item["margin"] = row.margin
            item["rejected_labels"] = rejected.masked_fill(
                ~torch.from_numpy(row.rejected[1]), IGNORE
            )
        return item


def row_length(item: dict[str, Any]) -> int:
    """Tokens of a `TrainRows` item (both sequences of a preference pair)."""
    rejected = item.get("rejected_input_ids")
    return len(item["input_ids"]) + (0 if rejected is None else len(rejected))


@dataclass(frozen=True)
class Collator:
    """Right-pads rows into a batch; padding is never a target.

    With position ids (document attention or packed examples) no attention mask is passed:
    transformers then builds the per-document causal mask from the position ids, and right
    padding is harmless because no real token ever attends to a later one.
    """

    pad_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "rejected_input_ids" in items[0]:
            return self.pairs(items)
        length = max(len(item["input_ids"]) for item in items)
        rows = len(items)
        ids = torch.full((rows, length), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((rows, length), IGNORE, dtype=torch.long)
        mask = torch.zeros((rows, length), dtype=torch.long)
        with_positions = "position_ids" in items[0]
        positions = torch.zeros((rows, length), dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            mask[b, :n] = 1
            if with_positions:
                positions[b, :n] = item["position_ids"]
                positions[b, n:] = torch.arange(length - n)
        batch = {
            "input_ids": ids,
            "labels": labels,
            "source": torch.tensor([item["source"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
            "lengths": mask.sum(-1),  # (B,) real tokens of each row
        }
        if with_positions:
            batch["position_ids"] = positions
        elif not bool(mask.all()):
            batch["attention_mask"] = mask
        return batch

    def pairs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """B preference pairs as one (2B, T) batch: the B chosen sequences, then the B rejected,
        padded to the longest of all, so the policy scores both in one forward pass. `pairs`
        (B ones) is what the loss is a mean over; `lengths` are each pair's real tokens."""
        sequences = [
            {"input_ids": item[f"{side}input_ids"], "labels": item[f"{side}labels"]}
            for side in ("", "rejected_")
            for item in items
        ]
        length = max(len(s["input_ids"]) for s in sequences)
        rows = len(sequences)
        ids = torch.full((rows, length), self.pad_id, dtype=torch.long)  # (2B, T)
        labels = torch.full((rows, length), IGNORE, dtype=torch.long)
        mask = torch.zeros((rows, length), dtype=torch.long)
        for b, sequence in enumerate(sequences):
            n = len(sequence["input_ids"])
            ids[b, :n] = sequence["input_ids"]
            labels[b, :n] = sequence["labels"]
            mask[b, :n] = 1
        lengths = mask.sum(-1)  # (2B,)
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "source": torch.tensor([item["source"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
            "lengths": lengths[: len(items)] + lengths[len(items) :],  # (B,)
            "pairs": torch.ones(len(items), dtype=torch.long),
            "margins": torch.tensor([float(item.get("margin", 0.0)) for item in items]),  # (B,)
        }
