"""Ratatouille and bagging pipelines: every stage kept, combinations made, reruns reuse models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloy.cli.main import main
from alloy.errors import RecipeError
from alloy.train.data import bootstrap, load_sources, resolve_sources
from alloy.train.recipe import DataEntry
from alloy.train.recycle import load_recycle_recipe, recycle

TRAIN = {
    "schedule": {"name": "constant", "lr": 3e-3},
    "max_steps": 2,
    "batch_size": 2,
    "sequence_length": 32,
}


def _ratatouille(tiny_llama: Path, data_dir: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "recycle": "ratatouille",
        "base": str(tiny_llama),
        "auxiliary": [
            {"name": "old", "data": [str(data_dir / "old.jsonl")]},
            {"name": "notes", "data": [str(data_dir / "notes")]},
        ],
        "target": [str(data_dir / "docs.jsonl")],
        "train": TRAIN,
        "combine": {"method": "greedy", "data": [str(data_dir / "docs.jsonl")]},
        "eval": {
            "data": [str(data_dir / "docs.jsonl"), str(data_dir / "old.jsonl")],
            "max_tokens": 256,
        },
    }
    recipe.update(changes)
    return recipe


def test_ratatouille_keeps_every_stage_and_reuses_it(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rat"
    messages: list[str] = []
    report = recycle(_ratatouille(tiny_llama, data_dir), out, say=messages.append)
    for stage in ("auxiliary/old", "auxiliary/notes", "target/old", "target/notes"):
        assert (out / stage / "config.json").is_file(), stage
    assert (out / "soup" / "config.json").is_file()
    assert set(report["scores"]) == {
        "base",
        "auxiliary/old",
        "auxiliary/notes",
        "target/old",
        "target/notes",
        "soup",
    }
    # the target fine-tunes start from the auxiliary models, not from the base
    recipes = json.loads((out / "pipeline.json").read_text())["runs"]
    assert recipes["target/old"]["recipe"]["model"] == str(out / "auxiliary" / "old")
    assert "| soup |" in (out / "report.md").read_text()
    messages.clear()
    recycle(_ratatouille(tiny_llama, data_dir), out, say=messages.append)
    assert sum("reused" in m for m in messages) == 4


def test_bagging_members_see_bootstrap_resamples(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {
        "recycle": "bagging",
        "base": str(tiny_llama),
        "target": [str(data_dir / "docs.jsonl")],
        "members": 2,
        "train": TRAIN,
        "combine": {"method": "ensemble"},
        "eval": {"data": [str(data_dir / "docs.jsonl")], "max_tokens": 256},
    }
    path = tmp_path / "bag.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), str(tmp_path / "bag")]) == 0
    assert "ensemble" in capsys.readouterr().out
    ensemble = yaml.safe_load((tmp_path / "bag" / "ensemble.yaml").read_text())
    assert [m["model"] for m in ensemble["members"]] == [
        str(tmp_path / "bag" / "members" / k) for k in ("0", "1")
    ]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "bag" / "members" / "0")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "bag" / "members" / "1")
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_bootstrap_resamples_with_replacement(data_dir: Path, tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    source = resolve_sources([DataEntry(path=str(data_dir / "docs.jsonl"))], Path())[0]
    (full,) = load_sources([source], tokenizer, cache=False)
    sample = bootstrap(full, 0)
    assert sample.items == full.items
    items = {
        tuple(sample.ids[sample.starts[i] : sample.starts[i + 1]]) for i in range(sample.items)
    }
    originals = {tuple(full.ids[full.starts[i] : full.starts[i + 1]]) for i in range(full.items)}
    assert items < originals  # a strict subset: some items drawn twice, some never
    # about 1 - 1/e of the distinct items appear
    assert 0.5 < len(items) / full.items < 0.75
    assert np.array_equal(bootstrap(full, 0).ids, sample.ids)


def test_recycling_recipe_errors_point_into_the_recipe(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = _ratatouille(
        tiny_llama,
        data_dir,
        auxiliary=[{"name": "old", "data": [str(data_dir / "old.jsonl")], "model": "x"}],
        train={**TRAIN, "schedule": {"name": "cosine", "lr": 1e-3, "warmpu": 2}},
        combine={"method": "greedy"},
    )
    with pytest.raises(RecipeError) as info:
        load_recycle_recipe(recipe, tmp_path / "out")
    text = str(info.value)
    assert "auxiliary: ratatouille needs at least two" in text
    assert "auxiliary.0: give data (to fine-tune the base) or model" in text
    assert "combine.data: a greedy soup needs held-out data" in text
    assert "train.schedule.warmpu: unknown parameter (did you mean 'warmup'?" in text
