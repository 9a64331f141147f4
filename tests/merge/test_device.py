"""Computing on an accelerator gives the CPU result; asking for a missing one is bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.io import Checkpoint
from alloy.lab.tiny import build_tiny


def _recipe(tmp_path: Path) -> Path:
    base = build_tiny("llama", tmp_path / "base", seed=1)
    a = build_tiny("llama", tmp_path / "a", seed=2)
    b = build_tiny("llama", tmp_path / "b", seed=3)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 1.0, "density": 0.5},
    }
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return file


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_missing_cuda_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(_recipe(tmp_path)), str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    assert main(["merge", str(recipe), str(tmp_path / "cpu"), "-q"]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "gpu"), "-q", "--device", "cuda"]) == 0
    with Checkpoint.open(tmp_path / "cpu") as cpu, Checkpoint.open(tmp_path / "gpu") as gpu:
        for name in cpu:
            torch.testing.assert_close(gpu.read(name), cpu.read(name), rtol=1e-5, atol=1e-6)
