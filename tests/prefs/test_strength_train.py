"""`alloy prefs strength --train K --recipe R`: K reward models trained out of bag by
`alloy train`, each pair scored only by the models that held it out; flipped labels are found."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from alloy.cli.main import main
from alloy.prefs import auroc

WORDS = ["cat", "sat", "on", "mat", "dog", "ran", "red", "big", "sun", "hat"]
FLIPPED = set(range(0, 48, 6))  # 8 of 48 pairs


def _pairs(path: Path) -> Path:
    """Chosen answers lower case, rejected the same words upper case (learnable from the last
    token); the pairs in FLIPPED have their labels swapped."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(48):
            words = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            good, bad = words, words.upper()
            if i in FLIPPED:
                good, bad = bad, good
            f.write(json.dumps({"prompt": "say:", "chosen": good, "rejected": bad, "i": i}) + "\n")
    return path


def _recipe(path: Path, model: Path, **changes: Any) -> Path:
    recipe = {
        "objective": "reward",
        "model": str(model),
        "data": [{"path": "replaced.jsonl"}],
        "schedule": {"name": "constant", "lr": 1e-2},
        "max_steps": 6,
        "batch_size": 8,
        "sequence_length": 32,
        **changes,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_trained_ensemble_scores_out_of_bag_and_finds_flips(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _pairs(tmp_path / "pairs.jsonl")
    recipe = _recipe(tmp_path / "rm.yaml", tiny_root / "llama")
    out = tmp_path / "strength"
    argv = ["prefs", "strength", str(data), str(out), "--train", "4", "--recipe", str(recipe)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "strength.jsonl").read_text().splitlines()]
    work = Path(f"{out}.models")
    for k in range(4):  # model k trained on exactly the pairs it did not score
        bag = [json.loads(line)["i"] for line in (work / f"bag-{k}.jsonl").read_text().splitlines()]
        scored = [r["line"] - 1 for r in rows if r["differences"][k] is not None]
        assert sorted(bag + scored) == list(range(48))
        assert (work / f"rm-{k}" / "config.json").is_file()
    assert all(sum(d is not None for d in r["differences"]) == 2 for r in rows)  # held = K // 2
    score = auroc([-float(r["mean"]) for r in rows], [r["line"] - 1 in FLIPPED for r in rows])
    assert score > 0.9, score  # flipped pairs have the lowest strength
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_per_pair"] == 2 and len(summary["scorers"]) == 4
    # A second run reuses the four models (same recipe, seeds and bags).
    capsys.readouterr()
    assert main([*argv, "--force"]) == 0
    assert capsys.readouterr().err.count("reusing reward model") == 4


def test_train_mode_is_checked_first(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _pairs(tmp_path / "pairs.jsonl")
    dpo = _recipe(tmp_path / "dpo.yaml", tiny_root / "llama", objective="dpo")
    out = tmp_path / "o"
    argv = ["prefs", "strength", str(data), str(out), "--train", "1", "--recipe", str(dpo)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "at least 2 models" in err and "trains objective 'dpo'" in err
    assert main(["prefs", "strength", str(data), str(out), "--train", "3"]) == 2
    assert "--train needs a recipe" in capsys.readouterr().err
    assert main(["prefs", "strength", str(data), str(out), "--held", "1", "-m", "x"]) == 2
    assert "only act with --train" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.models").exists()
