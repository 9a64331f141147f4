"""Small real data sets for the training tests, written once per session, and the helpers the
test files share (a recipe written as YAML, a run's metrics read back)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """`recipe` as a YAML file at `path` (keys in the order given)."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metric_rows(out: Path) -> list[dict[str, float]]:
    """Every row of a run's training/metrics.csv, blank cells left out, values as floats."""
    with (out / "training" / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "to",
    "the",
    "big",
    "red",
    "house",
    "where",
    "a",
    "dog",
    "slept",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs.jsonl (text), sft.jsonl (prompt/completion), chat.jsonl (messages), old.jsonl
    (a second text source), notes/ (a folder of text files)."""
    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with (root / "docs.jsonl").open("w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": sentence(5, 60)}) + "\n")
    with (root / "old.jsonl").open("w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": sentence(5, 60).upper()}) + "\n")
    with (root / "sft.jsonl").open("w") as f:
        for _ in range(60):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    with (root / "chat.jsonl").open("w") as f:
        for _ in range(30):
            a = rng.randint(0, 9)
            messages = [
                {"role": "user", "content": f"double {a}"},
                {"role": "assistant", "content": str(2 * a)},
                {"role": "user", "content": "and again?"},
                {"role": "assistant", "content": str(4 * a)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    (root / "notes").mkdir()
    for i in range(3):
        (root / "notes" / f"n{i}.txt").write_text(sentence(80, 120))
    (root / "notes" / ".hidden.txt").write_text("never read")
    return root


@pytest.fixture(scope="session")
def tiny_llama(tiny_root: Path) -> Path:
    return tiny_root / "llama"
