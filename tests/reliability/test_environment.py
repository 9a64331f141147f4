"""Environment errors (unwritable outputs, unknown devices, truncated checkpoints) are located
input errors: exit 2, a message naming the user's path or option, checked before any work, and
nothing left on disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from alloy.cli.main import main
from alloy.errors import InputError
from alloy.io.writable import check_writable, write_file
from alloy.lab.tiny import build_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return build_tiny("llama", root / "a", seed=1), build_tiny("llama", root / "b", seed=2)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("text") / "t.txt"
    file.write_text("It is a truth universally acknowledged, that a single man. " * 20)
    return file


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _leftovers(folder: Path) -> list[str]:
    """Everything in `folder` but the regular file the tests put outputs under."""
    return sorted(p.name for p in folder.iterdir() if p.name != "afile")


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    """A regular file: an output path under it cannot be created."""
    file = tmp_path / "afile"
    file.write_text("not a folder")
    return file


def _command(name: str, out: str, pair: tuple[Path, Path], text: Path, tmp: Path) -> list[str]:
    a, b = (str(p) for p in pair)
    if name == "eval":
        return ["eval", a, "--data", str(text), "--json", out]
    if name == "soup":
        return ["soup", out, "-c", a, b, "--eval", str(text)]
    if name == "average":
        return ["average", a, b, out]
    if name == "moe":
        return ["moe", a, out, "--experts", "2", "--no-report"]
    if name == "generate":
        return ["generate", a, "--prompt", "hi", "--max-new-tokens", "2", "--out", out]
    recipe = {
        "objective": "causal_lm",
        "model": a,
        "data": [str(text)],
        "schedule": {"name": "constant", "lr": 1e-3},
        "max_steps": 2,
        "batch_size": 2,
        "sequence_length": 16,
    }
    (tmp / "train.yaml").write_text(yaml.safe_dump(recipe))
    return ["train", str(tmp / "train.yaml"), out]


COMMANDS = ("eval", "soup", "average", "moe", "generate", "train")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file_is_refused_first(
    command: str,
    pair: tuple[Path, Path],
    text: Path,
    tmp_path: Path,
    afile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(afile / "sub" / "out")
    args = _command(command, out, pair, text, tmp_path)
    rc, stdout, err = _run(args, capsys)
    assert rc == 2, err
    assert out in err and "is a file, not a folder" in err and "internal error" not in err
    assert "perplexity" not in stdout and "scored" not in err  # refused before any work
    assert _leftovers(tmp_path) == (["train.yaml"] if command == "train" else [])


@pytest.mark.parametrize("command", COMMANDS)
def test_output_where_no_file_can_be_created(
    command: str,
    pair: tuple[Path, Path],
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = "/proc/alloy-out"  # /proc takes no new files, not even for root
    rc, _, err = _run(_command(command, out, pair, text, tmp_path), capsys)
    assert rc == 2, err
    assert out in err and "cannot write in /proc" in err and "internal error" not in err


def test_read_only_filesystem_is_named(
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("alloy.io.writable.tempfile.mkstemp", read_only)
    out = tmp_path / "merged"
    rc, _, err = _run(["average", str(pair[0]), str(pair[1]), str(out)], capsys)
    assert rc == 2
    assert str(out) in err and "read-only file system" in err
    assert _leftovers(tmp_path) == []


def test_output_folder_that_is_a_file(tmp_path: Path, afile: Path) -> None:
    with pytest.raises(InputError, match="afile: exists and is a file, not a folder"):
        check_writable(afile, "OUT")
    with pytest.raises(InputError, match="is a folder, not a file"):
        check_writable(tmp_path, "--json", folder=False)
    check_writable(tmp_path / "new" / "deeper" / "x.json", "--json", folder=False)
    assert _leftovers(tmp_path) == []  # the probe file is removed


def test_failed_last_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new" / "results.json"
    target.mkdir(parents=True)  # replacing a folder by a file fails at the rename
    (target / "keep").write_text("x")
    with pytest.raises(InputError, match=r"--json .*results.json: cannot write"):
        write_file(target, "{}", "--json")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["results.json"]
    write_file(tmp_path / "made" / "here" / "r.json", "{}", "--json")
    assert json.loads((tmp_path / "made" / "here" / "r.json").read_text()) == {}
    assert [p.name for p in (tmp_path / "made" / "here").iterdir()] == ["r.json"]


def test_failed_write_removes_the_folders_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(InputError, match="no space left"):
        write_file(tmp_path / "a" / "b" / "r.json", "{}", "--out")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ("eval", "soup", "moe", "generate"))
def test_unknown_device_lists_the_devices_here(
    command: str,
    pair: tuple[Path, Path],
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "out")
    rc, _, err = _run([*_command(command, out, pair, text, tmp_path), "--device", "tpu"], capsys)
    assert rc == 2, err
    assert "--device tpu" in err and "devices here: cpu" in err
    assert _leftovers(tmp_path) == []


def test_unknown_device_in_an_ensemble_recipe(
    pair: tuple[Path, Path], text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "ens.yaml"
    members = [{"model": str(pair[0])}, {"model": str(pair[1]), "device": "tpu"}]
    recipe.write_text(yaml.safe_dump({"rule": "linear", "members": members}))
    rc, _, err = _run(["eval", str(recipe), "--data", str(text)], capsys)
    assert rc == 2
    assert "members.1.device tpu" in err and "devices here: cpu" in err


@pytest.mark.parametrize("command", ("eval", "generate"))
def test_truncated_checkpoint_is_named(
    command: str,
    pair: tuple[Path, Path],
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "cut"
    shutil.copytree(pair[0], model)
    shard = max(model.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)
    args = (
        ["eval", str(model), "--data", str(text)]
        if command == "eval"
        else ["generate", str(model), "--prompt", "hi"]
    )
    rc, _, err = _run(args, capsys)
    assert rc == 2, err
    assert str(shard) in err and "truncated" in err and "internal error" not in err
