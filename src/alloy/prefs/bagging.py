"""`alloy prefs strength --train K --recipe RECIPE`: the ensemble trained here, out of bag.

Each of the K reward models trains (an ordinary `alloy train` run of RECIPE, seed + k) on the
pairs it does not hold out; every pair is held out by exactly `held` models
(strength.holdout_assignment), and only those score it. So no pair is scored by a model that
saw its label, flipped labels included. Runs live in WORK (default `OUT.models`), one folder per
model beside the pairs it trained on (`bag-k.jsonl`); a model whose folder holds a finished run
of the same recipe, seed and pairs is reused, so an interrupted command resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alloy.errors import InputError, Problem
from alloy.io.yamlfile import read_recipe

MARKER = "prefs-bag.json"


def bag_recipe(recipe: Path, bag: Path, seed_offset: int) -> dict[str, Any]:
    """RECIPE with its data replaced by the bag file and its seed moved by `seed_offset`."""
    data, _ = read_recipe(recipe, "train recipe", "objective: reward, model: ..., ...")
    data["data"] = [{"name": "pairs", "path": str(bag), "kind": "preference"}]
    data["seed"] = int(data.get("seed", 0)) + seed_offset
    return data


def check_recipe(recipe: Path, data: Path) -> list[Problem]:
    """What stops RECIPE from training reward models on DATA, from the recipe alone."""
    from alloy.errors import RecipeError
    from alloy.train import load_train_recipe

    try:
        parsed = load_train_recipe(bag_recipe(recipe, data, 0))
    except (RecipeError, InputError) as exc:
        return [Problem(f"--recipe {recipe}", exc.message), *exc.problems]
    if parsed.spec.objective != "reward":
        hint = "set objective: reward (the ensemble scores pairs by reward)"
        return [Problem(f"--recipe {recipe}", f"trains objective {parsed.spec.objective!r}", hint)]
    return []


def train_bagged(
    records: Sequence[dict[str, Any]],
    mask: torch.Tensor,
    recipe: Path,
    work: Path,
    *,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Train model k on the records with mask[k] False; the K model folders, in order."""
    from alloy.train import train

    work.mkdir(parents=True, exist_ok=True)
    folders = []
    for k in range(mask.shape[0]):
        bag = work / f"bag-{k}.jsonl"
        held = mask[k].tolist()
        text = "".join(
            json.dumps(r, ensure_ascii=False) + "\n"
            for r, h in zip(records, held, strict=True)
            if not h
        )
        spec = bag_recipe(recipe, bag, k)
        key = hashlib.sha256((json.dumps(spec, sort_keys=True) + text).encode()).hexdigest()
        out = work / f"rm-{k}"
        marker = out / MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            say(f"reusing reward model {k + 1}/{mask.shape[0]} ({out})")
            folders.append(out)
            continue
        started = work / f"rm-{k}.started"  # the key of the run whose checkpoints are there
        resume = started.is_file() and started.read_text() == key
        resume = resume and Path(f"{out}.checkpoints").is_dir()
        bag.write_text(text, encoding="utf-8")
        started.write_text(key)
        pairs = int((~mask[k]).sum())
        say(f"training reward model {k + 1}/{mask.shape[0]} on {pairs} pairs -> {out}")
        train(spec, out, force=not resume, resume=resume, say=lambda message: None)
        marker.write_text(json.dumps({"key": key, "seed": spec["seed"]}) + "\n")
        folders.append(out)
    return folders


def default_work(out: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(out).rstrip('/')}.models")
