"""AveragingCallback in a real (tiny) Trainer run, checked against the averagers and against
offline averaging of the run's own checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import alloy.cli.average  # noqa: F401  (registers `alloy average`)
from alloy.average import AveragingCallback, WeightAverager
from alloy.cli.main import main
from alloy.errors import InputError
from alloy.lab.tiny import tiny_model, tiny_tokenizer

STEPS = 3


def _data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    rows = []
    for i in range(n):
        ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i))
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _train(out: Path, callback: AveragingCallback, steps: int, **options: Any) -> None:
    _trainer(out, callback, steps, save_only_model=True, **options).train()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AveragingCallback]:
    """A 3-step Trainer run of a tiny llama, saving every step, with three averages."""
    out = tmp_path_factory.mktemp("run")
    callback = AveragingCallback({"ema": {"decay": 0.5}, "swa": {}, "lawa": {"k": 2}})
    _train(out, callback, STEPS)
    return out, callback


def test_checkpoint_rotation_keeps_real_checkpoints(tmp_path: Path) -> None:
    """save_total_limit=2 keeps the last two real checkpoints, each with its average inside
    (sibling `checkpoint-<N>-ema` folders would have counted as checkpoints)."""
    _train(tmp_path, AveragingCallback("ema", save_final=False), 4, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert (tmp_path / "checkpoint-3" / "averaged-ema" / "model.safetensors").is_file()


def test_averages_are_saved_beside_every_checkpoint(
    run: tuple[Path, AveragingCallback],
) -> None:
    out, callback = run
    for name, averager in callback.averagers.items():
        assert averager.count == STEPS
        for step in range(1, STEPS + 1):
            assert (out / f"checkpoint-{step}" / f"averaged-{name}" / "config.json").is_file()
        final = out / f"averaged-{name}"
        assert (final / "tokenizer.json").is_file()  # Trainer's processing_class
        _close(_weights(final), averager.averaged_state_dict())


def test_intermediate_average_is_the_mean_so_far(run: tuple[Path, AveragingCallback]) -> None:
    """checkpoint-2/averaged-swa = (weights after step 1 + weights after step 2) / 2."""
    out, _ = run
    first, second = _weights(out / "checkpoint-1"), _weights(out / "checkpoint-2")
    mean = {name: (first[name] + second[name]) / 2 for name in first}
    _close(_weights(out / "checkpoint-2" / "averaged-swa"), mean, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("ema", ["--method", "ema", "--decay", "0.5"]),
        ("swa", []),
        ("lawa", ["--method", "lawa", "--k", "2"]),
    ],
)
def test_online_equals_offline_over_the_same_checkpoints(
    run: tuple[Path, AveragingCallback], tmp_path: Path, name: str, flags: list[str]
) -> None:
    """The run saved every step, so `alloy average` over its checkpoints applies the same rule
    to the same weights: equal up to fp32 summation order."""
    out, _ = run
    assert main(["average", str(out), str(tmp_path / name), "-q", *flags]) == 0
    _close(_weights(tmp_path / name), _weights(out / f"averaged-{name}"), atol=1e-6)


def test_callback_checks_its_options_up_front() -> None:
    with pytest.raises(InputError) as info:
        AveragingCallback(
            {
                "ema": {"decay": 2.0},
                "slow": {"decay": 0.9},
                "a/b": {},
                "swa": {"k": 3},
                "lawa": 5,  # type: ignore[dict-item]
            }
        )
    text = str(info.value)
    assert "ema.decay: must be in [0, 1)" in text
    assert "slow: no method" in text
    assert "'a/b': not a usable name" in text
    assert "swa.k: applies to method 'lawa' only" in text
    assert "lawa: 5 is not a set of options" in text
    with pytest.raises(InputError, match="nothing to average"):
        AveragingCallback([])


def test_callback_accepts_a_prebuilt_averager_and_several_of_one_method() -> None:
    model = tiny_model("gpt2", seed=1)
    built = WeightAverager(model, method="ema", decay=0.9)
    callback = AveragingCallback(
        {"ema-fast": {"method": "ema", "decay": 0.5}, "ema-slow": built}, save_final=False
    )
    args: Any = type("Args", (), {"output_dir": "unused"})()
    state: Any = type("State", (), {"global_step": 0, "is_world_process_zero": True})()
    callback.on_train_begin(args, state, None, model=model)
    state.global_step = 1
    callback.on_step_end(args, state, None, model=model)
    assert callback.averagers["ema-slow"] is built and built.count == 1
    assert callback.averagers["ema-fast"].count == 1


def _trainer(out: Path, callback: AveragingCallback, steps: int, **options: Any) -> Trainer:
    """A Trainer for a tiny llama saving every step (with optimizer state unless
    save_only_model=True is passed, so that it can be resumed)."""
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=1,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **options,
    )
    return Trainer(
        model=tiny_model("llama", seed=2).train(),
        args=args,
        train_dataset=_data(),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )


def test_resumed_run_continues_its_averages(tmp_path: Path) -> None:
    """Train 4 steps straight; then resume a copy of the run from checkpoint-2: every average
    (EMA fp32 shadow, SWA count, LaWA window) ends where the uninterrupted run's did."""
    import shutil

    specs = {"ema": {"decay": 0.5}, "swa": {}, "lawa": {"k": 2}}
    straight = AveragingCallback(specs, save_final=False)
    _trainer(tmp_path / "a", straight, 4).train()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    saved = tmp_path / "b" / "checkpoint-2" / "averaged-ema" / "averager-state.safetensors"
    assert saved.is_file()
    resumed = AveragingCallback(specs, save_final=False)
    trainer = _trainer(tmp_path / "b", resumed, 4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for name in specs:
        a, b = straight.averagers[name], resumed.averagers[name]
        assert (a.count, a.step) == (b.count, b.step) == (4, 4)
        _close(a.averaged_state_dict(), b.averaged_state_dict(), atol=1e-6)


def test_state_of_another_averager_is_refused(tmp_path: Path) -> None:
    from alloy.errors import CheckpointError

    model = tiny_model("llama", seed=2)
    ema = WeightAverager(model, method="ema", decay=0.9)
    ema.update(model)
    ema.save_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"decay: saved 0\.9, now 0\.5"):
        WeightAverager(model, method="ema", decay=0.5).load_state(tmp_path)
    with pytest.raises(CheckpointError, match="method: saved ema, now swa"):
        WeightAverager(model, method="swa").load_state(tmp_path)
    again = WeightAverager(model, method="ema", decay=0.9)
    again.load_state(tmp_path)
    assert again.count == 1 and torch.equal(again._shadow[0], ema._shadow[0])
