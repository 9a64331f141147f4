"""A lazy, read-only view of a Hugging Face model folder.

Opening a checkpoint reads `config.json` and the safetensors headers (never tensor data), checks
that the index and the shards agree, and reports every problem at once. `read(name)` then reads
exactly one tensor's bytes with a positioned read, so memory holds only the tensors a caller asks
for (no mmap of whole shards, which would count towards resident memory as pages are touched).

PyTorch `.bin` checkpoints are pickles and can run code when loaded; they are refused unless the
caller passes `allow_pickle=True`, and are then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from alloy.errors import CheckpointError, ProblemCollector, UnsafeCheckpointError
from alloy.io.format import CODES, TensorInfo, read_header
from alloy.io.modelinfo import ModelInfo, model_info

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

Format = Literal["safetensors", "bin"]


class Checkpoint:
    """Lazy view of a model folder (or of one `.safetensors` file).

    Use `Checkpoint.open(path)`; it is also a context manager that closes its file handles.
    Attributes: `path`, `format`, `files` (weight files in order), `tensors` (name -> TensorInfo,
    in index order), `config` (the parsed `config.json`, or None).
    """

    def __init__(
        self,
        path: Path,
        fmt: Format,
        files: list[Path],
        tensors: dict[str, TensorInfo],
        config: dict[str, Any] | None,
        bin_states: dict[Path, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.path = path
        self.format: Format = fmt
        self.files = files
        self.tensors: Mapping[str, TensorInfo] = tensors
        self.config = config
        self._fds: dict[Path, int] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = dict(bin_states or {})
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
        """Open a model folder or a single `.safetensors` file, reading headers only.

        Raises:
            CheckpointError: the path does not hold a readable checkpoint; lists every problem.
            UnsafeCheckpointError: only `.bin` weights exist and `allow_pickle` is False.
        """
        return _open(Path(path), allow_pickle=allow_pickle)

    # -- reading ---------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or rows [start, stop) of its first dimension) into a fresh CPU tensor.

        The result has the stored dtype; a row range costs only the bytes of those rows.
        """
        info = self.info(name)
        shape = info.shape
        begin, nbytes = info.begin, info.nbytes
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise CheckpointError(f"{self.path}: rows {rows} out of range for {name} {shape}")
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            begin, nbytes = begin + start * row_bytes, (stop - start) * row_bytes
            shape = (stop - start, *shape[1:])
        if self.format == "bin":
            tensor = self._bin_tensors(info.file)[name]
            return (tensor if rows is None else tensor[rows[0] : rows[1]]).clone()
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            _pread_into(self._fd(info.file), buffer, begin, info.file)
        return buffer.view(info.dtype).reshape(shape)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                self._fds[file] = fd
            return fd

    def _bin_tensors(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if file not in self._bin_cache:
                self._bin_cache[file] = _load_bin(file)
            return self._bin_cache[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._bin_cache.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort: file descriptors of a forgotten checkpoint must not leak.
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- description -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def model_info(self) -> ModelInfo:
        """Architecture, layers, vocabulary, tied embeddings and parameter count."""
        return model_info(self.config, self.tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.format}, {len(self.tensors)} tensors)"


def check_weights(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
    """Check a model folder's weight files before another loader (transformers) reads them.

    A truncated or corrupt file then gives a `CheckpointError` naming it, instead of the loader's
    own failure. Reads headers only (see `Checkpoint.open`, which raises the same errors).
    """
    Checkpoint.open(path, allow_pickle=allow_pickle).close()


def _pread_into(fd: int, buffer: torch.Tensor, offset: int, file: Path) -> None:
    view = memoryview(buffer.numpy()).cast("B")  # type: ignore[arg-type]
    done = 0
    while done < len(view):
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{file}: read failed: {exc.strerror or exc}") from exc
        if count == 0:
            raise CheckpointError(
                f"{file}: file shrank while reading (expected {len(view)} bytes at {offset})",
            )
        done += count


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in the legacy (pre-1.6, non-zip) format cannot be memory-mapped.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot load PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: not a state dict of named tensors")
    return state


def _read_json(file: Path, problems: ProblemCollector) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.add(str(file), f"cannot read: {exc.strerror or exc}")
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(str(file), f"invalid JSON: {exc}")
    return None


def _open(path: Path, *, allow_pickle: bool) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    problems = ProblemCollector()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: not a model folder or a .safetensors file",
            )
        tensors = _read_safetensors([path], problems)
        problems.raise_if_any(CheckpointError, f"{path}: unreadable checkpoint")
        return Checkpoint(path, "safetensors", [path], tensors, None)

    config = None
    bin_states: dict[Path, dict[str, torch.Tensor]] = {}
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json", problems)
        if config is not None and not isinstance(config, dict):
            problems.add(str(path / "config.json"), "not a JSON object")
            config = None

    if (path / SAFE_INDEX).is_file():
        files, expected = _read_index(path, SAFE_INDEX, problems)
        tensors = _read_safetensors(files, problems)
        _check_index(path / SAFE_INDEX, expected, tensors, problems)
        # Physical order (shard, then offset): embeddings first, layers in order, as saved.
        rank = {file: k for k, file in enumerate(files)}
        listed = sorted(
            (n for n in expected if n in tensors),
            key=lambda n: (rank[tensors[n].file], tensors[n].begin),
        )
        tensors = {name: tensors[name] for name in listed}
        fmt: Format = "safetensors"
    elif (path / SAFE_SINGLE).is_file():
        files = [path / SAFE_SINGLE]
        tensors = _read_safetensors(files, problems)
        fmt = "safetensors"
    elif (path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file():
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path}: holds only PyTorch .bin weights, which are pickles that can run "
                "arbitrary code when loaded. If you trust this checkpoint, opt in with "
                "--allow-pickle (Python: allow_pickle=True); it is then loaded with "
                "torch.load(weights_only=True). Better: convert it once to safetensors."
            )
        if (path / BIN_INDEX).is_file():
            files, expected = _read_index(path, BIN_INDEX, problems)
        else:
            files, expected = [path / BIN_SINGLE], None
        problems.raise_if_any(CheckpointError, f"{path}: unreadable checkpoint")
        bin_states = {file: _load_bin(file) for file in files}
        tensors = _read_bins(bin_states, problems)
        if expected is not None:
            _check_index(path / BIN_INDEX, expected, tensors, problems)
        fmt = "bin"
    else:
        others = sorted(p.name for p in path.glob("*.safetensors"))
        hint = (
            f"found {', '.join(others)}; rename the weights to {SAFE_SINGLE} or pass the file"
            if others
            else "point to a folder written by save_pretrained"
        )
        problems.add(
            str(path), f"no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}", hint
        )
        problems.raise_if_any(CheckpointError, f"{path}: not a checkpoint")
        raise AssertionError("unreachable")

    problems.raise_if_any(CheckpointError, f"{path}: unreadable checkpoint")
    return Checkpoint(path, fmt, files, tensors, config, bin_states if fmt == "bin" else None)


