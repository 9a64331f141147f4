"""Shared fixtures: tiny real checkpoints of several architectures, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alloy.lab.tiny import TINY, build_tiny

ARCHS = tuple(TINY)


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory):
    """Digests computed by tests are cached in a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALLOY_CACHE_DIR", str(tmp_path_factory.mktemp("alloy-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one tiny checkpoint per architecture (see alloy.lab.tiny.TINY)."""
    root = tmp_path_factory.mktemp("tiny")
    for arch in ARCHS:
        build_tiny(arch, root / arch, seed=7)
    return root


@pytest.fixture(params=ARCHS)
def tiny_checkpoint(request: pytest.FixtureRequest, tiny_root: Path) -> Path:
    """Each tiny architecture in turn (parametrised)."""
    return tiny_root / request.param
