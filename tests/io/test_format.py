"""The hand-written safetensors header parser against the reference implementation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloy.io.format import DTYPES, encode_header, read_header


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for code, dtype in DTYPES.items():
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, (7,), generator=g).bool()
        else:
            t = torch.randint(0, 100, (2, 3), generator=g).to(dtype)
        tensors[f"t.{code}"] = t
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def test_reads_reference_files_exactly(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    file = tmp_path / "ref.safetensors"
    save_file(tensors, file, metadata={"format": "pt"})
    header, problems = read_header(file)
    assert problems == [] and header is not None
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(tensors)
    raw = file.read_bytes()
    for name, info in header.tensors.items():
        expected = tensors[name]
        assert info.shape == tuple(expected.shape) and info.dtype == expected.dtype
        data = torch.tensor(list(raw[info.begin : info.end]), dtype=torch.uint8)
        got = data.view(info.dtype).reshape(info.shape)
        assert torch.equal(got, expected)


def test_encoded_header_is_read_by_reference(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    header, offsets = encode_header(entries, {"format": "pt"})
    assert len(header) % 8 == 0  # data region starts 8-byte aligned
    blob = bytearray(header)
    for (name, _, _), (begin, end) in zip(entries, offsets, strict=True):
        data = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(data) == end - begin
        blob += data
    file = tmp_path / "ours.safetensors"
    file.write_bytes(bytes(blob))
    loaded = load_file(file)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def _write_raw(file: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "unexpected"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "gap"),
        ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
    ],
)
def test_damaged_files_are_named_and_explained(
    tmp_path: Path, header: dict, data: bytes, expected: str
) -> None:
    file = tmp_path / "bad.safetensors"
    _write_raw(file, header, data)
    parsed, problems = read_header(file)
    assert parsed is None
    assert any(expected in p.message for p in problems), problems
    assert all(str(file) in p.where for p in problems)


def test_short_and_garbage_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert "truncated" in read_header(short)[1][0].message
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert "does not fit" in read_header(huge)[1][0].message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    assert "corrupt header" in read_header(garbage)[1][0].message
