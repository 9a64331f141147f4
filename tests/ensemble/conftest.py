"""Tiny checkpoints with strong random weights (noise 0.5), so greedy decoding does not collapse
into one repeated token and parity tests compare long, varied sequences. Their vocabulary is the
tokenizer's 102 tokens, except "padded", which keeps the tiny configs' 128 rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloy.lab.tiny import build_tiny, tiny_tokenizer

LIVELY = {
    "a": ("llama", 3),
    "b": ("llama", 4),
    "c": ("llama", 5),
    "gpt2": ("gpt2", 6),
    "mistral": ("mistral", 7),
}


@pytest.fixture(scope="session")
def lively(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> model folder: llama a, b, c (one family, different weights), gpt2, mistral
    (sliding window) and "padded" (llama a's seed with a 128-row embedding)."""
    root = tmp_path_factory.mktemp("lively")
    vocab = len(tiny_tokenizer())
    folders = {
        name: build_tiny(arch, root / name, seed=seed, noise=0.5, vocab_size=vocab)
        for name, (arch, seed) in LIVELY.items()
    }
    folders["padded"] = build_tiny("llama", root / "padded", seed=3, noise=0.5)
    return folders
