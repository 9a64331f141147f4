"""The docs' parameter tables are the registries' (types, defaults, ranges), never stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_docs_tables_match_the_registries() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_tables.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_numeric_parameter_is_in_the_docs_with_its_range() -> None:
    from alloy.merge.registry import all_methods

    text = (ROOT / "docs" / "merge.md").read_text()
    for spec in all_methods().values():
        for p in spec.params.values():
            if p.kind in (int, float):
                assert f"| {spec.name} | `{p.name}` | {p.kind.__name__} | `{p.range}` |" in text
