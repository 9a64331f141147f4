"""`objective: context_distill` end to end: the CLI on a tiny checkpoint (the distilled student
moves towards the start model with the context), a resumed run equal to an uninterrupted one,
and every bad `context:` reported at once before any weight loads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.train.conftest import metric_rows, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloy.cli.main import main
from alloy.errors import RecipeError
from alloy.train import load_train_recipe, train
from alloy.train.context import ContextEntry
from alloy.train.objectives.context_distill import ContextDistill
from alloy.train.packing import Collator
from alloy.train.plan import plan_training

# A context that changes what the tiny model predicts after "=": many sums ending in "7".
CONTEXT = "".join(f"{a}+{7 - a}=7\n" for a in range(8)) * 2


def _recipe(tiny_llama: Path, data_dir: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "context_distill",
        "model": str(tiny_llama),
        "data": [str(data_dir / "sft.jsonl")],
        "context": {"text": CONTEXT},
        "schedule": {"name": "constant", "lr": 3e-3, "warmup": 1},
        "max_steps": 12,
        "batch_size": 8,
        "sequence_length": 32,
        "log_every": 1,
    }
    recipe.update(changes)
    return {k: v for k, v in recipe.items() if v is not None}


def _kd_on_rows(student_folder: Path, tiny_llama: Path, recipe: dict[str, Any]) -> float:
    """Mean forward KL, over the answer tokens of the run's first 16 rows, from the frozen
    start model reading the context to `student_folder`'s model reading none."""
    plan = plan_training(load_train_recipe(recipe))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    start = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_folder, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    objective = ContextDistill(
        ContextEntry(text=CONTEXT),
        ids,
        start=tokenizer.bos_token_id,
        pad=tokenizer.pad_token_id,
        vocab=len(tokenizer),
        teacher=start,
    )
    batch = Collator(tokenizer.pad_token_id)([plan.rows[i] for i in range(16)])
    with torch.no_grad():
        parts = objective.loss(student, batch)
    return float(parts.metrics["kd"] / parts.count)


def test_cli_distils_the_context_into_the_weights(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = _recipe(tiny_llama, data_dir)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path), str(tmp_path / "out"), "-q"]) == 0
    rows = metric_rows(tmp_path / "out")
    assert len(rows) == 12 and all(r["loss"] == r["kd"] for r in rows)  # alpha 1: KD only
    before = _kd_on_rows(tiny_llama, tiny_llama, recipe)
    after = _kd_on_rows(tmp_path / "out", tiny_llama, recipe)
    assert before > 0.02, "the context must change the tiny model's answers for a real test"
    assert after < 0.5 * before, (before, after)
    # the first step's logged KD is the start model's KL with vs without the context
    assert rows[0]["kd"] > 0.02


def test_resume_equals_an_uninterrupted_run(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A run stopped after its step-4 checkpoint and resumed ends on the same weights."""
    context = {"text": CONTEXT, "alpha": 0.7}  # KD and CE both in the loss
    recipe = _recipe(tiny_llama, data_dir, max_steps=6, checkpoints={"every": 2}, context=context)
    train(copy.deepcopy(recipe), tmp_path / "whole")

    def stop(row: dict[str, Any]) -> None:
        if row["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(recipe), tmp_path / "cut", on_row=stop)
    assert not (tmp_path / "cut").exists()
    said: list[str] = []
    train(copy.deepcopy(recipe), tmp_path / "cut", resume=True, say=said.append)
    assert any("resuming from" in m and m.endswith("checkpoint-4") for m in said), said
    a = load_file(next((tmp_path / "whole").glob("*.safetensors")))
    b = load_file(next((tmp_path / "cut").glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, cut = metric_rows(tmp_path / "whole"), metric_rows(tmp_path / "cut")
    assert [r["kd"] for r in whole] == [r["kd"] for r in cut]


def test_lora_run_uses_the_adapter_disabled_teacher(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(
        tiny_llama,
        data_dir,
        max_steps=2,
        adapter={"type": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), str(tmp_path / "o")]) == 0
    assert "teacher: the adapter-disabled start model" in capsys.readouterr().err
    assert (tmp_path / "o" / "adapter_config.json").is_file()


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        load_train_recipe(recipe)
    return "\n".join(str(p) for p in info.value.problems)


def test_bad_context_sections_are_all_reported(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    assert "context.pth: unknown key 'pth' (did you mean 'path'?" in _problems(
        _recipe(tiny_llama, data_dir, context={"pth": "x.txt"})
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    got = _problems(
        _recipe(
            tiny_llama,
            data_dir,
            context={"path": str(tmp_path / "missing.txt"), "loss": "reverse_kl", "top_k": 8},
            max_tokens=100,  # with max_steps: a problem outside context:, listed as well
        )
    )
    for expected in [
        f"context.path: {tmp_path / 'missing.txt'}: not found",
        "context.top_k: reverse_kl needs the teacher's full distribution",
        "max_steps: give exactly one of max_steps, max_tokens, epochs",
    ]:
        assert expected in got, expected
    assert f"context.path: {empty} is empty" in _problems(
        _recipe(tiny_llama, data_dir, context={"path": str(empty), "alpha": 0})
    )
    assert "context.alpha: alpha 0 ignores the teacher" in _problems(
        _recipe(tiny_llama, data_dir, context={"text": "x", "alpha": 0})
    )
    assert "context: give path or text (exactly one)" in _problems(
        _recipe(tiny_llama, data_dir, context={"text": "a", "path": str(empty)})
    )
    assert "context: context_distill needs a context" in _problems(
        _recipe(tiny_llama, data_dir, context=None)
    )
    assert "context: sft does not use a context" in _problems(
        _recipe(tiny_llama, data_dir, objective="sft")
    )
    scratch = {"config": str(tiny_llama), "tokenizer": str(tiny_llama)}
    assert "model: context_distill's teacher is the start model" in _problems(
        _recipe(tiny_llama, data_dir, model=scratch)
    )


def test_a_context_too_long_for_the_positions_is_reported(tiny_llama: Path, data_dir: Path) -> None:
    """The tiny llama has 128 positions and a character tokenizer: 100 characters of context
    leave 28 for the rows, so rows of 32 do not fit (rows of 28 do)."""
    got = _problems(_recipe(tiny_llama, data_dir, context={"text": "x" * 100}))
    assert "context: 100 context tokens + rows of 32 exceed the model's 128 positions" in got
    assert "set sequence_length: 28 or less" in got
    fits = _recipe(tiny_llama, data_dir, context={"text": "x" * 100}, sequence_length=28)
    load_train_recipe(fits)
