"""Every module imports (a broken import in a rarely used module must fail CI, not a user)."""

import importlib
import pkgutil

import alloy


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(alloy.__path__, prefix="alloy.")]
    assert "alloy.io.checkpoint" in names
    for name in names:
        importlib.import_module(name)
