"""`objective: dpo` end to end on a tiny llama: the loss falls and the preference accuracy rises,
the reference in each of its forms, precomputed against live, resume, bad data and recipes."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.train.conftest import metric_rows, write_recipe

from alloy.cli.main import main
from alloy.train import load_train_recipe, train
from alloy.train.objectives import ObjectiveContext
from alloy.train.objectives.dpo import DPO, ReferenceCache, build_dpo, pair_logprobs
from alloy.train.packing import Collator
from alloy.train.pairs import fit_pair
from alloy.train.plan import plan_training


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 sums: the right answer is chosen, a wrong one rejected."""
    path = tmp_path_factory.mktemp("dpo-data") / "prefs.jsonl"
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            wrong = a + b + rng.choice([-2, -1, 1, 2])
            f.write(
                json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
            )
            f.write("\n")
    return path


def _recipe(tiny_llama: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "dpo",
        "model": str(tiny_llama),
        "data": [str(data)],
        "preference": {"beta": 0.5},
        "schedule": {"name": "constant", "lr": 1e-2},
        "max_steps": 4,
        "batch_size": 8,
        "sequence_length": 32,
        "log_every": 1,
    }
    recipe.update(changes)
    return recipe


def test_cli_lowers_the_loss_and_raises_the_preference_accuracy(
    tiny_llama: Path, prefs: Path, tmp_path: Path
) -> None:
    """Step 1 scores the policy against itself: loss exactly log 2, every reward 0. After 24
    steps the policy prefers the right sums more than the reference does."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, prefs, max_steps=24))
    assert main(["train", "-q", str(recipe), str(tmp_path / "out")]) == 0
    rows = metric_rows(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margin"] == rows[0]["rewards/accuracy"] == 0.0
    last = rows[-6:]
    assert np.mean([r["loss"] for r in last]) < math.log(2) - 0.1
    assert np.mean([r["rewards/accuracy"] for r in last]) > 0.7
    assert np.mean([r["rewards/margin"] for r in last]) > 0
    for row in rows:  # the margin is chosen minus rejected, averaged over the step's pairs
        margin = row["rewards/chosen"] - row["rewards/rejected"]
        assert row["rewards/margin"] == pytest.approx(margin, abs=1e-5)
        assert row["targets"] == 8  # the loss is a mean over pairs
    summary = json.loads((tmp_path / "out" / "training" / "summary.json").read_text())
    assert summary["objective"] == "dpo"


def _batch(plan: Any, rows: range) -> dict[str, torch.Tensor]:
    return Collator(int(plan.tokenizer.pad_token_id))([plan.rows[i] for i in rows])


def test_pairs_are_one_padded_batch_with_a_shared_prompt(tiny_llama: Path, prefs: Path) -> None:
    plan = plan_training(load_train_recipe(_recipe(tiny_llama, prefs)))
    batch = _batch(plan, range(4))
    assert batch["input_ids"].shape[0] == 8 and batch["pairs"].tolist() == [1] * 4
    for b in range(4):
        chosen, rejected = plan.rows[b]["labels"], plan.rows[b]["rejected_labels"]
        n = int((chosen == -100).sum())  # the prompt (with BOS) is context
        ids, other = plan.rows[b]["input_ids"], plan.rows[b]["rejected_input_ids"]
        assert torch.equal(ids[:n], other[:n]) and ids[0] == plan.tokenizer.bos_token_id
        assert chosen[-1] == plan.tokenizer.eos_token_id and rejected[-1] != -100
    assert batch["lengths"][0] == len(plan.rows[0]["input_ids"]) + len(
        plan.rows[0]["rejected_input_ids"]
    )


def test_truncation_cuts_the_prompt_from_the_left_then_the_answers(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The tiny tokenizer is one token per character. A 40-character prompt (41 tokens with
    BOS) and answers of 3 and 2 characters (4 and 3 with EOS) in rows of 32: the prompt keeps
    BOS and its last 27 characters, the answers stay whole."""
    assert fit_pair(10, 5, 32) == (10, 5)  # fits
    assert fit_pair(30, 5, 32) == (27, 5)  # prompt shortened
    assert fit_pair(30, 40, 32) == (16, 16)  # prompt down to half the row, answers cut
    prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "chosen": "yes", "rejected": "no"}) + "\n")
    plan = plan_training(load_train_recipe(_recipe(tiny_llama, data, batch_size=1)))
    assert any("1 pairs longer than 32 tokens are cut" in n for n in plan.notes)
    item, tokenizer = plan.rows[0], plan.tokenizer
    assert len(item["input_ids"]) == 32 and len(item["rejected_input_ids"]) == 31
    assert item["input_ids"][0] == tokenizer.bos_token_id
    for key, answer in (("input_ids", "yes"), ("rejected_input_ids", "no")):
        assert item[key][-1] == tokenizer.eos_token_id
        text = "".join(tokenizer.convert_ids_to_tokens(item[key][1:-1].tolist()))
        assert text == prompt[-27:] + answer


