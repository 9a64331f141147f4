"""`alloy train` end to end on tiny checkpoints: outputs, exact losses, replay, distillation,
resume after SIGKILL, and two processes against one."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import alloy
from alloy.cli.main import main
from alloy.errors import IncompatibleModelsError, OutputExistsError
from alloy.train import load_train_recipe, train
from alloy.train.plan import plan_training


def _recipe(tiny_llama: Path, data_dir: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "model": str(tiny_llama),
        "data": [str(data_dir / "docs.jsonl")],
        "schedule": {"name": "cosine", "lr": 3e-3, "warmup": 2, "min_lr": 3e-4},
        "max_steps": 6,
        "batch_size": 4,
        "sequence_length": 32,
        "log_every": 2,
    }
    recipe.update(changes)
    return {k: v for k, v in recipe.items() if v is not None}


def _write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _metrics(folder: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with (folder / "training" / name).open() as f:
        return list(csv.DictReader(f))


def test_cli_trains_and_writes_a_complete_folder(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(
        tiny_llama,
        data_dir,
        averaging={"ema": {"decay": 0.5}},
        eval={"data": [str(data_dir / "old.jsonl")], "every": 3, "max_tokens": 512},
        snapshots={"every": 3},
    )
    out = tmp_path / "out"
    assert main(["train", str(_write(tmp_path / "r.yaml", recipe)), str(out)]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)
    assert AutoModelForCausalLM.from_pretrained(out / "averaged-ema") is not None
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # each snapshot holds the average as it stood at its step: the last one is the final average
    at_3, at_6 = (out / "snapshots" / f"checkpoint-{n}" for n in (3, 6))
    final_ema = AutoModelForCausalLM.from_pretrained(out / "averaged-ema").lm_head.weight
    assert torch.equal(
        AutoModelForCausalLM.from_pretrained(at_6 / "averaged-ema").lm_head.weight, final_ema
    )
    ema_3 = AutoModelForCausalLM.from_pretrained(at_3 / "averaged-ema").lm_head.weight
    raw_3 = AutoModelForCausalLM.from_pretrained(at_3).lm_head.weight
    assert not torch.equal(ema_3, raw_3) and not torch.equal(ema_3, final_ema)
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert int(rows[-1]["tokens_total"]) == 6 * 4 * 32
    evals = _metrics(out, "eval.csv")
    assert [int(e["step"]) for e in evals] == [0, 3, 6]
    card = (out / "README.md").read_text()
    digest = __import__("hashlib").sha256((data_dir / "docs.jsonl").read_bytes()).hexdigest()
    assert digest in card and "## Training" in card and "| steps | 6 |" in card
    assert (out / "training" / "curves.png").stat().st_size > 0
    assert not (tmp_path / "out.checkpoints").exists()
    # the final eval is alloy eval's score of the written model
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer

    scores = evaluate(
        load_scorer(out), load_eval_sets([data_dir / "old.jsonl"]), EvalSettings(max_tokens=512)
    )
    (final,) = scores.values()
    assert float(evals[-1]["perplexity"]) == pytest.approx(final["perplexity"], rel=1e-5)


def test_same_recipe_same_weights(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(tiny_llama, data_dir, max_steps=3)
    train(recipe, tmp_path / "a")
    train(recipe, tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_first_loss_is_the_completion_only_mean(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    """SFT's first logged loss is the mean NLL of the first batch's completion tokens (and EOS)
    under the starting model, computed here by hand from the plan's rows."""
    recipe = load_train_recipe(
        _recipe(
            tiny_llama, data_dir, objective="sft", data=[str(data_dir / "sft.jsonl")], max_steps=2
        )
    )
    plan = plan_training(recipe)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).float().eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(4):
            item = plan.rows[i]
            logits = model(input_ids=item["input_ids"][None]).logits[0, :-1]
            targets = item["labels"][1:]
            keep = targets != -100
            nll += float(
                torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            )
            count += int(keep.sum())
    result = train(recipe, tmp_path / "out")
    assert result.metrics[0]["targets"] == count
    assert result.metrics[0]["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_gradient_accumulation_gives_the_same_steps(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A batch of 4 in one micro batch or in two of 2: the same loss at every step (the loss is
    the mean over the step's targets, not a mean of micro-batch means). SFT rows differ in
    length, which is where a mean of means would differ."""
    base = _recipe(
        tiny_llama, data_dir, objective="sft", data=[str(data_dir / "sft.jsonl")], max_steps=4
    )
    one = train(base, tmp_path / "one")
    two = train({**base, "micro_batch_size": 2}, tmp_path / "two")
    for a, b in zip(one.metrics, two.metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_replay_share_over_a_run(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    replay = {"data": [str(data_dir / "old.jsonl")], "fraction": 0.25}
    result = train(_recipe(tiny_llama, data_dir, replay=replay, max_steps=5), tmp_path / "out")
    # 5 steps x 4 rows, every row 32 tokens: 5 of the 20 rows are replay rows
    assert result.metrics[-1]["replay_total"] == 5 * 32
    assert result.metrics[-1]["replay_fraction"] == 0.25
    summary = json.loads((tmp_path / "out" / "training" / "summary.json").read_text())
    assert summary["replay_fraction"] == 0.25


def test_model_from_config_and_tokenizer(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    }
    recipe = _recipe(
        tiny_llama,
        data_dir,
        model={"config": config, "tokenizer": str(tiny_llama)},
        eval={"data": [str(data_dir / "old.jsonl")], "max_tokens": 256},  # a config-built model
    )
    result = train(recipe, tmp_path / "out")
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hidden_size == 16


def test_distill_from_a_model_with_and_without_the_top_k_cache(
    tiny_llama: Path, tiny_root: Path, data_dir: Path, tmp_path: Path
) -> None:
    teacher = tiny_root / "mistral"  # another tiny model with the same tokenizer
    common = {"objective": "distill", "max_steps": 3}
    dense = train(
        _recipe(tiny_llama, data_dir, teacher={"model": str(teacher), "alpha": 0.5}, **common),
        tmp_path / "dense",
    )
    assert {"kd", "ce"} <= set(dense.metrics[0])
    assert dense.metrics[0]["loss"] == pytest.approx(
        0.5 * dense.metrics[0]["kd"] + 0.5 * dense.metrics[0]["ce"], rel=1e-6
    )
    top = {"model": str(teacher), "alpha": 1.0, "top_k": 8, "temperature": 2.0}
    live = train(_recipe(tiny_llama, data_dir, teacher=top, **common), tmp_path / "live")
    messages: list[str] = []
    cached = train(
        _recipe(tiny_llama, data_dir, teacher={**top, "cache": str(tmp_path / "cache")}, **common),
        tmp_path / "cached",
        say=messages.append,
    )
    assert any("cached in" in m for m in messages)
    for a, b in zip(live.metrics, cached.metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    messages.clear()
    train(
        _recipe(tiny_llama, data_dir, teacher={**top, "cache": str(tmp_path / "cache")}, **common),
        tmp_path / "again",
        say=messages.append,
    )
    assert any("from the cache" in m for m in messages)


@pytest.mark.parametrize("top_k, temperature", [(None, 1.0), (8, 2.0)])
def test_distill_loss_on_whole_rows_equals_the_loss_on_gathered_targets(
    tiny_root: Path, data_dir: Path, top_k: int | None, temperature: float
) -> None:
    """Packed rows (every position a target) take the no-copy path over (B, T, V); a batch with
    an ignored label takes the gathered (N, V) path. Both equal the per-token losses summed by
    hand over the (B, T-1) targets."""
    from types import SimpleNamespace

    from alloy.train.losses import SparseTeacher, distillation_loss, shift_for_next_token
    from alloy.train.objectives.distill import Distill
    from alloy.train.packing import Collator
    from alloy.train.teacher import load_teacher

    student = AutoModelForCausalLM.from_pretrained(tiny_root / "llama", dtype=torch.float32)
    teacher = load_teacher(
        str(tiny_root / "mistral"), device=torch.device("cpu"), dtype="float32", vocab=128
    )
    settings = SimpleNamespace(
        alpha=0.3, loss="forward_kl", temperature=temperature, beta=0.5, top_k=top_k
    )
    objective = Distill(teacher, None, settings, vocab=128)
    plan = plan_training(load_train_recipe(_recipe(tiny_root / "llama", data_dir)))
    packed = Collator(0)([plan.rows[i] for i in range(3)])
    holed = {**packed, "labels": packed["labels"].clone()}
    holed["labels"][0, 5:9] = -100
    for batch in (packed, holed):
        with torch.no_grad():
            parts = objective.loss(student, batch)
            logits = student(input_ids=batch["input_ids"]).logits
            s, targets, mask = shift_for_next_token(logits, batch["labels"])
            t: Any = teacher.scores(batch)[:, :-1][mask]
            if top_k:
                top = torch.log_softmax(t, dim=-1).topk(top_k, dim=-1)
                t = SparseTeacher(top.values, top.indices)
            loss, kd, _ = distillation_loss(
                s, targets, t, alpha=0.3, temperature=temperature, kind="forward_kl"
            )
        assert int(parts.count) == int(mask.sum())
        torch.testing.assert_close(parts.total, loss.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts.metrics["kd"], kd.sum(), rtol=1e-5, atol=1e-5)


def test_ensemble_teacher_targets_are_the_ensembles_scores(
    tiny_root: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The teacher distribution of an ensemble recipe, at the real next tokens, equals what
    `alloy.Ensemble` scores for those tokens."""
    from alloy.train.packing import Collator
    from alloy.train.teacher import load_teacher

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "rule": "linear",
                "members": [
                    {"model": str(tiny_root / "llama"), "weight": 0.7},
                    {"model": str(tiny_root / "mistral"), "weight": 0.3},
                ],
            }
        )
    )
    plan = plan_training(load_train_recipe(_recipe(tiny_root / "llama", data_dir)))
    batch = Collator(0)([plan.rows[i] for i in range(3)])
    teacher = load_teacher(str(recipe), device=torch.device("cpu"), dtype="float32", vocab=128)
    logprobs = torch.log_softmax(teacher.scores(batch), dim=-1)[:, :-1]  # (B, T-1, V)
    targets = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = alloy.Ensemble.from_recipe(recipe).token_logprobs(
        batch["input_ids"], torch.ones_like(batch["input_ids"])
    )[:, 1:]
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)


