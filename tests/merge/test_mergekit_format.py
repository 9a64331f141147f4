"""mergekit compatibility of the recipe format and of `alloy merge`'s flags (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.io import Checkpoint
from alloy.lab.tiny import build_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return build_tiny("llama", root / "a", seed=1), build_tiny("llama", root / "b", seed=2)


def _linear(tmp_path: Path, pair: tuple[Path, Path], extra: str = "") -> Path:
    a, b = pair
    text = (
        "# a comment mergekit keeps\nmerge_method: linear\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 3.0}}\n{extra}"
    )
    file = tmp_path / "recipe.yml"
    file.write_text(text)
    return file


def test_mergekit_flags_are_accepted(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _linear(tmp_path, pair)
    out = tmp_path / "out"
    args = ["merge", str(file), str(out), "-q", "--out-shard-size", "20K", "--no-copy-tokenizer"]
    args += ["--no-write-model-card", "--lazy-unpickle", "--allow-crimes"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "note: --lazy-unpickle: alloy always reads weights lazily" in err
    assert "note: --allow-crimes: alloy merges only models of one architecture" in err
    # the recipe exactly as written, as mergekit-yaml keeps it
    assert (out / "mergekit_config.yml").read_text() == file.read_text()
    assert not (out / "README.md").exists()
    assert not list(out.glob("tokenizer*"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # 20K is 20,000 bytes per shard, as mergekit's writer counts (one bigger tensor alone)
    with (
        Checkpoint.open(out) as merged,
        Checkpoint.open(pair[0]) as a,
        Checkpoint.open(pair[1]) as b,
    ):
        for shard in shards:
            names = [n for n, s in index["weight_map"].items() if s == shard]
            size = sum(merged.tensors[n].nbytes for n in names)
            assert size <= 20_000 or len(names) == 1
        for name in merged.tensors:  # weights 1 and 3, normalised: 0.25 a + 0.75 b
            expected = 0.25 * a.read(name).float() + 0.75 * b.read(name).float()
            torch.testing.assert_close(merged.read(name).float(), expected)


def test_defaults_write_card_tokenizer_and_config(pair: tuple[Path, Path], tmp_path: Path) -> None:
    file = _linear(tmp_path, pair)
    assert main(["merge", str(file), str(tmp_path / "out"), "-q", "--copy-tokenizer"]) == 0
    out = tmp_path / "out"
    assert (out / "README.md").exists()
    assert (out / "tokenizer.json").exists() == (pair[0] / "tokenizer.json").exists()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"


def test_cuda_means_device_cuda(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _linear(tmp_path, pair)
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert main(["merge", str(file), str(tmp_path / "out"), "--cuda"]) == 2
    assert "cuda" in capsys.readouterr().err
    args = ["merge", str(file), str(tmp_path / "out"), "--cuda", "--device", "cuda:1"]
    assert main(args) == 2  # no GPU here, but the two flags agree
    assert "disagree" not in capsys.readouterr().err
    args = ["merge", str(file), str(tmp_path / "out"), "--cuda", "--device", "mps"]
    assert main(args) == 2
    assert "--cuda and --device mps disagree" in capsys.readouterr().err
    assert main(["merge", str(file), str(tmp_path / "out"), "--out-shard-size", "5X"]) == 2
    assert not (tmp_path / "out").exists()


def test_tolerated_keys_warn_and_merge_as_without_them(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = f"input_model_parameters: {{}}\nbase_model: {pair[0]}\nparameters: {{density: 0.5}}\n"
    file = _linear(tmp_path, pair, extra).rename(tmp_path / "tolerated.yml")
    assert main(["validate", str(file), "--recipe-only"]) == 0
    err = capsys.readouterr().err
    assert "warning: input_model_parameters: ignored, as mergekit ignores it" in err
    assert "warning: parameters.density: linear does not use 'density'" in err
    assert main(["merge", str(file), str(tmp_path / "out"), "-q"]) == 0
    assert "parameters.density: linear does not use 'density'" in capsys.readouterr().err
    plain = _linear(tmp_path, pair, f"base_model: {pair[0]}\n")
    assert main(["merge", str(plain), str(tmp_path / "plain"), "-q"]) == 0
    with Checkpoint.open(tmp_path / "out") as x, Checkpoint.open(tmp_path / "plain") as y:
        for name in x.tensors:
            assert torch.equal(x.read(name), y.read(name))


@pytest.mark.parametrize(
    "text, message",
    [
        ("base_model: x\ngate_mode: random\n", "experts: missing"),
        ("base_model: x\nexpert:\n  - source_model: a\n", "did you mean 'experts'?"),
        ("base_model: x\nshared_experts: []\narchitecture: qwen\n", "experts: missing"),
    ],
)
def test_validate_reads_mergekit_moe_recipes_as_moe(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "moe.yaml"
    file.write_text(text)
    assert main(["validate", str(file), "--recipe-only"]) == 2
    err = capsys.readouterr().err
    assert "invalid MoE recipe" in err and message in err
    assert "merge_method" not in err


VENV = Path(os.environ.get("ALLOY_MERGEKIT_VENV", "/tmp/mergekit-venv"))


@pytest.mark.skipif(not (VENV / "bin" / "mergekit-yaml").exists(), reason=f"no mergekit at {VENV}")
def test_mergekit_yaml_tolerates_the_same_keys_and_merges_the_same(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """mergekit-yaml, run with the same flags on a slerp recipe carrying `weight` and a model's
    `layer_range`, gives the tensors alloy gives (slerp agrees to float32 rounding) and the same
    mergekit_config.yml, byte for byte."""
    a, b = pair
    file = tmp_path / "slerp.yml"
    file.write_text(
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {b}\n    layer_range: [0, 2]\n"
        "parameters:\n  t: 0.3\n  weight: 1.0\ndtype: float32\n"
    )
    flags = ["--no-copy-tokenizer", "--lazy-unpickle", "--out-shard-size", "1B"]
    assert main(["merge", str(file), str(tmp_path / "ours"), "-q", *flags]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(VENV / "bin" / "mergekit-yaml"), str(file), str(tmp_path / "theirs"), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert (ours / "mergekit_config.yml").read_bytes() == (
        theirs / "mergekit_config.yml"
    ).read_bytes()
    with Checkpoint.open(ours) as x, Checkpoint.open(theirs) as y:
        assert set(x.tensors) == set(y.tensors)
        for name in x.tensors:
            torch.testing.assert_close(x.read(name), y.read(name), rtol=0, atol=2e-6)