def _objective(plan: Any, **context: Any) -> Any:
    return build_dpo(
        ObjectiveContext(
            plan.recipe, plan.tokenizer, torch.device("cpu"), rows=plan.rows, **context
        )
    )


def test_with_an_adapter_the_reference_is_the_adapter_disabled_base(
    tiny_llama: Path, prefs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reference model is built; the reference log-probs are the start model's even when the
    adapter has moved the policy away from it."""
    from transformers import AutoModelForCausalLM

    from alloy.train.adapter import wrap_model

    recipe = _recipe(tiny_llama, prefs, adapter={"rank": 4, "target_modules": ["q_proj", "v_proj"]})
    plan = plan_training(load_train_recipe(recipe))
    objective = _objective(plan)
    assert isinstance(objective, DPO) and objective.reference is None and objective.cache is None
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    policy = wrap_model(copy.deepcopy(base), plan.recipe.spec.adapter, str(tiny_llama))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(plan, range(4))
    with torch.no_grad():
        expected = pair_logprobs(base, batch, average=False)
        moved = pair_logprobs(policy, batch, average=False)
    got = objective.reference_logprobs(policy, batch)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(moved, expected, atol=1e-3)
    assert policy.training  # the reference pass put the policy back in training mode
    # and a whole adapter run never loads a reference model
    monkeypatch.setattr(
        "alloy.train.objectives.dpo.load_reference",
        lambda *a: pytest.fail("loaded a reference model"),
    )
    result = train(recipe | {"max_steps": 2}, tmp_path / "out")
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_precomputed_reference_gives_the_live_losses(
    tiny_llama: Path, prefs: Path, tmp_path: Path
) -> None:
    live = train(_recipe(tiny_llama, prefs), tmp_path / "live")
    pre = _recipe(tiny_llama, prefs, preference={"beta": 0.5, "precompute_reference": True})
    cached = train(pre, tmp_path / "pre")
    for a, b in zip(live.metrics, cached.metrics, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_reference_cache_is_reused_for_the_same_rows_and_recomputed_for_others(
    tiny_llama: Path, prefs: Path, tmp_path: Path
) -> None:
    from alloy.train.objectives.dpo import load_reference

    plan = plan_training(load_train_recipe(_recipe(tiny_llama, prefs)))
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return load_reference(tiny_llama, torch.device("cpu"))

    def build(rows: Any) -> ReferenceCache:
        collate = Collator(int(plan.tokenizer.pad_token_id))
        return ReferenceCache.build(
            load,
            rows,
            collate,
            identity="x",
            average=False,
            folder=tmp_path,
            batch_size=4,
            device=torch.device("cpu"),
        )

    first = build(plan.rows)
    again = build(plan.rows)
    assert len(loads) == 1 and again.path == first.path
    other = plan_training(load_train_recipe(_recipe(tiny_llama, prefs, seed=1)))
    assert build(other.rows).path != first.path and len(loads) == 2
    assert list(tmp_path.glob("*.npy")) == [build(other.rows).path]  # the stale table is gone


class _StopError(Exception):
    pass


def test_a_stopped_run_resumes_to_the_same_weights_reusing_the_reference_table(
    tiny_llama: Path, prefs: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    recipe = _recipe(
        tiny_llama,
        prefs,
        preference={"beta": 0.5, "precompute_reference": True},
        checkpoints={"every": 2},
        micro_batch_size=4,
    )
    train(recipe, tmp_path / "whole")

    def stop(row: dict[str, Any]) -> None:
        if row["step"] == 3:
            raise _StopError

    with pytest.raises(_StopError):
        train(recipe, tmp_path / "cut", on_row=stop)
    said: list[str] = []
    train(recipe, tmp_path / "cut", resume=True, say=said.append)
    assert any("reference log-probabilities from" in line for line in said)
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_rows_exit_2_naming_file_and_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    lines = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "3"},
        {"prompt": "1+3=", "chosen": " ", "rejected": "5"},
        {"prompt": "1+4=", "chosen": 5, "rejected": "6"},
        {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": []},
    ]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, data))
    assert main(["train", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: missing rejected" in err
    assert f"{data}:3: empty chosen answer" in err
    assert f"{data}:4: prompt, chosen and rejected must all be strings" in err
    assert f"{data}:5:" in err and f"{data}:1:" not in err
    assert not (tmp_path / "out").exists()


def test_recipe_typos_exit_2_with_did_you_mean(
    tiny_llama: Path, prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(
        tiny_llama,
        prefs,
        preference={"beta": 0.1, "loss": "sigmod", "reference": str(tmp_path / "nowhere")},
    )
    assert main(["train", str(write_recipe(tmp_path / "a.yaml", recipe)), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "preference.loss: unknown preference loss 'sigmod' (did you mean 'sigmoid'?" in err
    assert "preference.reference:" in err and "no config.json" in err  # both at once
    recipe = _recipe(tiny_llama, prefs, preference={"label_smothing": 0.1, "beta": 0})
    assert main(["train", str(write_recipe(tmp_path / "b.yaml", recipe)), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'label_smoothing'?" in err and "preference.beta" in err
    recipe = _recipe(tiny_llama, prefs, preference={"label_smoothing": 0.5})
    assert main(["validate", str(write_recipe(tmp_path / "c.yaml", recipe))]) == 2
    assert "preference.label_smoothing: Input should be less than 0.5" in capsys.readouterr().err
    recipe = _recipe(tiny_llama, prefs, preference={"loss": "ipo", "label_smoothing": 0.1})
    recipe["data"] = [{"path": str(prefs), "bootstrap": 1}]
    assert main(["validate", str(write_recipe(tmp_path / "d.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "preference.label_smoothing: applies to loss: sigmoid only" in err
    assert "data.0.bootstrap: not supported by dpo" in err


def test_objectives_refuse_each_others_data(
    tiny_llama: Path,
    prefs: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _recipe(tiny_llama, data_dir / "sft.jsonl")
    assert main(["train", str(write_recipe(tmp_path / "a.yaml", recipe)), str(tmp_path / "o")]) == 2
    assert "records that are not preference pairs" in capsys.readouterr().err
    recipe = _recipe(tiny_llama, prefs, objective="sft", preference=None)
    assert main(["train", str(write_recipe(tmp_path / "b.yaml", recipe)), str(tmp_path / "o")]) == 2
    assert "objective: dpo" in capsys.readouterr().err


def test_chat_pairs_score_only_the_answer_turn(tiny_llama: Path, tmp_path: Path) -> None:
    """Message lists: an implicit prompt (the shared start), its assistant turn is context."""
    data = tmp_path / "chat.jsonl"
    shared = [
        {"role": "user", "content": "double 2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "again"},
    ]
    record = {
        "chosen": [*shared, {"role": "assistant", "content": "8"}],
        "rejected": [*shared, {"role": "assistant", "content": "6"}],
    }
    data.write_text(json.dumps(record) + "\n")
    plan = plan_training(load_train_recipe(_recipe(tiny_llama, data, batch_size=1)))
    item = plan.rows[0]
    tokenizer = plan.tokenizer
    chosen = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    rejected = tokenizer.decode(item["rejected_input_ids"][item["rejected_labels"] != -100])
    assert chosen.startswith("8") and rejected.startswith("6")
    assert "4" not in chosen


def test_the_shipped_example_plans_on_a_tiny_model(tiny_llama: Path, prefs: Path) -> None:
    """examples/train/dpo.yaml with its model and data pointed at tiny ones: a full dry run."""
    from alloy.train import dry_run

    example = Path(__file__).parents[2] / "examples" / "train" / "dpo.yaml"
    overrides = {
        "model": str(tiny_llama),
        "data.0.path": str(prefs),
        "schedule.warmup": 1,
        "sequence_length": 32,
    }
    plan = dry_run(example, overrides=overrides)
    assert plan.row_kind == "pairs" and plan.steps == 3  # 48 pairs, one epoch of 16
    assert "reference weights" not in plan.memory_estimate()  # precomputed: not in memory


def test_an_explicit_reference_is_that_model(tiny_llama: Path, prefs: Path, tmp_path: Path) -> None:
    """reference: PATH is scored, not the start model: the first loss is no longer log 2, and
    equals the golden formula on the two models' own log-probabilities."""
    from transformers import AutoModelForCausalLM

    from alloy.train.losses import preference_loss

    other = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    other.save_pretrained(tmp_path / "ref")
    recipe = _recipe(
        tiny_llama, prefs, preference={"beta": 0.5, "reference": str(tmp_path / "ref")}
    )
    plan = plan_training(load_train_recipe(recipe))
    batch = _batch(plan, range(8))
    start = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        policy, reference = (pair_logprobs(m, batch, average=False) for m in (start, other.eval()))
    losses, _, _ = preference_loss(policy[:8], policy[8:], reference[:8], reference[8:], beta=0.5)
    result = train(recipe, tmp_path / "out")
    assert result.metrics[0]["loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert abs(result.metrics[0]["loss"] - math.log(2)) > 1e-3


def test_a_reference_with_another_tokenizer_is_refused_before_loading(
    tiny_llama: Path, prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_llama, tmp_path / "ref")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "ref")
    recipe = _recipe(tiny_llama, prefs, preference={"reference": str(tmp_path / "ref")})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the reference does not share the policy's tokenizer" in err
    assert "preference.reference" in err


def test_identical_answers_are_noted(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "same.jsonl"
    data.write_text(
        json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"})
        + "\n"
        + json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "4"})
        + "\n"
    )
    plan = plan_training(load_train_recipe(_recipe(tiny_llama, data, batch_size=2)))
    assert any("1 pairs whose chosen and rejected answers are the same" in n for n in plan.notes)