def test_teacher_with_another_tokenizer_is_refused(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    from alloy.lab.tokens import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["some other text entirely"] * 10, vocab_size=300).save_pretrained(other)
    recipe = _recipe(tiny_llama, data_dir, objective="distill", teacher={"model": str(other)})
    with pytest.raises(IncompatibleModelsError, match="does not share the student's tokenizer"):
        train(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_outputs_are_never_overwritten_without_force(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = _recipe(tiny_llama, data_dir, max_steps=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        train(recipe, out)
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "b.checkpoints").mkdir()
    with pytest.raises(OutputExistsError, match="--resume"):
        train(recipe, tmp_path / "b")
    train(recipe, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_dry_run_and_plot_schedule_write_nothing_else(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path / "r.yaml",
        _recipe(
            tiny_llama,
            data_dir,
            max_tokens=5000,
            max_steps=None,
            replay={"data": [str(data_dir / "old.jsonl")], "fraction": 0.05},
        ),
    )
    png = tmp_path / "lr.png"
    assert main(["train", str(path), "--dry-run", "--plot-schedule", str(png)]) == 0
    out = capsys.readouterr().out
    assert "steps: 40 of 4 rows x 32 tokens" in out  # ceil(5000 / 128)
    assert "replay: 5.00% of tokens" in out and "lr at step:" in out and "memory:" in out
    assert png.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png", "r.yaml"]


def test_python_api_is_callable(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    result = alloy.train(_recipe(tiny_llama, data_dir, max_steps=2), tmp_path / "out")
    assert result.steps == 2 and (tmp_path / "out" / "config.json").is_file()


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def test_resume_after_sigkill_equals_an_uninterrupted_run(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = _write(
        tmp_path / "r.yaml",
        _recipe(
            tiny_llama,
            data_dir,
            max_steps=60,
            checkpoints={"every": 10},
            averaging={"ema": {"decay": 0.8}},
            eval=None,
        ),
    )
    alloy_cli = [sys.executable, "-m", "alloy", "train", "-q", str(recipe)]
    subprocess.run([*alloy_cli, str(tmp_path / "whole")], check=True, env=_env())
    run = subprocess.Popen([*alloy_cli, str(tmp_path / "cut")], env=_env())
    marker = tmp_path / "cut.checkpoints" / "checkpoint-20" / "trainer_state.json"
    deadline = time.time() + 120
    while not marker.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "cut").exists(), "killed too late to test resuming"
    subprocess.run([*alloy_cli, str(tmp_path / "cut"), "--resume"], check=True, env=_env())
    for folder in ("", "averaged-ema"):
        a, b = _weights(tmp_path / "whole" / folder), _weights(tmp_path / "cut" / folder)
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    assert _metrics(tmp_path / "whole")[-1]["loss"] == _metrics(tmp_path / "cut")[-1]["loss"]


def test_two_processes_match_one(tiny_llama: Path, data_dir: Path, tmp_path: Path) -> None:
    """DDP over two CPU processes (gloo) with the same global batch: the same losses.

    accelerate 1.16's `--cpu` flag starts one process unless MPI is set up; `--multi_gpu` starts
    two through torchrun, and on a machine without a GPU Trainer gives each a CPU and gloo."""
    pytest.importorskip("accelerate")
    recipe = _write(
        tmp_path / "r.yaml",
        _recipe(
            tiny_llama,
            data_dir,
            objective="sft",
            data=[str(data_dir / "sft.jsonl")],
            max_steps=4,
            device="cpu",
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "alloy", "train", "-q", str(recipe), str(tmp_path / "one")],
        check=True,
        env=_env(),
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "alloy",
        "train",
        "-q",
        str(recipe),
        str(tmp_path / "two"),
    ]
    subprocess.run(launch, check=True, env=_env(), capture_output=True)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [float(r["loss"]) for r in one] == pytest.approx(
        [float(r["loss"]) for r in two], rel=1e-5
    )
    summary = json.loads((tmp_path / "two" / "training" / "summary.json").read_text())
    assert summary["processes"] == 2


def test_output_keeps_the_starting_dtype(tiny_root: Path, data_dir: Path, tmp_path: Path) -> None:
    """A bf16 checkpoint trains in fp32 and is written back in bf16, averages included."""
    recipe = _recipe(
        tiny_root / "mistral", data_dir, max_steps=2, averaging={"ema": {"decay": 0.5}}
    )
    train(recipe, tmp_path / "out")
    for folder in (tmp_path / "out", tmp_path / "out" / "averaged-ema"):
        assert {t.dtype for t in _weights(folder).values()} == {torch.bfloat16}
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (tmp_path / "out" / "training_args.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
