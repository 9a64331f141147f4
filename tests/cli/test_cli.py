"""The `alloy` command line: help, version, inspect, exit codes and error display."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import alloy
from alloy.cli.main import main
from alloy.io import Checkpoint


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alloy {alloy.__version__}"


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "lab" in out


def test_inspect_json_matches_transformers(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tiny_checkpoint), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert data["num_parameters"] == model.num_parameters()
    assert data["architecture"] == type(model).__name__
    assert data["num_layers"] == 2
    assert sum(s["bytes"] for s in data["shards"]) == data["nbytes"]


def test_inspect_table(tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_root / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out
    assert "tied embeddings  yes" in out
    assert "model-00001-of-" in out


def test_bad_input_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


def test_verbose_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "inspect", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect"]) == 2
    assert main(["no-such-command"]) == 2


def test_bin_refused_with_exit_2_and_how_to_opt_in(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_root / "llama" / "config.json", folder)
    with Checkpoint.open(tiny_root / "llama") as ckpt:
        torch.save({n: ckpt.read(n) for n in ckpt}, folder / "pytorch_model.bin")
    assert main(["inspect", str(folder)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["inspect", str(folder), "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "bin"


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `alloy` entry point builds a checkpoint and inspects it (real processes)."""
    exe = Path(sys.executable).parent / "alloy"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "alloy"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "tiny"
    built = subprocess.run(
        [*command, "lab", "tiny", str(out), "--arch", "qwen2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    shown = subprocess.run(
        [*command, "inspect", str(out), "--json"], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["architecture"] == "Qwen2ForCausalLM"
    again = subprocess.run(
        [*command, "lab", "tiny", str(out)], capture_output=True, text=True, env=env
    )
    assert again.returncode == 2 and "--force" in again.stderr