@pytest.mark.parametrize("precompute", [False, True], ids=["adapter-disabled", "precomputed"])
def test_two_processes_match_one(
    tiny_llama: Path, prefs: Path, tmp_path: Path, precompute: bool
) -> None:
    """`accelerate launch` over two CPU processes (gloo, DDP) gives one process's losses: with
    a LoRA whose reference is the adapter-disabled base reached through DDP's wrapper, and with
    a reference table the main process computes and the other reads."""
    import os
    import subprocess
    import sys

    pytest.importorskip("accelerate")
    preference = {"beta": 0.5, "precompute_reference": precompute}
    recipe = _recipe(tiny_llama, prefs, preference=preference, device="cpu")
    if not precompute:
        recipe["adapter"] = {"rank": 4, "target_modules": ["q_proj", "v_proj"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    alloy = ["-m", "alloy", "train", "-q", str(path)]
    subprocess.run([sys.executable, *alloy, str(tmp_path / "one")], check=True, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", *alloy, str(tmp_path / "two")]
    subprocess.run(launch, check=True, env=env, capture_output=True)
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    for key in ("loss", "rewards/margin", "rewards/accuracy"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-5), key
    summary = json.loads((tmp_path / "two" / "training" / "summary.json").read_text())
    assert summary["processes"] == 2
