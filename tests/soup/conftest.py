"""Soup ingredients: tiny checkpoints that share an initialisation, as fine-tunes of one model do.

`near_a` and `near_b` are the same tiny model moved by +delta and -delta, so their average is the
shared model itself; `far` is moved five times further in another direction. Causal LMs (llama,
fp32; mistral, bf16) and sequence-classification reward models (Llama, one label) are built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.lab.tiny import tiny_model, tiny_reward_model, tiny_tokenizer

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed."
)
PREFERENCES = [
    {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi:", "chosen": " hi", "rejected": " go away"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
    {"prompt": "Is ice cold?", "chosen": " yes", "rejected": " no, it is hot"},
    {"prompt": "Colour of the sky:", "chosen": " blue", "rejected": " green"},
    {"prompt": "3 * 3 =", "chosen": " 9", "rejected": " 33"},
]
VARIANTS = {"near_a": (1.0, 11), "near_b": (-1.0, 11), "far": (5.0, 12)}  # (scale, noise seed)


def reward_model(seed: int = 3) -> Any:
    """A tiny LlamaForSequenceClassification with one label (a reward model), seeded."""
    return tiny_reward_model(seed=seed)


def build_variants(make: Any, root: Path, step: float) -> dict[str, Path]:
    """Save `make()` moved by scale * step * noise(seed) for each variant; returns name -> path."""
    paths = {}
    for name, (scale, seed) in VARIANTS.items():
        model = make()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.add_((noise * step * scale).to(param.dtype))
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="session")
def llama_ingredients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_ingredients")
    return build_variants(lambda: tiny_model("llama", seed=7), root, 0.03)


@pytest.fixture(scope="session")
def mistral_ingredients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 ingredients: the written soup is rounded to bf16, and so must be the scored one."""
    root = tmp_path_factory.mktemp("mistral_ingredients")
    return build_variants(lambda: tiny_model("mistral", seed=7), root, 0.03)


@pytest.fixture(scope="session")
def reward_ingredients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_ingredients")
    return build_variants(reward_model, root, 0.05)


@pytest.fixture(scope="session")
def soup_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Held-out data: a text file and a preference JSONL file."""
    root = tmp_path_factory.mktemp("soup_data")
    (root / "prose.txt").write_text(TEXT)
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PREFERENCES))
    return {"text": root / "prose.txt", "preference": root / "prefs.jsonl"}
