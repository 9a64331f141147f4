"""Tiny dense families to upcycle: a base and a differently seeded expert per architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloy.lab.tiny import build_tiny


@pytest.fixture(scope="session")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder holding `base` and `expert` (Llama, Mistral bf16, Qwen2 tied, Qwen3)."""
    root = tmp_path_factory.mktemp("dense")
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        build_tiny(arch, root / arch / "base", seed=0, noise=0.3)
        build_tiny(arch, root / arch / "expert", seed=1, noise=0.3)
    return {arch: root / arch for arch in ("llama", "mistral", "qwen2", "qwen3")}
