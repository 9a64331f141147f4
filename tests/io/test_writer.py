"""The streaming writer: round trips, sharding, side files, cards, and atomicity under failure."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloy.errors import AlloyError, OutputExistsError
from alloy.io import CardInput, Checkpoint, CheckpointWriter, TensorSpec, model_card
from alloy.io.writer import plan_shards, save_state_dict


def _copy_checkpoint(src: Path, out: Path, **options: object) -> Path:
    with Checkpoint.open(src) as ckpt:
        specs = [TensorSpec(i.name, i.shape, i.dtype) for i in ckpt.tensors.values()]
        with CheckpointWriter(out, specs, donor=src, **options) as writer:  # type: ignore[arg-type]
            for name in ckpt:
                writer.write(name, ckpt.read(name))
    return out


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 42, 99, 5, 63, 3, 120]])
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_gives_identical_logits(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = _copy_checkpoint(tiny_checkpoint, tmp_path / "copy", max_shard_bytes=30_000)
    assert torch.equal(_logits(out), _logits(tiny_checkpoint))
    with Checkpoint.open(out) as copy, Checkpoint.open(tiny_checkpoint) as ref:
        assert set(copy.tensors) == set(ref.tensors)
        for name in ref:
            assert torch.equal(copy.read(name), ref.read(name))
        assert copy.model_info().num_parameters == ref.model_info().num_parameters
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is not None
    assert (
        tokenizer("hi there")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_checkpoint)("hi there")["input_ids"]
    )


def test_shards_respect_the_byte_budget(tiny_root: Path, tmp_path: Path) -> None:
    out = _copy_checkpoint(tiny_root / "llama", tmp_path / "copy", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    with Checkpoint.open(out) as ckpt:
        assert index["metadata"]["total_size"] == ckpt.nbytes
        for file in files:
            sizes = [t.nbytes for t in ckpt.tensors.values() if t.file == file]
            assert sum(sizes) <= 20_000 or len(sizes) == 1


def test_plan_shards_golden() -> None:
    """Budget 100 bytes, fp32 tensors of 40, 40, 40, 200, 8 bytes: [40+40], [40], [200], [8].

    The third tensor would make 120 > 100 and starts a shard; the 200-byte tensor is over budget
    on its own and gets a shard to itself; the last one cannot join it (208 > 100).
    """
    sizes = [10, 10, 10, 50, 2]
    specs = [TensorSpec(f"t{k}", (n,), torch.float32) for k, n in enumerate(sizes)]
    shards = plan_shards(specs, 100)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_single_shard_is_model_safetensors(tiny_root: Path, tmp_path: Path) -> None:
    out = _copy_checkpoint(tiny_root / "llama", tmp_path / "copy")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()


def test_mixed_dtypes_stay_aligned(tmp_path: Path) -> None:
    state = {
        "a.half": torch.arange(3, dtype=torch.float16),  # 6 bytes: would misalign what follows
        "b.float": torch.arange(5, dtype=torch.float32),
        "c.long": torch.arange(3, dtype=torch.int64),
        "d.bool": torch.tensor([True, False, True]),
    }
    out = save_state_dict(state, tmp_path / "m")
    with Checkpoint.open(out) as ckpt:
        for name, tensor in state.items():
            info = ckpt.info(name)
            assert (info.begin - ckpt.info("c.long").begin) % tensor.element_size() == 0
            assert torch.equal(ckpt.read(name), tensor)


def test_side_files_from_donor_with_config_updates(tiny_root: Path, tmp_path: Path) -> None:
    donor = tiny_root / "mistral"
    out = _copy_checkpoint(donor, tmp_path / "copy", config_updates={"dtype": "bfloat16"})
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (donor / name).read_bytes()


def test_model_card_records_inputs_and_hashes(tiny_root: Path, tmp_path: Path) -> None:
    src = tiny_root / "qwen2"
    weights = src / "model.safetensors"
    card = model_card(
        title="copy of qwen2",
        summary="A byte-for-byte copy, written by the test suite.",
        command="alloy copy",
        inputs=[CardInput.of("model", src, [weights])],
        recipe="merge_method: linear\n",
    )
    out = _copy_checkpoint(src, tmp_path / "copy", model_card=card)
    text = (out / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: transformers\n")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in text
    assert "merge_method: linear" in text


def test_output_is_deterministic(tiny_root: Path, tmp_path: Path) -> None:
    a = _copy_checkpoint(tiny_root / "mixtral", tmp_path / "a", max_shard_bytes=50_000)
    b = _copy_checkpoint(tiny_root / "mixtral", tmp_path / "b", max_shard_bytes=50_000)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_refuses_non_empty_output_unless_forced(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        _copy_checkpoint(tiny_root / "qwen2", out)
    assert (out / "keep.txt").read_text() == "user data"
    _copy_checkpoint(tiny_root / "qwen2", out, force=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    _copy_checkpoint(tiny_root / "qwen2", empty)  # an empty folder is fine without --force


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


def test_exception_leaves_nothing_and_keeps_previous(tiny_root: Path, tmp_path: Path) -> None:
    out = _copy_checkpoint(tiny_root / "qwen2", tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    specs = [TensorSpec("w", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, specs, force=True) as w:
        w.write("w", torch.ones(4))
        raise RuntimeError("boom")
    assert (out / "model.safetensors").read_bytes() == before
    assert _siblings(out) == []


def test_missing_or_wrong_tensors_fail_without_output(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    with (
        pytest.raises(AlloyError, match="missing: b"),
        CheckpointWriter(tmp_path / "m", specs) as w,
    ):
        w.write("a", torch.zeros(2))
    assert not (tmp_path / "m").exists()
    with pytest.raises(AlloyError, match="planned"), CheckpointWriter(tmp_path / "m", specs) as w:
        w.write("a", torch.zeros(3))
    with pytest.raises(AlloyError, match="twice"), CheckpointWriter(tmp_path / "m", specs) as w:
        w.write("a", torch.zeros(2))
        w.write("a", torch.zeros(2))
    assert not (tmp_path / "m").exists()
    assert _siblings(tmp_path / "m") == []


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from alloy.io import CheckpointWriter, TensorSpec
    specs = [TensorSpec(f"layer.{k}.weight", (256, 256), torch.float32) for k in range(20)]
    with CheckpointWriter(sys.argv[1], specs, max_shard_bytes=1_000_000) as writer:
        for k, spec in enumerate(specs):
            writer.write(spec.name, torch.full(spec.shape, float(k)))
            if k == 10:
                print("halfway", flush=True)
                time.sleep(60)
    """
)


def test_sigkill_mid_write_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "halfway"
        tmp = _siblings(out)
        assert len(tmp) == 1 and ".alloy-tmp-" in tmp[0]  # it really was mid-write
        assert any((tmp_path / tmp[0]).glob("model-*.safetensors"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # The next write to the same place removes the dead process's leftovers.
    save_state_dict({"w": torch.ones(2)}, out)
    assert _siblings(out) == []
    with Checkpoint.open(out) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.ones(2))


def test_sigterm_during_cli_write_cleans_up(tmp_path: Path) -> None:
    """The CLI turns SIGTERM into an exception, so the temporary folder is removed too."""
    script = _SLOW_WRITER.replace(
        "with CheckpointWriter",
        "from alloy.cli.main import _terminate\n"
        "import signal\nsignal.signal(signal.SIGTERM, _terminate)\nwith CheckpointWriter",
    )
    out = tmp_path / "terminated"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "halfway"
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert _siblings(out) == []
