"""Ctrl-C in any phase of any command: exit 130, one line saying what stopped and what is kept."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import alloy.cli.main as cli
from alloy.cli.main import main
from alloy.io.checkpoint import Checkpoint
from alloy.lab.tiny import build_tiny


def _ctrl_c(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "alloy-tmp" in p.name or p.name == "out")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_tiny("llama", root / "a", seed=1), build_tiny("llama", root / "b", seed=2)


def _merge_args(tmp_path: Path, a: Path) -> list[str]:
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}}]}
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return ["merge", str(file), str(tmp_path / "out")]


def _commands(tmp_path: Path, a: Path, b: Path) -> dict[str, list[str]]:
    out = str(tmp_path / "out")
    return {
        "merge": _merge_args(tmp_path, a),
        "average": ["average", str(a), str(b), out],
        "moe": ["moe", str(a), out, "--experts", "2"],
    }


@pytest.mark.parametrize("command", ["merge", "average", "moe"])
def test_ctrl_c_while_reading_tensors_exits_130_with_one_line(
    command: str,
    models: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = _commands(tmp_path, *models)[command]
    monkeypatch.setattr(Checkpoint, "read", _ctrl_c)
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted: alloy {command} stopped; nothing was written"
    assert not any("Traceback" in line or "interrupted" in line for line in err[:-1])
    assert _leftovers(tmp_path) == []


def test_ctrl_c_during_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Importing the commands imports torch, which takes seconds: a Ctrl-C there is common.
    monkeypatch.setattr(cli, "_register", _ctrl_c)
    assert main(["merge", "x.yaml", "out"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted: alloy merge stopped; nothing was written"
    assert "Traceback" not in captured.err + captured.out


def test_sigterm_says_terminated(
    models: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def terminate(*args: object, **kwargs: object) -> None:
        cli._terminate(15, None)

    monkeypatch.setattr(Checkpoint, "read", terminate)
    assert main(_merge_args(tmp_path, models[0])) == 130
    assert capsys.readouterr().err.strip().startswith("terminated: alloy merge stopped;")
    assert _leftovers(tmp_path) == []


def test_a_command_says_what_it_keeps(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def keep_then_stop(*args: object, **kwargs: object) -> None:
        cli.on_interrupt("checkpoints so far are kept in OUT.checkpoints")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_register", keep_then_stop)
    assert main(["train", "r.yaml", "OUT"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: alloy train stopped; checkpoints so far are kept in OUT.checkpoints"
    # The note is per run: the next command starts from "nothing was written" again.
    monkeypatch.setattr(cli, "_register", _ctrl_c)
    assert main(["eval", "m"]) == 130
    assert capsys.readouterr().err.strip().endswith("; nothing was written")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_while_starting_up(
    signum: int, models: tuple[Path, Path], tmp_path: Path
) -> None:
    # The child says when alloy's entry point is about to run; the signal then lands while the
    # commands are imported (a second or more), however loaded the machine is.
    code = (
        "import sys, alloy.cli as c; print('ready', flush=True); "
        f"sys.argv = ['alloy', *{_merge_args(tmp_path, models[0])!r}]; c.run()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("nothing was written")
    assert _leftovers(tmp_path) == []
