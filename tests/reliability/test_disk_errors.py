"""A full disk or a refused write mid-run: exit 2 naming the user's path, nothing left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml

import alloy.io.writer as writer
from alloy.cli.main import main
from alloy.io.atomic import user_path


def _recipe(tmp_path: Path, model: Path) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(model), "parameters": {"weight": 1.0}}],
    }
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return file


def test_user_path_hides_the_temporary_sibling() -> None:
    hidden = "/runs/.merged.alloy-tmp-42-0123abcd/model-00001-of-00002.safetensors"
    assert user_path(hidden) == Path("/runs/merged/model-00001-of-00002.safetensors")
    assert user_path("/runs/.merged.alloy-tmp-x/a") == Path("/runs/.merged.alloy-tmp-x/a")


def test_disk_full_while_writing(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.os, "pwrite", full)
    out = tmp_path / "merged"
    assert main(["merge", str(_recipe(tmp_path, tiny_root / "llama")), str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}{os.sep}model" in err and "No space left on device" in err
    assert "alloy-tmp" not in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_permission_refused_while_creating_a_shard(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_open = os.open

    def refuse(path: str | os.PathLike[str], *args: object, **kwargs: object) -> int:
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.os, "open", refuse)
    out = tmp_path / "merged"
    assert main(["merge", str(_recipe(tmp_path, tiny_root / "llama")), str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{out}{os.sep}model" in err and "check the permissions" in err
    assert "alloy-tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
