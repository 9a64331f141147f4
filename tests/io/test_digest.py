"""The SHA-256 cache: a hit only while a file is provably unchanged, never a failure."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from alloy.io import digest


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "RACY_SECONDS", 0.0)
    return tmp_path / "cache" / "sha256.json"


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files actually read and hashed (cache misses), in order."""
    calls: list[Path] = []
    real = digest._hash

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(digest, "_hash", counting)
    return calls


def _write(path: Path, data: bytes, mtime: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))


def test_digest_is_sha256_and_second_call_hits_the_cache(
    tmp_path: Path, store: Path, hashed: list[Path]
) -> None:
    file = tmp_path / "w.safetensors"
    _write(file, b"weights" * 1000, 1_000_000_000)
    expected = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert digest.file_sha256(file) == expected
    assert digest.file_sha256(file) == expected
    assert hashed == [file.resolve()]
    assert json.loads(store.read_text())[str(file.resolve())]["sha256"] == expected


def test_changed_content_of_the_same_size_and_mtime_is_hashed_again(
    tmp_path: Path, store: Path, hashed: list[Path]
) -> None:
    file = tmp_path / "w.bin"
    _write(file, b"a" * 64, 1_000_000_000)
    first = digest.file_sha256(file)
    _write(file, b"b" * 64, 1_000_000_000)  # same size, mtime forged back; ctime moves on
    second = digest.file_sha256(file)
    assert second == hashlib.sha256(b"b" * 64).hexdigest() != first
    assert len(hashed) == 2


def test_a_file_replaced_by_rename_is_hashed_again(
    tmp_path: Path, store: Path, hashed: list[Path]
) -> None:
    file, other = tmp_path / "w.bin", tmp_path / "new.bin"
    _write(file, b"a" * 64, 1_000_000_000)
    digest.file_sha256(file)
    _write(other, b"c" * 64, 1_000_000_000)
    other.replace(file)
    assert digest.file_sha256(file) == hashlib.sha256(b"c" * 64).hexdigest()
    assert len(hashed) == 2


def test_a_file_changed_just_before_hashing_is_not_cached(
    tmp_path: Path, store: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "RACY_SECONDS", 60.0)
    file = tmp_path / "w.bin"
    file.write_bytes(b"fresh")
    digest.file_sha256(file)
    digest.file_sha256(file)
    assert len(hashed) == 2
    assert not store.exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", '{"KEY": 1}', '{"KEY": {"id": 3}}'])
def test_a_corrupt_cache_is_ignored_and_replaced(
    tmp_path: Path, store: Path, hashed: list[Path], content: str
) -> None:
    file = tmp_path / "w.bin"
    store.parent.mkdir(parents=True)
    store.write_text(content.replace("KEY", str(file.resolve())))
    _write(file, b"x", 1_000_000_000)
    assert digest.file_sha256(file) == hashlib.sha256(b"x").hexdigest()
    assert str(file.resolve()) in json.loads(store.read_text())


def test_an_unwritable_cache_never_fails_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(blocker))
    monkeypatch.setattr(digest, "RACY_SECONDS", 0.0)
    file = tmp_path / "w.bin"
    _write(file, b"y", 1_000_000_000)
    assert digest.file_sha256(file) == hashlib.sha256(b"y").hexdigest()


def test_caching_can_be_turned_off(
    tmp_path: Path, store: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOY_HASH_CACHE", "0")
    file = tmp_path / "w.bin"
    _write(file, b"z", 1_000_000_000)
    digest.file_sha256(file)
    digest.file_sha256(file)
    assert len(hashed) == 2
    assert not store.exists()


def test_least_recently_used_entries_are_dropped(
    tmp_path: Path, store: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "MAX_ENTRIES", 2)
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, file in enumerate(files):
        _write(file, bytes([i]), 1_000_000_000)
    digest.file_sha256(files[0])
    digest.file_sha256(files[1])
    digest.file_sha256(files[0])  # a hit: 0 becomes the most recently used
    digest.file_sha256(files[2])  # evicts 1
    assert list(json.loads(store.read_text())) == [str(files[0].resolve()), str(files[2].resolve())]
    assert hashed == [files[0].resolve(), files[1].resolve(), files[2].resolve()]


def test_several_files_hit_and_miss_in_one_call(
    tmp_path: Path, store: Path, hashed: list[Path]
) -> None:
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, file in enumerate(files):
        _write(file, bytes([i]) * 10, 1_000_000_000)
    digest.file_sha256(files[1])
    got = digest.files_sha256(files)
    assert got == [hashlib.sha256(bytes([i]) * 10).hexdigest() for i in range(3)]
    assert hashed == [files[1].resolve(), files[0].resolve(), files[2].resolve()]
    assert len(json.loads(store.read_text())) == 3
