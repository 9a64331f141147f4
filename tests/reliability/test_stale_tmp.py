"""A SIGKILLed alloy write leaves a hidden temporary sibling; the next write into that folder
removes it (if its process is gone), says so, and leaves everything else alone."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from alloy.cli.main import main
from alloy.lab.tiny import build_tiny


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _leftover(parent: Path, name: str, pid: int, kind: str = "tmp") -> Path:
    """What a killed writer of `parent/name` leaves: a hidden folder with a partial shard."""
    folder = parent / f".{name}.alloy-{kind}-{pid}-0123abcd"
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 64)
    return folder


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "alloy.io.atomic")


def test_lab_tiny_removes_dead_process_tmp_and_reports_it(
    tmp_path: Path, dead_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    stale = _leftover(tmp_path, "killed-model", dead_pid)  # another destination, same folder
    caplog.set_level(logging.WARNING, "alloy.io.atomic")
    assert main(["lab", "tiny", str(tmp_path / "out"), "--seed", "1"]) == 0
    assert not stale.exists()
    assert (tmp_path / "out" / "config.json").is_file()
    reported = _messages(caplog)
    assert f"removed stale temporary folder {stale}" in reported
    assert f"alloy process {dead_pid}, no longer running" in reported
    assert len(reported.splitlines()) == 1


def test_merge_removes_dead_process_tmp(
    tmp_path: Path, dead_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = build_tiny("llama", tmp_path / "a", seed=1), build_tiny("llama", tmp_path / "b", seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"weight": 0.5},
            }
        )
    )
    stale = _leftover(tmp_path / "outputs", "merged", dead_pid)  # the same destination
    caplog.set_level(logging.WARNING, "alloy.io.atomic")
    assert main(["merge", str(recipe), str(tmp_path / "outputs" / "merged"), "-q"]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["merged"]
    assert f"removed stale temporary folder {stale}" in _messages(caplog)


def test_live_process_tmp_is_kept(
    tmp_path: Path, live_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    busy = _leftover(tmp_path, "being-written", live_pid)
    mine = _leftover(tmp_path, "mine", os.getpid())
    caplog.set_level(logging.WARNING, "alloy.io.atomic")
    assert main(["lab", "tiny", str(tmp_path / "out")]) == 0
    assert busy.is_dir() and any(busy.iterdir())
    assert mine.is_dir()
    assert _messages(caplog) == ""


def test_only_the_exact_pattern_is_removed(tmp_path: Path, dead_pid: int) -> None:
    near_misses = [
        f"m.alloy-tmp-{dead_pid}-0123abcd",  # not hidden
        f".m.alloy-tmp-{dead_pid}-0123abcX",  # not hex
        f".m.alloy-tmp-{dead_pid}-0123abc",  # too short
        f".m.alloy-tmp-{dead_pid}-0123abcd.bak",
        f".m.alloy-temp-{dead_pid}-0123abcd",
        ".m.alloy-tmp-x-0123abcd",
        f".alloy-tmp-{dead_pid}-0123abcd",  # no destination name
    ]
    for name in near_misses:
        (tmp_path / name).mkdir()
    stale_file = tmp_path / f".m.alloy-tmp-{dead_pid}-0123abcd"
    stale_file.write_text("partial")  # a file of the exact pattern goes too
    assert main(["lab", "tiny", str(tmp_path / "out")]) == 0
    assert not stale_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*near_misses, "out"])


def test_replaced_output_aside_is_restored_when_the_swap_was_cut(
    tmp_path: Path, dead_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed between "rename old away" and "rename new in": the old output comes back."""
    aside = _leftover(tmp_path, "model", dead_pid, kind="old")
    caplog.set_level(logging.WARNING, "alloy.io.atomic")
    assert main(["lab", "tiny", str(tmp_path / "other")]) == 0
    assert not aside.exists()
    assert (tmp_path / "model" / "model-00001-of-00003.safetensors").is_file()
    assert f"restored {tmp_path / 'model'}" in _messages(caplog)


def test_replaced_output_aside_is_removed_once_replaced(tmp_path: Path, dead_pid: int) -> None:
    (tmp_path / "model").mkdir()
    aside = _leftover(tmp_path, "model", dead_pid, kind="old")
    assert main(["lab", "tiny", str(tmp_path / "other")]) == 0
    assert not aside.exists()
    assert (tmp_path / "model").is_dir()


def test_cli_reports_removal_on_stderr(tmp_path: Path, dead_pid: int) -> None:
    """What a user sees: one line on stderr (the in-process tests read the log records)."""
    stale = _leftover(tmp_path, "killed", dead_pid)
    result = subprocess.run(
        [sys.executable, "-m", "alloy", "lab", "tiny", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert result.stderr.strip().splitlines() == [
        f"removed stale temporary folder {stale} (left by alloy process {dead_pid}, "
        "no longer running)"
    ]
    assert result.stdout == f"wrote {tmp_path / 'out'}\n"
