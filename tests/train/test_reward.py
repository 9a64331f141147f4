"""`objective: reward` on a tiny llama: the Bradley-Terry loss's goldens, a CLI run whose loss
falls and whose held-out preference accuracy (alloy eval) rises, the output as a transformers
reward model, a WARM soup of two seeds, resume, margins, bad data and recipes."""

from __future__ import annotations

import csv
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
from alloy.train.losses import reward_loss
from alloy.train.objectives.reward import Reward
from alloy.train.packing import Collator
from alloy.train.plan import plan_training

WORDS = ["cat", "sat", "on", "mat", "dog", "ran", "red", "big", "sun", "hat"]


class _StopError(Exception):
    pass


def _pairs(path: Path, count: int, seed: int, margin: bool = False) -> Path:
    """Chosen answers are lower case, rejected the same words in upper case: the last token
    alone tells them apart, so a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            words = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            record: dict[str, Any] = {"prompt": "say:", "chosen": words, "rejected": words.upper()}
            if margin:
                record["margin"] = float(i % 3)
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-data")
    return {
        "train": _pairs(root / "train.jsonl", 64, 0),
        "held": _pairs(root / "held.jsonl", 32, 1),
    }


def _recipe(tiny_llama: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "reward",
        "model": str(tiny_llama),
        "data": [str(data)],
        "schedule": {"name": "constant", "lr": 1e-2},
        "max_steps": 4,
        "batch_size": 8,
        "sequence_length": 32,
        "log_every": 1,
    }
    recipe.update(changes)
    return recipe


def _accuracy(model: Path, data: Path, tmp_path: Path) -> float:
    report = tmp_path / f"{model.name}-eval.json"
    assert main(["eval", str(model), "--data", str(data), "--json", str(report)]) == 0
    (result,) = json.loads(report.read_text())["results"][str(model)].values()
    assert result["kind"] == "preference"
    return float(result["accuracy"])


# ---- the loss ---------------------------------------------------------------------------------


def test_loss_goldens() -> None:
    """-log σ(d) for d = r_c - r_r - m:
    - r_c = r_r, m = 0: d = 0, σ = 1/2, loss log 2 = 0.693147
    - r_c = 2, r_r = 0: log(1 + e^-2) = 0.126928
    - r_c = 0, r_r = 1: log(1 + e^1) = 1.313262
    - r_c = 2, r_r = 0, m = 2: d = 0 again, log 2
    - r_c = 1, r_r = 0, m = 3: d = -2, log(1 + e^2) = 2.126928
    Centring η = 0.5 on r_c = 1, r_r = 1: log 2 + 0.5 (2)² = 2.693147."""
    chosen, rejected = torch.tensor([0.3, 2.0, 0.0]), torch.tensor([0.3, 0.0, 1.0])
    expected = [math.log(2), 0.126928, 1.313262]
    assert reward_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    exact = torch.tensor(math.log(2), dtype=torch.float32)  # log 2 to fp32, exactly
    assert reward_loss(torch.tensor([0.0]), torch.tensor([0.0]))[0] == exact
    margins = reward_loss(
        torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([2.0, 3.0])
    )
    assert margins.tolist() == pytest.approx([math.log(2), 2.126928], abs=1e-6)
    centred = reward_loss(torch.tensor([1.0]), torch.tensor([1.0]), center=0.5)
    assert centred.item() == pytest.approx(math.log(2) + 2.0, abs=1e-6)


def test_loss_gradient_pushes_the_rewards_apart() -> None:
    """d/dr_c = -σ(-d) = -(1 - σ(d)); at d = 0 that is -1/2 (and +1/2 for r_r)."""
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    reward_loss(chosen, rejected).sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


# ---- the objective ----------------------------------------------------------------------------


def test_pairs_are_scored_in_one_batch_with_their_margins(tiny_llama: Path, tmp_path: Path) -> None:
    """One forward of the (2B, T) batch gives the rewards the saved model gives each sequence
    alone, and the loss is the golden formula on them with each row's margin."""
    from alloy.train.run import load_student

    data = _pairs(tmp_path / "m.jsonl", 6, 2, margin=True)
    plan = plan_training(load_train_recipe(_recipe(tiny_llama, data, batch_size=6)))
    model = load_student(plan).eval()
    assert model.config.pad_token_id == plan.tokenizer.pad_token_id is not None
    items = [plan.rows[i] for i in range(6)]
    batch = Collator(int(plan.tokenizer.pad_token_id))(items)
    assert batch["margins"].tolist() == [float(item["margin"]) for item in items]
    assert sorted(batch["margins"].tolist()) == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        parts = Reward(center=0.0).loss(model, batch)
        alone = [
            model(input_ids=item[key][None]).logits[0, 0]
            for key in ("input_ids", "rejected_input_ids")
            for item in items
        ]
    rewards = torch.stack(alone)
    expected = reward_loss(rewards[:6], rewards[6:], margin=batch["margins"]).sum()
    assert parts.total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert parts.count.item() == 6


