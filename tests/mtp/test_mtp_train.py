"""`alloy train` with objective: mtp end to end on tiny checkpoints, and `alloy generate
--speculative` on what it writes: the heads sit beside a plain HF folder whose logits are the
start model's; a stopped run resumes to the same heads; bad recipes and flags exit 2 with every
problem named before any weights load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.train.conftest import write_recipe
from transformers import AutoModelForCausalLM

from alloy.cli.main import main
from alloy.errors import CheckpointError, RecipeError
from alloy.mtp.heads import HEADS_FILE, INFO_FILE, MTPHeads, load_heads
from alloy.mtp.speculative import greedy, speculative_greedy
from alloy.train import load_train_recipe, train


def _recipe(model: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "mtp",
        "model": str(model),
        "data": [str(data)],
        "mtp": {"heads": 2, "weights": [1.0, 0.5]},
        "schedule": {"name": "constant", "lr": 3e-3},
        "max_steps": 6,
        "batch_size": 4,
        "sequence_length": 32,
        "log_every": 2,
    }
    recipe.update(changes)
    return recipe


def test_heads_train_beside_an_unchanged_plain_folder(
    tiny_llama: Path, docs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, docs))
    assert main(["train", "-q", str(recipe), str(out)]) == 0
    assert (out / HEADS_FILE).is_file() and (out / INFO_FILE).is_file()
    weights = load_file(out / "model.safetensors")
    assert not any(k.startswith("mtp_heads") for k in weights)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["heads"] == 2 and info["trunk"] == "frozen" and info["weights"] == [1.0, 0.5]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, start(ids).logits)
    trained = load_heads(model, out).state_dict()
    fresh = MTPHeads.from_model(start, 2).state_dict()  # copies of the last layer and norm
    assert trained.keys() == fresh.keys()
    assert all(not torch.equal(v, fresh[k]) for k, v in trained.items() if "layers" in k)
    wrong = {**info, "hidden_size": 64}
    (out / INFO_FILE).write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="hidden_size 64"):
        load_heads(model, out)
    rows = (out / "training" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"ce_2", "ce_3", "top1_2", "top1_3"} <= set(header)
    assert "ce_1" not in header  # the frozen next-token head is never computed


def test_a_stopped_run_resumes_to_the_same_heads(
    tiny_llama: Path, docs: Path, tmp_path: Path
) -> None:
    recipe = _recipe(tiny_llama, docs, checkpoints={"every": 2})
    train(recipe, tmp_path / "whole")

    class StopError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        if row["step"] == 3:
            raise StopError

    with pytest.raises(StopError):
        train(recipe, tmp_path / "cut", on_row=stop)
    train(recipe, tmp_path / "cut", resume=True)
    for name in ("model.safetensors", HEADS_FILE):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_trained_heads_are_accepted_and_decoding_stays_exact(
    tiny_llama: Path, cyclic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train_trunk on cyclic text: the model learns the cycle and the heads learn to look
    ahead, so most drafts are accepted, and the output is still plain greedy's."""
    out = tmp_path / "cycle"
    recipe = _recipe(
        tiny_llama,
        cyclic,
        mtp={"heads": 3, "train_trunk": True},
        schedule={"name": "constant", "lr": 1e-2},
        max_steps=60,
        batch_size=8,
    )
    train(recipe, out)
    assert json.loads((out / INFO_FILE).read_text())["trunk"] == "trained"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    heads = load_heads(model, out)
    prompt = [1, *range(4 + 65, 4 + 70)]  # <s> + "abcde" in the char vocabulary
    plain = greedy(model, prompt, max_new_tokens=30, eos=set())
    decoded = speculative_greedy(model, heads, prompt, max_new_tokens=30, eos=set())
    assert decoded.tokens == plain.tokens
    assert sum(decoded.accepted) / len(decoded.accepted) > 1.5
    assert decoded.forwards < plain.forwards / 2

    assert main(["generate", str(out), "-p", "abcde", "--max-new-tokens", "20", "--greedy"]) == 0
    plain_text = capsys.readouterr().out
    log = tmp_path / "spec.jsonl"
    argv = ["generate", str(out), "-p", "abcde", "--max-new-tokens", "20", "--speculative"]
    assert main([*argv, "--out", str(log)]) == 0
    spec_text = capsys.readouterr().out
    record = json.loads(log.read_text())
    assert record["text"] in plain_text and record["text"] in spec_text
    assert record["tokens"] == 20 and record["accepted_per_step"] > 1.5


def test_bad_mtp_recipes_name_every_problem(tiny_llama: Path, docs: Path) -> None:
    bad = _recipe(
        tiny_llama,
        docs,
        mtp={"heads": 3, "weights": [1.0, 1.0], "next_token_weight": 1.0},
        adapter={"type": "lora"},
    )
    with pytest.raises(RecipeError) as caught:
        load_train_recipe(bad)
    where = {p.where for p in caught.value.problems}
    assert {"mtp.weights", "mtp.next_token_weight", "adapter"} <= where
    with pytest.raises(RecipeError) as caught:
        load_train_recipe({**_recipe(tiny_llama, docs), "objective": "causal_lm"})
    assert [p.where for p in caught.value.problems] == ["mtp"]
    with pytest.raises(RecipeError) as caught:
        load_train_recipe(_recipe(tiny_llama, docs, mtp={"head": 2}))
    assert any("heads" in (p.hint or "") for p in caught.value.problems)


def test_speculative_refuses_what_it_cannot_do(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(tiny_llama), "-p", "x", "--speculative"]
    assert main(argv) == 2
    assert "no multi-token heads" in capsys.readouterr().err
    assert main([*argv, "--sample", "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "--sample" in err and "--temperature" in err and "no multi-token heads" in err
    recipe = tmp_path / "ens.yaml"
    write_recipe(recipe, {"rule": "linear", "members": [{"model": str(tiny_llama)}] * 2})
    assert main(["generate", str(recipe), "-p", "x", "--speculative"]) == 2
    assert "not an ensemble recipe" in capsys.readouterr().err


def test_the_shipped_example_is_valid() -> None:
    example = Path(__file__).parents[2] / "examples" / "train" / "mtp.yaml"
    spec = load_train_recipe(example, check_paths=False).spec
    assert spec.objective == "mtp" and spec.mtp is not None and spec.mtp.heads == 3