def _read_index(
    folder: Path, index_name: str, problems: ProblemCollector
) -> tuple[list[Path], dict[str, str]]:
    index = _read_json(folder / index_name, problems)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if index is not None and not (
        isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    ):
        problems.add(str(folder / index_name), "no weight_map object of tensor name -> file")
    if not isinstance(weight_map, dict):
        return [], {}
    files: list[Path] = []
    for shard in sorted(set(weight_map.values())):
        file = folder / shard
        if Path(shard).name != shard:
            problems.add(str(folder / index_name), f"shard {shard!r} is not a plain file name")
        elif not file.is_file():
            problems.add(
                str(file), f"missing (listed in {index_name})", "the download is incomplete"
            )
        else:
            files.append(file)
    return files, weight_map


def _check_index(
    index_file: Path,
    expected: dict[str, str],
    tensors: dict[str, TensorInfo],
    problems: ProblemCollector,
) -> None:
    present_files = {info.file.name for info in tensors.values()}
    for name, shard in expected.items():
        info = tensors.get(name)
        if info is None:
            if shard in present_files:
                problems.add(str(index_file), f"lists {name!r} in {shard}, which does not hold it")
        elif info.file.name != shard:
            problems.add(
                str(index_file), f"lists {name!r} in {shard}, but it is in {info.file.name}"
            )


def _read_safetensors(files: list[Path], problems: ProblemCollector) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        header, header_problems = read_header(file)
        problems.extend(header_problems)
        if header is None:
            continue
        for name, info in header.tensors.items():
            if name in tensors:
                problems.add(str(file), f"tensor {name!r} also stored in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def _read_bins(
    states: dict[Path, dict[str, torch.Tensor]], problems: ProblemCollector
) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file, state in states.items():
        for name, tensor in state.items():
            if tensor.dtype not in CODES:
                problems.add(f"{file} [{name}]", f"unsupported dtype {tensor.dtype}")
                continue
            if name in tensors:
                problems.add(str(file), f"tensor {name!r} also stored in {tensors[name].file.name}")
            nbytes = tensor.numel() * tensor.element_size()
            tensors[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file, 0, nbytes)
    return tensors
