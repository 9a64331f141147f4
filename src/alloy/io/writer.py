"""Streaming, atomic writer of Hugging Face checkpoints.

The writer is told every tensor's name, shape and dtype up front (a merge plan, a state dict or
another checkpoint always knows them), so it can lay out the shards and write every safetensors
header before the first tensor arrives. Each tensor is then written straight to its final offset
with a positioned write: no shard is ever buffered in memory, tensors may arrive in any order and
from several threads, and nothing is written twice.

Layout: tensors are assigned to shards in the given order, a new shard starting when the next
tensor would push the current one past `max_shard_bytes` (a tensor larger than the budget gets a
shard of its own). Within a shard, tensors are ordered by decreasing element size so every tensor
starts at an offset aligned to its dtype. One shard is written as `model.safetensors`; several as
`model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json`, as transformers does.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from alloy.errors import AlloyError, CheckpointError, InputError, NonFiniteError
from alloy.io.atomic import FILE_MODE, AtomicFolder
from alloy.io.format import encode_header, nbytes_of
from alloy.io.sidefiles import copy_side_files

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    spec: TensorSpec


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors into shards of at most `max_shard_bytes` bytes of data each, in order."""
    if max_shard_bytes <= 0:
        raise InputError(f"shard size must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class CheckpointWriter:
    """Write a checkpoint folder tensor by tensor, atomically.

    Args:
        out: destination folder; must not exist or be empty unless `force`.
        specs: every tensor that will be written (name, shape, dtype), in file order.
        max_shard_bytes: data bytes per shard before a new one starts.
        force: replace a non-empty `out` (only once the new checkpoint is complete).
        donor: a model folder whose side files (config, generation config, tokenizer files, chat
            template) are copied; `config_updates` are applied to its config.json.
        tokenizer_donor: a model folder whose tokenizer files and chat templates are copied
            instead of the donor's.
        copy_tokenizer: False copies no tokenizer files or chat templates at all.
        model_card: text written as README.md, or a function returning it, called once all
            tensors are written (so slow parts, like hashing inputs, can overlap the writing).
        extra_files: more files to write, name -> text.
        single_file: write every tensor into one file of this name, never sharded (e.g.
            `adapter_model.safetensors`); `max_shard_bytes` is then ignored.

    Use as a context manager; `write(name, tensor)` each tensor exactly once. Leaving the block
    normally publishes the folder; an exception (or a missing tensor) leaves no trace of it.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        force: bool = False,
        donor: str | os.PathLike[str] | None = None,
        tokenizer_donor: str | os.PathLike[str] | None = None,
        copy_tokenizer: bool = True,
        config_updates: Mapping[str, Any] | None = None,
        model_card: str | Callable[[], str] | None = None,
        extra_files: Mapping[str, str] | None = None,
        single_file: str | None = None,
    ) -> None:
        specs = list(specs)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise AlloyError(f"tensor {spec.name!r} is planned twice")
            seen.add(spec.name)
        self.out = Path(out)
        self.specs = specs
        self.donor = Path(donor) if donor is not None else None
        self.tokenizer_donor = Path(tokenizer_donor) if tokenizer_donor is not None else None
        self.copy_tokenizer = copy_tokenizer
        self.config_updates = dict(config_updates or {})
        self.model_card = model_card
        self.extra_files = dict(extra_files or {})
        self._folder = AtomicFolder(self.out, force=force)
        if single_file is not None:
            self._groups, self._names = [specs], [single_file]
        else:
            self._groups = plan_shards(specs, max_shard_bytes)
            self._names = shard_names(len(self._groups))
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()  # tensors whose every byte is written
        self._blocks: dict[str, list[tuple[int, int]]] = {}  # rows written, per tensor
        self._bytes_written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._tmp: Path | None = None

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    def __enter__(self) -> CheckpointWriter:
        self._tmp = self._folder.__enter__()
        try:
            self._check_space()
            for shard, group in enumerate(self._groups):
                ordered = sorted(group, key=lambda s: -s.dtype.itemsize)
                header, offsets = encode_header(
                    [(s.name, s.shape, s.dtype) for s in ordered], {"format": "pt"}
                )
                fd = os.open(
                    self._tmp / self._names[shard], os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE
                )
                self._fds.append(fd)
                _pwrite_all(fd, memoryview(header), 0, self._tmp / self._names[shard])
                os.ftruncate(fd, len(header) + (offsets[-1][1] if offsets else 0))
                for spec, (begin, _) in zip(ordered, offsets, strict=True):
                    self._slots[spec.name] = _Slot(shard, len(header) + begin, spec)
        except BaseException:
            self._close_fds()
            self._folder.abort()
            raise
        return self

    def _check_space(self) -> None:
        assert self._tmp is not None
        free = shutil.disk_usage(self._tmp).free
        if free < self.total_bytes:
            raise InputError(
                f"{self.out.parent}: {free / 1e9:.2f} GB free, the checkpoint needs "
                f"{self.total_bytes / 1e9:.2f} GB; free some space or write elsewhere"
            )

    def write(self, name: str, tensor: torch.Tensor, *, row: int | None = None) -> None:
        """Write one planned tensor, or a block of its rows starting at `row`.

        The dtype must match the plan (nothing is cast). Each tensor must be written exactly once,
        either whole or as row blocks that together cover it without overlap.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise AlloyError(f"tensor {name!r} was not planned for {self.out}")
        spec = slot.spec
        start = 0 if row is None else row
        expected = spec.shape if row is None else (tensor.shape[0], *spec.shape[1:])
        if (
            tuple(tensor.shape) != tuple(expected)
            or tensor.dtype != spec.dtype
            or (row is not None and (not spec.shape or start + tensor.shape[0] > spec.shape[0]))
        ):
            where = "" if row is None else f" rows from {row}"
            raise AlloyError(
                f"tensor {name!r}{where}: planned {spec.dtype}{list(spec.shape)}, "
                f"got {tensor.dtype}{list(tensor.shape)}"
            )
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise_non_finite(name, tensor, self.out)
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        nbytes = spec.nbytes if row is None else tensor.shape[0] * row_bytes
        with self._lock:
            blocks = self._blocks.setdefault(name, [])
            end = start + (spec.shape[0] if row is None and spec.shape else len(tensor))
            if any(start < b_end and b_start < end for b_start, b_end in blocks) or (
                row is None and blocks
            ):
                raise AlloyError(f"tensor {name!r} written twice")
            blocks.append((start, end))
            self._bytes_written[name] = self._bytes_written.get(name, 0) + nbytes
            if self._bytes_written[name] == spec.nbytes:
                self._written.add(name)
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            offset = slot.offset + start * row_bytes
            assert self._tmp is not None
            path = self._tmp / self._names[slot.shard]
            _pwrite_all(self._fds[slot.shard], memoryview(data.numpy()), offset, path)  # type: ignore[arg-type]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_fds()
        if exc_type is not None:
            self._folder.abort()
            return
        try:
            self._finish()
        except BaseException:
            self._folder.abort()
            raise
        self._folder.__exit__(None, None, None)

    def _finish(self) -> None:
        assert self._tmp is not None
        missing = [s.name for s in self.specs if s.name not in self._written]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise AlloyError(f"{self.out}: not written because tensors are missing: {shown}")
        if len(self._names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {
                    name: self._names[slot.shard] for name, slot in sorted(self._slots.items())
                },
            }
            (self._tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        if self.donor is not None:
            copy_side_files(
                self.donor,
                self._tmp,
                self.config_updates,
                self.tokenizer_donor,
                tokenizer=self.copy_tokenizer,
            )
        elif self.config_updates:
            raise AlloyError("config_updates given without a donor config")
        if self.model_card is not None:
            card = self.model_card() if callable(self.model_card) else self.model_card
            (self._tmp / "README.md").write_text(card, encoding="utf-8")
        for name, text in self.extra_files.items():
            if Path(name).name != name:
                raise AlloyError(f"extra file {name!r} must be a plain file name")
            (self._tmp / name).write_text(text, encoding="utf-8")

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    data = data.cast("B")
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:  # a write by descriptor names no file: name it (a full disk, say)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    **writer_options: Any,
) -> Path:
    """Write an in-memory state dict as a checkpoint folder (atomic, sharded, with side files).

    Tensors sharing storage (tied weights) must be given once; `writer_options` are those of
    `CheckpointWriter`.
    """
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    try:
        with CheckpointWriter(out, specs, **writer_options) as writer:
            for name, tensor in state.items():
                writer.write(name, tensor)
    except ValueError as exc:  # e.g. a dtype safetensors cannot store
        raise CheckpointError(f"{out}: {exc}") from exc
    return Path(out)


def raise_non_finite(name: str, tensor: torch.Tensor, out: Path, why: str | None = None) -> None:
    """Stop a write whose tensor `name` holds NaN or infinity, saying how many and why."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
    why = why or (
        "an input holds NaN/Inf, a parameter is extreme, or the values overflow the output "
        "dtype: try out_dtype float32 or bfloat16"
    )
    raise NonFiniteError(
        f"{out}: not written: tensor {name!r} came out with {counts} of {tensor.numel()} "
        f"values ({why})"
    )


def check_finite(
    tensors: Iterable[tuple[str, torch.Tensor]], out: str | os.PathLike[str], why: str
) -> None:
    """Raise NonFiniteError naming the first floating-point tensor holding NaN or infinity."""
    for name, tensor in tensors:
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise_non_finite(name, tensor, Path(out), why)
