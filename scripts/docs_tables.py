"""Write the parameter tables of docs/merge.md, docs/ensemble.md and docs/average.md from the
registries, so the docs show the same types, defaults and valid ranges as `alloy validate` and
`alloy methods` (every table sits between `<!-- generated: NAME -->` and `<!-- end -->`).

    python scripts/docs_tables.py           # rewrite the tables
    python scripts/docs_tables.py --check   # exit 1 if a table is out of date (run by the tests)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def merge_parameters() -> str:
    from alloy.merge.registry import all_methods

    rows = []
    for spec in all_methods().values():
        for p in spec.params.values():
            kind = " \\| ".join(p.choices) if p.choices else p.kind.__name__
            default = "required" if p.required else f"`{p.default!r}`"
            scope = "per model" if p.per_model else "shared"
            valid = f"`{p.range}`" if p.range else ""
            rows.append([spec.name, f"`{p.name}`", kind, valid, scope, default])
    return _table(["method", "parameter", "type", "range", "scope", "default"], rows)


def ensemble_parameters() -> str:
    from alloy.ensemble.rules import RULES

    rows = []
    for spec in RULES.values():
        if spec.weighted:
            valid = "any sign, not all 0" if spec.signed_weights else "`[0, 1]`, summing to 1"
            rows.append([spec.name, "member `weight`", valid, "uniform"])
        for name, default in spec.params.items():
            rows.append([spec.name, f"`{name}`", f"`{spec.ranges[name]}`", f"`{default!r}`"])
    return _table(["rule", "parameter", "range", "default"], rows)


def average_options() -> str:
    from alloy.average.options import DEFAULT_DECAY, DEFAULT_K, RANGES

    defaults = {"decay": DEFAULT_DECAY, "start": 0, "every": 1, "k": DEFAULT_K}
    meaning = {
        "decay": "EMA decay per update (`alloy average`: per checkpoint)",
        "start": "first optimizer step that is averaged",
        "every": "average every this many steps",
        "k": "LaWA: the latest k checkpoints",
    }
    rows = [
        [f"`{name}`", f"`{valid}`", f"`{defaults[name]!r}`", meaning[name]]
        for name, valid in RANGES.items()
    ]
    return _table(["option", "range", "default", "meaning"], rows)


TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "merge-parameters": ("docs/merge.md", merge_parameters),
    "ensemble-parameters": ("docs/ensemble.md", ensemble_parameters),
    "average-options": ("docs/average.md", average_options),
}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, (doc, make) in TABLES.items():
        file = ROOT / doc
        text = file.read_text()
        block = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end -->)", re.S)
        if block.search(text) is None:
            print(f"{doc}: no `<!-- generated: {name} -->` ... `<!-- end -->` block")
            return 1
        match = block.search(text)
        assert match is not None
        new = text[: match.end(1)] + make() + "\n" + text[match.start(2) :]
        if new != text:
            stale.append(doc)
            if not check:
                file.write_text(new)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/docs_tables.py")
        return 1
    print("\n".join(f"wrote {doc}" for doc in stale) if stale else "tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
