"""A tiny policy, tiny reward models and prompt files for the loop tests (built once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alloy.lab.tiny import build_tiny, tiny_reward_model, tiny_tokenizer

PROMPTS = ["the cat", "a dog", "on the mat", "then it", "ran to", "and the"]
PAIRS = [
    {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " zzzz"},
    {"prompt": "a dog", "chosen": " ran to the cat", "rejected": " qqq"},
    {"prompt": "then it", "chosen": " sat", "rejected": " xx xx"},
    {"prompt": "and the", "chosen": " mat", "rejected": " kkkk"},
]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def loop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("improve")
    build_tiny("llama", root / "policy", seed=11)
    for name, seed in (("rm", 1), ("rm_held", 2)):
        tiny_reward_model(seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(root / "pairs.jsonl", PAIRS)
    (root / "judge.txt").write_text("Q:{prompt} A:{response} Score 0-5.")
    return root


def loop_recipe(root: Path, method: str = "raft", **changes: object) -> dict[str, object]:
    """A small loop: 2 iterations, 3 samples of 8 tokens for each of the 6 prompts, 2 training
    steps of 4 rows per run."""
    recipe: dict[str, object] = {
        "improve": method,
        "policy": str(root / "policy"),
        "prompts": str(root / "prompts.jsonl"),
        "iterations": 2,
        "sample": {"k": 3, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 6},
        "train": {
            "schedule": {"name": "constant", "lr": 1e-3},
            "max_steps": 2,
            "batch_size": 4,
            "sequence_length": 48,
        },
        "seed": 3,
    }
    if method != "self_reward":
        recipe["score"] = {"reward": [str(root / "rm")]}
    recipe.update(changes)
    return recipe
