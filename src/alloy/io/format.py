"""The safetensors file format, read and written by hand.

A safetensors file is: 8 bytes (little-endian u64) giving the header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, right-padded
with spaces), then the tensor data, where offsets are relative to the end of the header and the
tensors tile the data region exactly.

We parse headers ourselves rather than through `safetensors.safe_open` for two reasons: listing a
checkpoint must touch only headers (no mmap of the data), and a damaged file must produce an error
that names the file and says what is wrong (truncated, trailing bytes, overlapping tensors...)
instead of a generic deserialisation failure.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from alloy.errors import Problem

# safetensors dtype code -> torch dtype. Codes torch lacks on this build are simply absent.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
]:
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

# A header larger than this is certainly not a header (the reference implementation uses 100 MB).
MAX_HEADER_BYTES = 100_000_000


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (`torch.bfloat16` -> `"BF16"`)."""
    try:
        return CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching any other tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    begin: int  # absolute byte offset of the first data byte in `file`
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    file: Path
    tensors: dict[str, TensorInfo]  # in header order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(file: Path) -> tuple[SafetensorsHeader | None, list[Problem]]:
    """Parse and validate the header of one safetensors file.

    Returns the header, or None and the list of problems that make the file unusable. Validation
    covers truncation, trailing bytes, unknown dtypes, sizes inconsistent with shapes and
    overlapping or gapped tensors, so a later read can trust every offset.
    """
    where = str(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return None, [
                    Problem(
                        where,
                        f"truncated: {size} bytes, less than the 8-byte header length prefix",
                        "re-download or re-save the checkpoint",
                    )
                ]
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                return None, [
                    Problem(
                        where,
                        f"truncated or not a safetensors file: header length {header_len} "
                        f"does not fit in a file of {size} bytes",
                        "re-download or re-save the checkpoint",
                    )
                ]
            raw = handle.read(header_len)
    except OSError as exc:
        return None, [Problem(where, f"cannot read: {exc.strerror or exc}")]
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        return None, [Problem(where, f"corrupt header: {exc}", "re-download or re-save it")]

    problems: list[Problem] = []
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        problems.append(Problem(where, "corrupt header: __metadata__ is not an object"))
        metadata = {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info = _parse_entry(file, name, entry, data_start, problems)
        if info is not None:
            tensors[name] = info
            spans.append((info.begin - data_start, info.end - data_start, name))

    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            problems.append(Problem(f"{where} [{name}]", f"corrupt layout: tensor data {kind}"))
        cursor = max(cursor, end)
    if not problems:
        if cursor > data_size:
            problems.append(
                Problem(
                    where,
                    f"truncated: the header describes {cursor} bytes of tensor data but the "
                    f"file holds {data_size}",
                    "the download or save was interrupted; re-download or re-save it",
                )
            )
        elif cursor < data_size:
            problems.append(
                Problem(where, f"corrupt: {data_size - cursor} unexpected bytes after the data")
            )
    if problems:
        return None, problems
    return SafetensorsHeader(file, tensors, dict(metadata), data_start, size), []


def _parse_entry(
    file: Path, name: str, entry: object, data_start: int, problems: list[Problem]
) -> TensorInfo | None:
    where = f"{file} [{name}]"
    if not isinstance(entry, dict):
        problems.append(Problem(where, "corrupt header: entry is not an object"))
        return None
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        problems.append(Problem(where, f"unsupported dtype {code!r}"))
        return None
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        problems.append(Problem(where, f"corrupt header: bad shape {shape!r}"))
        return None
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        problems.append(Problem(where, f"corrupt header: bad data_offsets {offsets!r}"))
        return None
    dtype = DTYPES[code]
    expected = nbytes_of(tuple(shape), dtype)
    if offsets[1] - offsets[0] != expected:
        problems.append(
            Problem(
                where,
                f"corrupt header: {code}{shape} needs {expected} bytes, "
                f"offsets span {offsets[1] - offsets[0]}",
            )
        )
        return None
    return TensorInfo(
        name, tuple(shape), dtype, file, data_start + offsets[0], data_start + offsets[1]
    )


def encode_header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Build the 8-byte prefix + JSON header for tensors laid out in the given order.

    Returns the header bytes (padded with spaces so the data starts on an 8-byte boundary) and the
    (begin, end) data offsets of each entry, relative to the start of the data region.
    """
    body: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets: list[tuple[int, int]] = []
    cursor = 0
    for name, shape, dtype in entries:
        end = cursor + nbytes_of(shape, dtype)
        body[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [cursor, end],
        }
        offsets.append((cursor, end))
        cursor = end
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
