"""Offline averaging: order, weights, the `alloy average` command end to end, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import alloy.cli.average  # noqa: F401  (registers `alloy average`)
from alloy.average import average_checkpoints, plan_average
from alloy.average.offline import find_checkpoints
from alloy.cli.main import main
from alloy.errors import InputError
from alloy.io import Checkpoint
from alloy.lab.tiny import build_tiny

STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run: checkpoint-10/20/30 of a tiny llama (fp32, sharded), distinct weights;
    checkpoint-20 also has a trainer_state.json that agrees with its name."""
    root = tmp_path_factory.mktemp("trajectory")
    for k, step in enumerate(STEPS):
        build_tiny("llama", root / f"checkpoint-{step}", seed=10 + k)
    (root / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    return root


def _state(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint}


def _weighted(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    states = [_state(f) for f in folders]
    result = {}
    for name in states[0]:
        total = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for w, state in zip(weights, states, strict=True):
            total += w * state[name].double()
        result[name] = total.float()
    return result


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_uniform_cli_equals_the_in_memory_mean(trajectory: Path, tmp_path: Path) -> None:
    out = tmp_path / "mean"
    assert main(["average", str(trajectory), str(out), "-q"]) == 0
    folders = [trajectory / f"checkpoint-{s}" for s in STEPS]
    expected = _weighted(folders, [1 / 3] * 3)
    _assert_close(_state(out), expected)
    model = AutoModelForCausalLM.from_pretrained(out)  # a normal HF folder
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and "uniform average of 3" in (
        out / "README.md"
    ).read_text()


def test_ema_weights_match_the_recursion(trajectory: Path, tmp_path: Path) -> None:
    """decay 0.5 over steps 10, 20, 30: s = x10; s = .5s + .5x20; s = .5s + .5x30, so
    w = .25, .25, .5 (sum 1); the output equals the recursion run on the checkpoints."""
    plan = plan_average([trajectory], method="ema", decay=0.5)
    assert [c.step for c in plan.checkpoints] == list(STEPS)
    assert plan.weights == [0.25, 0.25, 0.5]
    out = tmp_path / "ema"
    assert main(["average", str(trajectory), str(out), "--method", "ema", "--decay", "0.5"]) == 0
    states = [_state(trajectory / f"checkpoint-{s}") for s in STEPS]
    recursion = {name: t.clone() for name, t in states[0].items()}
    for state in states[1:]:
        for name, tensor in recursion.items():
            tensor.mul_(0.5).add_(state[name], alpha=0.5)
    _assert_close(_state(out), recursion)


def test_lawa_reads_only_the_latest_k(trajectory: Path, tmp_path: Path) -> None:
    plan = plan_average([trajectory], method="lawa", k=2)
    assert plan.weights == [0.0, 0.5, 0.5]
    models = plan.recipe()["models"]
    assert [m["model"] for m in models] == [
        str(trajectory / "checkpoint-30"),  # newest first: the donor of config and tokenizer
        str(trajectory / "checkpoint-20"),
    ]
    out = average_checkpoints([trajectory], tmp_path / "lawa", method="lawa", k=2)
    folders = [trajectory / f"checkpoint-{s}" for s in STEPS[1:]]
    _assert_close(_state(out), _weighted(folders, [0.5, 0.5]))


def test_tied_fp16_checkpoints(tmp_path: Path) -> None:
    """qwen2 tiny is tied and fp16: the output keeps fp16 and loads with the tie intact."""
    folders = [build_tiny("qwen2", tmp_path / f"checkpoint-{s}", seed=s) for s in (1, 2)]
    out = tmp_path / "out"
    assert main(["average", *map(str, folders), str(out), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    expected = _weighted(folders, [0.5, 0.5])
    for name, tensor in _state(out).items():
        torch.testing.assert_close(tensor.float(), expected[name], rtol=1e-3, atol=1e-3)


def test_order_comes_from_trainer_state(trajectory: Path, tmp_path: Path) -> None:
    """A folder with any name is placed by its trainer_state.json global_step."""
    late = tmp_path / "final"
    shutil.copytree(trajectory / "checkpoint-10", late)
    (late / "trainer_state.json").write_text(json.dumps({"global_step": 99}))
    plan = plan_average([late, trajectory / "checkpoint-30"], method="ema", decay=0.2)
    assert [c.step for c in plan.checkpoints] == [30, 99]
    assert plan.weights == pytest.approx([0.2, 0.8])


def test_dry_run_prints_weights_and_writes_nothing(
    trajectory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    args = ["average", str(trajectory), str(out), "--method", "ema", "--decay", "0.5", "--dry-run"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "step       20  weight 0.25" in text and "step       30  weight 0.5" in text
    assert not out.exists()


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["average", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_inputs_exit_2(
    trajectory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, out = str(trajectory / "checkpoint-10"), str(tmp_path / "out")
    assert "no such folder" in _error([str(tmp_path / "nope"), out], capsys)
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert "is a file" in _error([str(file), out], capsys)
    (tmp_path / "empty").mkdir()
    assert "neither a model folder" in _error([str(tmp_path / "empty"), out], capsys)
    assert "listed twice" in _error([ckpt, ckpt, out], capsys)
    assert "ema needs a decay" in _error([str(trajectory), out, "--method", "ema"], capsys)
    assert "applies to --method ema only" in _error([ckpt, out, "--decay", "0.5"], capsys)
    assert "applies to --method lawa only" in _error([ckpt, out, "--k", "2"], capsys)
    assert "unknown method 'mean'" in _error([ckpt, out, "--method", "mean"], capsys)
    err = _error([str(trajectory), out, "--method", "lawa", "--k", "4"], capsys)
    assert "only 3 checkpoints given" in err
    err = _error([str(trajectory), out, "--method", "ema", "--decay", "1.5"], capsys)
    assert "must be in [0, 1)" in err


def test_ambiguous_order_exits_2(
    trajectory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    liar = tmp_path / "run" / "checkpoint-40"
    shutil.copytree(trajectory / "checkpoint-10", liar)
    (liar / "trainer_state.json").write_text(json.dumps({"global_step": 15}))
    assert "ambiguous step" in _error([str(liar), out], capsys)

    nameless = tmp_path / "nameless"
    shutil.copytree(trajectory / "checkpoint-20", nameless, ignore=shutil.ignore_patterns("t*"))
    args = [str(nameless), str(trajectory / "checkpoint-10"), out, "--method", "ema"]
    assert "no training step" in _error([*args, "--decay", "0.5"], capsys)
    # a uniform mean does not need the order
    assert main(["average", str(nameless), str(trajectory / "checkpoint-10"), out, "-q"]) == 0

    twin = tmp_path / "other" / "checkpoint-10"
    shutil.copytree(trajectory / "checkpoint-20", twin, ignore=shutil.ignore_patterns("t*"))
    args = [str(twin), str(trajectory / "checkpoint-10"), str(tmp_path / "o2"), "--method", "lawa"]
    assert "step 10 is also" in _error([*args, "--k", "1"], capsys)

    both = tmp_path / "both"
    shutil.copytree(trajectory, both)
    shutil.copy(trajectory / "checkpoint-10" / "config.json", both / "config.json")
    err = _error([str(both), str(tmp_path / "o3")], capsys)
    assert "holds both a model and 3 checkpoint" in err


def test_never_overwrites_without_force(
    trajectory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    ckpt = str(trajectory / "checkpoint-10")
    assert "pass --force" in _error([ckpt, str(out)], capsys)
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["average", ckpt, str(out), "--force", "-q"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["average", "--help"]) == 0
    out = capsys.readouterr().out
    assert "CKPT..." in out and "--method" in out and "--decay" in out


def test_find_checkpoints_library_errors_list_every_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        find_checkpoints([tmp_path / "a", tmp_path / "b"])
    assert len(info.value.problems) == 2
