"""Fuzz the recipe readers: any mutation of a shipped example ends in exit 0 or exit 2, never in
a traceback or an internal error.

Every example under examples/ (merge, ensemble, MoE, training) is mutated at random: keys deleted
or misspelt, values swapped for another type, numbers pushed out of range or made NaN/inf, keys
duplicated, the text truncated. Merge, ensemble and MoE mutants are validated in full against
tiny real checkpoints (configs, headers, plan); training mutants recipe-only (their corpora are
the lab's). `ALLOY_FUZZ_MUTATIONS` sets the mutants per example (default 12) for a longer run.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.io import Checkpoint, save_state_dict
from alloy.lab.tiny import build_tiny

EXAMPLES = sorted(Path(__file__).parents[2].glob("examples/*/*.yaml"))
PER_EXAMPLE = int(os.environ.get("ALLOY_FUZZ_MUTATIONS", "12"))
_RUNS = re.compile(r"runs/[A-Za-z0-9/_.-]+")
_ODD_VALUES: list[Any] = [
    None, True, "x", "", [], {}, [1, 2], {"a": 1}, 0, -1, 2, 1.5, -0.5, 1e39, -1e39, 1e-45,
    float("nan"), float("inf"), float("-inf"), 10**30, "1e-3", "runs/nowhere",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny 8-layer llama base and five fine-tunes of it: the examples' paths map to these."""
    root = tmp_path_factory.mktemp("fuzz-models")
    base = build_tiny("llama", root / "base", seed=1, layers=8)
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt}
    folders = [base]
    for k in range(5):
        g = torch.Generator().manual_seed(20 + k)
        tuned = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        folders.append(save_state_dict(tuned, root / f"ft{k}", donor=base))
    return folders


def _localise(text: str, models: list[Path]) -> str:
    """Point the example's model paths at the tiny checkpoints: the base at the base, each
    other path at its own fine-tune."""
    seen: dict[str, Path] = {}

    def swap(match: re.Match[str]) -> str:
        path = match.group(0)
        if path not in seen:
            small_base = path.endswith(("family/base", "small/base"))
            others = sum(p != models[0] for p in seen.values())
            seen[path] = models[0] if small_base else models[1 + others % (len(models) - 1)]
        return str(seen[path])

    return _RUNS.sub(swap, text)


def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (keys and indices) of every node below the root."""
    out = []
    children = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list)
        else ()
    )
    for key, child in children:
        out.append((*path, key))
        out += _nodes(child, (*path, key))
    return out


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def _mutate(text: str, rng: random.Random) -> tuple[str, str]:
    """One random mutation of a recipe's text: (what was done, new text)."""
    tree = yaml.safe_load(text)
    nodes = _nodes(tree)
    kind = rng.choice(["delete", "retype", "number", "rename", "duplicate", "truncate", "add"])
    if kind == "truncate":
        cut = rng.randrange(len(text))
        return f"truncate at {cut}", text[:cut]
    if kind == "duplicate":
        lines = [i for i, line in enumerate(text.splitlines()) if re.match(r"\s*[\w-]+:", line)]
        i = rng.choice(lines)
        all_lines = text.splitlines()
        return f"duplicate line {i}", "\n".join([*all_lines[: i + 1], *all_lines[i:]]) + "\n"
    path = rng.choice(nodes)
    parent = _parent(tree, path)
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = rng.choice(_ODD_VALUES)
    elif kind == "number":
        numbers = [p for p in nodes if isinstance(_parent(tree, p)[p[-1]], (int, float))]
        path = rng.choice(numbers or [path])
        _parent(tree, path)[path[-1]] = rng.choice([-1, 0, 2, 1e39, -1e-9, 1e6, float("nan")])
    elif kind == "rename" and isinstance(parent, dict):
        key = path[-1]
        parent[f"{key}x" if rng.random() < 0.5 else key[:-1]] = parent.pop(key)
    elif kind == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "weight", "density", "seed", "rule"])] = rng.choice(_ODD_VALUES)
    return f"{kind} {'.'.join(map(str, path))}", yaml.safe_dump(tree, sort_keys=False)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_mutants_exit_0_or_2_with_a_message(
    example: Path,
    models: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    training = example.parent.name in ("train", "improve")  # their data is the lab's
    text = _localise(example.read_text(), models)
    rng = random.Random(f"{example.parent.name}/{example.name}")
    mode = ["--recipe-only"] if training else []
    file = tmp_path / example.name
    file.write_text(text)
    assert main(["validate", str(file), *mode]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for n in range(PER_EXAMPLE):
        what, mutant = _mutate(text, rng)
        file.write_text(mutant)
        code = main(["validate", str(file), *mode])
        captured = capsys.readouterr()
        context = f"mutant {n} ({what}) of {example.name}:\n{mutant}\n{captured.err}"
        assert code in (0, 2), context
        assert "internal error" not in captured.err and "Traceback" not in captured.err, context
        if code == 2:
            assert captured.err.strip(), context