def test_margins_survive_the_token_cache(tiny_llama: Path, tmp_path: Path) -> None:
    """The second plan reads the pairs from the token cache, margins included; a cache entry of
    pairs written without margins (before they were kept) is tokenised again, not read as 0."""
    from alloy.train.data import cache_root

    data = _pairs(tmp_path / "m.jsonl", 6, 4, margin=True)
    recipe = _recipe(tiny_llama, data, batch_size=6)
    first = plan_training(load_train_recipe(recipe))
    second = plan_training(load_train_recipe(recipe))
    assert not first.sources[0].cached and second.sources[0].cached
    margins = [second.rows[i]["margin"] for i in range(6)]
    assert margins == [first.rows[i]["margin"] for i in range(6)] and max(margins) == 2.0
    for entry in (cache_root() / "tokens").glob("*/margins.npy"):
        entry.unlink()  # as an entry written before margins were kept
    third = plan_training(load_train_recipe(recipe))
    assert not third.sources[0].cached
    assert [third.rows[i]["margin"] for i in range(6)] == margins


def test_cli_run_lowers_the_loss_and_the_output_is_a_reward_model(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    """24 steps: the loss falls well below log 2, held-out accuracy goes from chance (the
    untrained head, the run's step-0 eval) to above 0.8 by alloy eval, and transformers loads
    the folder as a LlamaForSequenceClassification with one label that scores what alloy's
    scorer scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alloy.eval.choice import reward_scores
    from alloy.eval.scorer import load_scorer

    out = tmp_path / "rm"
    recipe = _recipe(tiny_llama, prefs["train"], max_steps=24, eval={"data": [str(prefs["held"])]})
    assert main(["train", "-q", str(write_recipe(tmp_path / "r.yaml", recipe)), str(out)]) == 0
    with (out / "training" / "eval.csv").open() as f:
        evals = [float(row["accuracy"]) for row in csv.DictReader(f)]
    rows = metric_rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.1)  # a fresh head: rewards ~ 0
    last = rows[-6:]
    assert np.mean([r["loss"] for r in last]) < math.log(2) - 0.3
    assert np.mean([r["rewards/accuracy"] for r in last]) > 0.8
    for row in rows:
        margin = row["rewards/chosen"] - row["rewards/rejected"]
        assert row["rewards/margin"] == pytest.approx(margin, abs=1e-5)
        assert row["targets"] == 8
    held = _accuracy(out, prefs["held"], tmp_path)
    assert evals[0] < 0.7 and held > 0.8  # the training evals score by reward too:
    assert evals[-1] == held  # the last is alloy eval's
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] is not None
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.num_labels == 1 and tokenizer.pad_token_id == config["pad_token_id"]
    text = "say: cat sat"
    # Scored as trained: [BOS] text [EOS] (pad is not EOS here, so the reward sits on EOS).
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]])
    with torch.no_grad():
        direct = model(input_ids=ids).logits[0, 0].item()
    assert reward_scores(load_scorer(out), [text])[0] == pytest.approx(direct, abs=1e-5)
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["objective"] == "reward"


def test_the_body_is_the_lm_and_the_new_head_is_seeded(
    tiny_llama: Path, prefs: dict[str, Path]
) -> None:
    from alloy.io.checkpoint import Checkpoint
    from alloy.train.run import load_student

    plan = plan_training(load_train_recipe(_recipe(tiny_llama, prefs["train"])))
    a, b = load_student(plan), load_student(plan)
    assert torch.equal(a.score.weight, b.score.weight)
    other = plan_training(load_train_recipe(_recipe(tiny_llama, prefs["train"], seed=1)))
    assert not torch.equal(a.score.weight, load_student(other).score.weight)
    body = {k: v for k, v in a.state_dict().items() if not k.startswith("score")}
    with Checkpoint.open(tiny_llama) as lm:
        assert all(torch.equal(v, lm.read(k)) for k, v in body.items())  # the LM body as is


def test_warm_soup_of_two_seeds_loads_and_scores(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    """Two reward models from different seeds (heads and data order differ), averaged uniformly
    by alloy soup: a reward model whose weights are the mean, above chance on held-out pairs;
    alloy average takes the two as well."""
    from alloy.io.checkpoint import Checkpoint

    outs = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        recipe = _recipe(tiny_llama, prefs["train"], max_steps=16, seed=seed)
        assert (
            main(["train", "-q", str(write_recipe(tmp_path / f"{seed}.yaml", recipe)), str(out)])
            == 0
        )
        outs.append(out)
    soup = tmp_path / "warm"
    command = ["soup", "-c", *map(str, outs), "--eval", str(prefs["held"]), "--method", "uniform"]
    assert main([*command, str(soup)]) == 0
    assert json.loads((soup / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    with (
        Checkpoint.open(soup) as mean,
        Checkpoint.open(outs[0]) as a,
        Checkpoint.open(outs[1]) as b,
    ):
        assert "score.weight" in mean.tensors
        for name in ("score.weight", "model.layers.0.mlp.up_proj.weight"):
            expected = (a.read(name) + b.read(name)) / 2
            assert torch.allclose(mean.read(name), expected, atol=1e-6)
    assert _accuracy(soup, prefs["held"], tmp_path) > 0.6
    averaged = tmp_path / "averaged"
    assert main(["average", "-q", *map(str, outs), str(averaged)]) == 0
    assert _accuracy(averaged, prefs["held"], tmp_path) > 0.6


def test_a_stopped_run_resumes_to_the_same_weights(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    recipe = _recipe(
        tiny_llama,
        prefs["train"],
        checkpoints={"every": 2},
        micro_batch_size=4,
        averaging={"ema": {"decay": 0.8}},
    )
    train(recipe, tmp_path / "whole")

    def stop(row: dict[str, Any]) -> None:
        if row["step"] == 3:
            raise _StopError

    with pytest.raises(_StopError):
        train(recipe, tmp_path / "cut", on_row=stop)
    train(recipe, tmp_path / "cut", resume=True)
    for folder in ("", "averaged-ema"):
        a = load_file(tmp_path / "whole" / folder / "model.safetensors")
        b = load_file(tmp_path / "cut" / folder / "model.safetensors")
        assert "score.weight" in a and all(torch.equal(a[k], b[k]) for k in a), folder


def test_a_reward_model_folder_trains_on(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    """A trained reward model is a valid start: its head is kept, not re-initialised."""
    from alloy.train.run import load_student

    first = tmp_path / "first"
    train(_recipe(tiny_llama, prefs["train"], max_steps=2), first)
    plan = plan_training(load_train_recipe(_recipe(first, prefs["train"])))
    from safetensors.torch import load_file

    saved = load_file(first / "model.safetensors")["score.weight"]
    assert torch.equal(load_student(plan).score.weight, saved)


def test_lora_trains_the_body_adapter_and_the_whole_head(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    """adapter: LoRA on the body, the score head trained in full (PEFT's SEQ_CLS task keeps it
    in modules_to_save). --merge writes a reward model transformers loads; the adapter folder,
    on the base loaded as a one-score classifier, gives the same rewards."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    recipe = _recipe(
        tiny_llama,
        prefs["train"],
        max_steps=16,
        adapter={"type": "lora", "rank": 4, "alpha": 8},
        schedule={"name": "constant", "lr": 3e-2},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", "-q", str(path), str(tmp_path / "adapter")]) == 0
    assert main(["train", "-q", str(path), str(tmp_path / "merged"), "--merge"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("score" in name for name in saved) and any("lora_A" in name for name in saved)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.num_labels == 1 and merged.config.pad_token_id is not None
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama, num_labels=1, pad_token_id=merged.config.pad_token_id
    )
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    rows = metric_rows(tmp_path / "merged")
    assert np.mean([r["loss"] for r in rows[-4:]]) < rows[0]["loss"]
    assert _accuracy(tmp_path / "merged", prefs["held"], tmp_path) > 0.6


def test_two_processes_match_one(tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path) -> None:
    """`accelerate launch` over two CPU processes (gloo, DDP): one process's losses and metrics
    (the reward model behind DDP's wrapper, margins in the batch)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("accelerate")
    data = _pairs(tmp_path / "m.jsonl", 32, 3, margin=True)
    path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, data, device="cpu"))
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


# ---- refusals ---------------------------------------------------------------------------------


def test_bad_rows_exit_2_naming_file_and_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    lines = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1},
        {"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"},
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": "b", "rejected": "c", "margin": True},
    ]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, data))
    assert main(["train", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: margin must be a finite number, not 'big'" in err
    assert f"{data}:3: missing rejected" in err
    assert f"{data}:4: margin must be a finite number" in err
    assert f"{data}:1:" not in err and not (tmp_path / "out").exists()


def test_recipe_problems_exit_2_before_loading(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(prefs["train"])
    recipe = _recipe(tiny_llama, prefs["train"], objective="rewrad")
    assert main(["validate", str(write_recipe(tmp_path / "a.yaml", recipe))]) == 2
    assert "unknown objective 'rewrad' (did you mean 'reward'?" in capsys.readouterr().err
    recipe = _recipe(tiny_llama, prefs["train"], preference={"center_reward": 0.1})
    assert main(["validate", str(write_recipe(tmp_path / "b.yaml", recipe))]) == 2
    assert "did you mean 'center_rewards'?" in capsys.readouterr().err
    recipe = _recipe(tiny_llama, prefs["train"], preference={"center_rewards": -1})
    assert main(["validate", str(write_recipe(tmp_path / "b.yaml", recipe))]) == 2
    assert "preference.center_rewards: Input should be greater than or equal to 0" in (
        capsys.readouterr().err
    )
    recipe = _recipe(
        tiny_llama,
        prefs["train"],
        preference={"beta": 0.2, "reference": data},
    )
    recipe["data"] = [{"path": data, "bootstrap": 1}]
    assert main(["train", str(write_recipe(tmp_path / "c.yaml", recipe)), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "preference.beta: applies to objective: dpo only" in err
    assert "preference.reference: applies to objective: dpo only" in err
    assert "data.0.bootstrap: not supported by reward" in err
    recipe = _recipe(tiny_llama, prefs["train"], objective="dpo", preference={"center_rewards": 1})
    assert main(["validate", str(write_recipe(tmp_path / "d.yaml", recipe))]) == 2
    assert "preference.center_rewards: applies to objective: reward only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_classifier_of_several_labels_is_refused(
    tiny_llama: Path, prefs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3).save_pretrained(
        folder
    )
    recipe = _recipe(folder, prefs["train"])
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "a classifier of 3 labels, not a reward model" in capsys.readouterr().err


def test_other_data_is_refused(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tiny_llama, data_dir / "sft.jsonl")
    assert main(["train", str(write_recipe(tmp_path / "a.yaml", recipe)), str(tmp_path / "o")]) == 2
    assert "records that are not preference pairs" in capsys.readouterr().err


def test_the_shipped_example_plans_on_a_tiny_model(
    tiny_llama: Path, prefs: dict[str, Path]
) -> None:
    from alloy.train import dry_run

    example = Path(__file__).parents[2] / "examples" / "train" / "reward.yaml"
    overrides = {
        "model": str(tiny_llama),
        "data.0.path": str(prefs["train"]),
        "eval.data.0.path": str(prefs["held"]),
        "schedule.warmup": 1,
        "sequence_length": 32,
    }
    plan = dry_run(example, overrides=overrides)
    assert plan.row_kind == "pairs" and plan.objective.name == "reward"
    memory = plan.memory_estimate()
    assert "reference weights" not in memory  # no reference model
    assert memory["logits"] == 3 * 4.0 * (4 * 32 * 2)  # one score per position of 2 x micro rows


def test_help_names_the_objective(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    assert "reward (a Bradley-Terry reward model)" in " ".join(capsys.readouterr().out.split())
