"""Fixtures of the MTP tests: the tiny Llama checkpoint and two small text sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.train.conftest import WORDS


@pytest.fixture(scope="session")
def tiny_llama(tiny_root: Path) -> Path:
    return tiny_root / "llama"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 documents of 5-60 random words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("mtp-docs") / "docs.jsonl"
    with path.open("w") as f:
        for _ in range(120):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def cyclic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text that cycles through ten letters: a model and heads can learn it in a few steps."""
    path = tmp_path_factory.mktemp("mtp-cycle") / "cycle.jsonl"
    letters = "abcdefghij"
    with path.open("w") as f:
        for start in range(200):
            text = "".join(letters[(start + i) % 10] for i in range(40))
            f.write(json.dumps({"text": text}) + "\n")
    return path
