"""`alloy soup` end to end: causal LMs on text, reward models on preferences (WARM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import alloy.cli.soup  # registers the command  # noqa: F401
from alloy.cli.main import main
from alloy.cli.soup import spread_candidates
from alloy.eval import load_scorer
from alloy.eval.choice import reward_scores
from alloy.io import Checkpoint

VALUE_OPTIONS = {"--eval", "-e", "--method", "--window"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--candidates", "a", "b", "c", "--eval", "d", "out"],
            ["--candidates", "a", "--candidates", "b", "--candidates", "c", "--eval", "d", "out"],
        ),
        (
            ["out", "--eval", "d", "-c", "a", "b", "--force"],
            ["out", "--eval", "d", "-c", "a", "-c", "b", "--force"],
        ),
        # The list ends at the next option; OUT is never guessed from its end.
        (
            ["--eval", "d", "--candidates", "a", "b"],
            ["--eval", "d", "--candidates", "a", "--candidates", "b"],
        ),
        (
            ["--candidates=a", "--candidates", "--eval", "d"],
            ["--candidates=a", "--candidates", "--eval", "d"],
        ),
        (["--eval", "--candidates", "out"], ["--eval", "--candidates", "out"]),
    ],
)
def test_spread_candidates(args: list[str], expected: list[str]) -> None:
    assert spread_candidates(args, value_options=VALUE_OPTIONS) == expected


def test_cli_greedy_soup_of_causal_lms(
    llama_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "soup"
    paths = [str(p) for p in llama_ingredients.values()]
    args = ["soup", "--candidates", *paths, "--eval", str(soup_data["text"]), str(out)]
    assert main([*args, "--window", "64", "--method", "greedy", "--no-hash"]) == 0
    printed = capsys.readouterr()
    assert "candidate score" in printed.out and "greedy soup of" in printed.out
    assert "scored near_a" in printed.err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "soup.json", "soup.md"} <= names
    assert "soup.png" in names  # matplotlib is installed in the dev environment
    assert not any(name.startswith(".") or name == "model" for name in names)
    report = json.loads((out / "soup.json").read_text())
    assert report["method"] == "greedy" and report["objective"]["metric"] == "perplexity"
    steps, candidates = report["steps"], report["candidates"]
    assert len(steps) == 3 and steps[0]["kept"]
    best = min(candidates, key=lambda c: c["score"])
    assert steps[0]["soup"] == [best["path"]] and report["chosen"][0] == best["path"]
    assert report["score"] <= best["score"]  # greedy is never worse than its best ingredient
    kept_soups = [s["soup"] for s in steps if s["kept"]]
    assert report["chosen"] == kept_soups[-1]
    card = (out / "README.md").read_text()
    assert "## Soup" in card and "merge_method: linear" in card
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    # Existing output: refused without --force (exit 2), replaced with it.
    assert main([*args, "--window", "64"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--window", "64", "--force", "--method", "uniform", "-q"]) == 0
    assert json.loads((out / "soup.json").read_text())["method"] == "uniform"


def test_cli_warm_soup_of_reward_models(
    reward_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """WARM: the uniform average of reward models, judged by preference accuracy. The text set
    is ignored (reward models score preferences only) and the written soup is a reward model
    whose weights are the mean and whose accuracy is the one reported."""
    out = tmp_path / "warm"
    paths = list(reward_ingredients.values())
    code = main(
        [
            "soup",
            "-c",
            *map(str, paths),
            "--eval",
            str(soup_data["preference"]),
            "--eval",
            str(soup_data["text"]),
            "--method",
            "uniform",
            str(out),
        ]
    )
    assert code == 0
    assert "not scored" in capsys.readouterr().err
    report = json.loads((out / "soup.json").read_text())
    assert report["objective"] == {
        "metric": "accuracy",
        "higher_is_better": True,
        "sets": [f"{soup_data['preference'].parent.name}/prefs"],
    }
    assert sorted(report["chosen"]) == sorted(map(str, paths))
    scorer = load_scorer(out)
    assert scorer.is_reward_model
    pairs = [json.loads(line) for line in soup_data["preference"].read_text().splitlines()]
    texts = [(p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) for p in pairs]
    chosen = reward_scores(scorer, [c for c, _ in texts])
    rejected = reward_scores(scorer, [r for _, r in texts])
    wins = sum(
        1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)
    )
    assert wins / len(texts) == report["score"]
    inputs = [Checkpoint.open(p) for p in paths]
    with Checkpoint.open(out) as soup:
        assert "score.weight" in soup.tensors
        for name in soup.tensors:
            mean = torch.stack([c.read(name) for c in inputs]).mean(0)
            torch.testing.assert_close(soup.read(name), mean, rtol=0, atol=1e-6)
    for checkpoint in inputs:
        checkpoint.close()


def test_cli_greedy_warm_and_bad_input(
    reward_ingredients: dict[str, Path],
    llama_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Greedy over reward models works the same; mixing them with causal LMs, text-only data for
    reward models and bad flags are all reported together with exit code 2."""
    rewards = [str(p) for p in reward_ingredients.values()]
    pref = str(soup_data["preference"])
    assert main(["soup", "-c", *rewards, "--eval", pref, str(tmp_path / "g")]) == 0
    report = json.loads((tmp_path / "g" / "soup.json").read_text())
    assert report["score"] >= max(c["score"] for c in report["candidates"])
    capsys.readouterr()
    code = main(
        [
            "soup",
            "-c",
            rewards[0],
            str(llama_ingredients["near_a"]),
            "--eval",
            str(soup_data["text"]),
            "--batch-size",
            "0",
            "--device",
            "gpu0",
            str(tmp_path / "bad"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    for fragment in (
        "--batch-size",
        "--device gpu0: not a device name",
        "LlamaForSequenceClassification",
        "preference data only",
    ):
        assert fragment in err
    assert not (tmp_path / "bad").exists()
