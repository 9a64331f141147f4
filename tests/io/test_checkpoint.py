"""Lazy checkpoint reading: headers only, one tensor at a time, damage reported with its file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from alloy.errors import CheckpointError, UnsafeCheckpointError
from alloy.io import Checkpoint
from alloy.lab.tiny import TINY


def test_lists_and_reads_like_the_reference(tiny_checkpoint: Path) -> None:
    with Checkpoint.open(tiny_checkpoint) as ckpt:
        assert ckpt.format == "safetensors"
        seen = set()
        for file in ckpt.files:
            with safe_open(str(file), framework="pt") as ref:
                for name in ref.keys():  # noqa: SIM118 (safe_open is not a dict)
                    seen.add(name)
                    expected = ref.get_tensor(name)
                    info = ckpt.info(name)
                    assert info.file == file
                    assert info.shape == tuple(expected.shape)
                    assert info.dtype == expected.dtype
                    assert torch.equal(ckpt.read(name), expected)
        assert seen == set(ckpt.tensors)


def test_parameter_count_matches_transformers(tiny_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with Checkpoint.open(tiny_checkpoint) as ckpt:
        info = ckpt.model_info()
    assert info.num_parameters == model.num_parameters()
    assert info.tied_embeddings == model.config.tie_word_embeddings
    assert info.num_layers == model.config.num_hidden_layers
    assert info.vocab_size == model.config.vocab_size
    assert info.architecture == type(model).__name__
    assert info.warnings == []


def test_sharded_fixtures_are_sharded_and_ordered(tiny_root: Path) -> None:
    with Checkpoint.open(tiny_root / "llama") as ckpt:
        assert len(ckpt.files) > 1
        assert [f.name for f in ckpt.files] == sorted(f.name for f in ckpt.files)
        names = list(ckpt.tensors)
        # physical order: the embedding (first shard) before any layer, layers in order
        assert names[0] == "model.embed_tokens.weight"
        first_layer1 = min(i for i, n in enumerate(names) if n.startswith("model.layers.1."))
        assert all(not n.startswith("model.layers.1.") for n in names[:first_layer1])


def test_single_file_and_missing_config(tiny_root: Path, tmp_path: Path) -> None:
    file = tiny_root / "qwen2" / "model.safetensors"
    with Checkpoint.open(file) as ckpt:
        info = ckpt.model_info()
    assert ckpt.config is None
    assert info.architecture is None
    assert info.num_layers == 2  # inferred from tensor names
    assert info.tied_embeddings  # no lm_head stored
    assert info.vocab_size == 128


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_the_file(tiny_root: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_root / "llama", tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    text = str(err.value)
    assert str(shard) in text and "truncated" in text


def test_every_index_problem_reported_at_once(tiny_root: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_root / "llama", tmp_path / "m")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[0].unlink()
    shards[2].write_bytes(b"garbage!")
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    problems = err.value.problems
    assert any(shards[0].name in p.where and "missing" in p.message for p in problems)
    assert any(shards[2].name in p.where and "truncated" in p.message for p in problems)


def test_index_pointing_to_wrong_shard(tiny_root: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_root / "llama", tmp_path / "m")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        Checkpoint.open(folder)


def test_not_a_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint.open(tmp_path / "absent")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="rename the weights"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="not a model folder"):
        Checkpoint.open(tiny_root / "llama" / "config.json")
    with (
        Checkpoint.open(tiny_root / "llama") as ckpt,
        pytest.raises(CheckpointError, match="no tensor named 'nope'"),
    ):
        ckpt.read("nope")


def _bin_checkpoint(tiny_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_root / "qwen2" / "config.json", folder)
    with Checkpoint.open(tiny_root / "qwen2") as ckpt:
        state = {name: ckpt.read(name) for name in ckpt}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_bin_refused_without_opt_in(tiny_root: Path, tmp_path: Path) -> None:
    folder = _bin_checkpoint(tiny_root, tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        Checkpoint.open(folder)


def test_bin_read_with_opt_in(tiny_root: Path, tmp_path: Path) -> None:
    folder = _bin_checkpoint(tiny_root, tmp_path)
    with (
        Checkpoint.open(folder, allow_pickle=True) as ckpt,
        Checkpoint.open(tiny_root / "qwen2") as ref,
    ):
        assert ckpt.format == "bin"
        assert list(ckpt.tensors) == list(ref.tensors)
        for name in ref:
            assert torch.equal(ckpt.read(name), ref.read(name))
        assert ckpt.model_info().num_parameters == ref.model_info().num_parameters


def test_bin_with_code_is_refused_even_with_opt_in(tmp_path: Path) -> None:
    """weights_only=True refuses pickles that reference arbitrary callables."""
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.ones(2), "payload": Path("x")}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load"):
        Checkpoint.open(folder, allow_pickle=True)


def test_config_disagreeing_with_weights_warns(tiny_root: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_root / "mistral", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config["vocab_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with Checkpoint.open(folder) as ckpt:
        warnings = ckpt.model_info().warnings
    assert any("3 layers" in w for w in warnings)
    assert any("vocab_size is 64" in w for w in warnings)


def test_all_fixture_architectures_present() -> None:
    assert set(TINY) == {"llama", "mistral", "qwen2", "gpt2", "mixtral"}
