"""Outputs are mode 0644 (files) and 0755 (folders) minus the umask, like `save_pretrained` on a
normal umask, whichever writer made them; and `alloy lab tiny` prints no progress bars."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from alloy.cli.main import main
from alloy.lab.tiny import build_tiny


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    paths = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _assert_modes(folder: Path, file_mode: int = 0o644, folder_mode: int = 0o755) -> None:
    modes = _modes(folder)
    assert len(modes) > 3
    for path, mode in modes.items():
        want = folder_mode if (folder / path).is_dir() else file_mode
        assert mode == want, f"{path}: {oct(mode)}, expected {oct(want)}"


@pytest.mark.usefixtures("umask")
def test_lab_tiny_modes(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    assert main(["lab", "tiny", str(out), "--seed", "1"]) == 0
    assert any(out.glob("*.safetensors"))  # safetensors itself writes these 0600
    _assert_modes(out)


@pytest.mark.usefixtures("umask")
def test_merge_modes(tmp_path: Path) -> None:
    a, b = build_tiny("qwen2", tmp_path / "a", seed=1), build_tiny("qwen2", tmp_path / "b", seed=2)
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
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "-q"]) == 0
    assert (out / "model.safetensors").is_file()  # written by alloy's own writer (os.open)
    _assert_modes(out)


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        assert main(["lab", "tiny", str(tmp_path / "tiny")]) == 0
    finally:
        os.umask(previous)
    _assert_modes(tmp_path / "tiny", 0o640, 0o750)


def test_lab_tiny_prints_no_progress_bars(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    out = tmp_path / "tiny"
    assert main(["lab", "tiny", str(out)]) == 0
    captured = capfd.readouterr()
    assert captured.out == f"wrote {out}\n"
    assert captured.err == ""
    assert hf_logging.is_progress_bar_enabled() == bars  # transformers' setting is restored


@pytest.mark.usefixtures("umask")
def test_programs_stay_executable(tmp_path: Path) -> None:
    """A program unpacked into an atomic folder (the lab's `bible` from its .deb) keeps its
    execute bits; everything else is normalised as above."""
    from alloy.io.atomic import AtomicFolder

    out = tmp_path / "package"
    with AtomicFolder(out, force=False) as tmp:
        (tmp / "bin").mkdir()
        (tmp / "bin" / "tool").write_text("#!/bin/sh\necho ok\n")
        (tmp / "bin" / "tool").chmod(0o700)
        (tmp / "data.txt").write_text("x")
        (tmp / "data.txt").chmod(0o600)
    assert stat.S_IMODE((out / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "data.txt").stat().st_mode) == 0o644
    assert os.access(out / "bin" / "tool", os.X_OK)
