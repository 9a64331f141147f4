"""`alloy improve`: RAFT, ReST and self-rewarding loops end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.improve.conftest import PROMPTS, loop_recipe

from alloy.cli.main import main
from alloy.improve import improve


def _run(root: Path, name: str, recipe: dict[str, Any], *flags: str) -> int:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return main(["improve", str(path), str(root / name), "-q", *flags])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(model: Path) -> bytes:
    return (model / "model.safetensors").read_bytes()


def test_raft_two_iterations_are_reproducible_and_train_on_each_prompts_best(
    loop_root: Path, tmp_path: Path
) -> None:
    recipe = loop_recipe(
        loop_root,
        monitor={"reward": [str(loop_root / "rm_held")]},
        agreement=str(loop_root / "pairs.jsonl"),
        eval={"prompts": str(loop_root / "prompts.jsonl")},
    )
    assert _run(tmp_path, "a", recipe) == 0
    assert _run(tmp_path, "b", recipe) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for t in (1, 2):
        assert (a / f"iter-{t}/samples.jsonl").read_text() == (
            b / f"iter-{t}/samples.jsonl"
        ).read_text()
        assert _weights(a / f"iter-{t}/model") == _weights(b / f"iter-{t}/model")
    report = json.loads((a / "report.json").read_text())
    first, second = report["iterations"]
    assert first["policy"] == str(loop_root / "policy")
    assert second["policy"] == str(a / "iter-1/model")  # iteration 2 samples the new model
    samples = _rows(a / "iter-1/samples.jsonl")
    assert len(samples) == len(PROMPTS) * 3
    assert all(isinstance(s["monitor"], float) for s in samples)
    # RAFT keeps each prompt's highest-scored answer, laid out as an SFT example.
    best = {}
    for s in samples:
        if s["prompt"] not in best or s["score"] > best[s["prompt"]]["score"]:
            best[s["prompt"]] = s
    kept = _rows(a / "iter-1/train.jsonl")
    assert kept == [{"prompt": p, "completion": best[p]["answer"]} for p in PROMPTS]
    assert first["runs"][0]["kept"] == len(PROMPTS)
    assert first["runs"][0]["kept_score"] == pytest.approx(
        sum(best[p]["score"] for p in PROMPTS) / len(PROMPTS)
    )
    # The training run is an ordinary alloy train run of the loop's settings.
    run_recipe = yaml.safe_load((a / "iter-1/model/training/recipe.yaml").read_text())
    assert run_recipe["objective"] == "sft"
    assert run_recipe["model"] == str(loop_root / "policy")
    assert run_recipe["data"][0]["path"] == str(a / "iter-1/train.jsonl")
    names = [m["name"] for m in report["models"]]
    assert names == ["start", "iter-1", "iter-2"]
    for m in report["models"]:
        assert 0 <= m["agreement"]["accuracy"] <= 1
        assert m["held_out"]["score"]["n"] == len(PROMPTS)
        assert "monitor" in m["held_out"]
        assert len(_rows(Path(m["held_out"]["answers"]))) == len(PROMPTS)
    assert (a / "report.md").read_text().startswith("# raft")
    assert (a / "report.png").is_file()


def test_a_rerun_reuses_finished_iterations_and_more_iterations_extend_the_loop(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = loop_recipe(loop_root, iterations=1)
    assert _run(tmp_path, "loop", recipe) == 0
    model = tmp_path / "loop/iter-1/model/model.safetensors"
    stamp = model.stat().st_mtime_ns
    path = tmp_path / "loop.yaml"
    recipe["iterations"] = 2
    path.write_text(yaml.safe_dump(recipe))
    assert main(["improve", str(path), str(tmp_path / "loop")]) == 0
    out = capsys.readouterr().out
    assert "iteration 1: reused (same settings)" in out
    assert "iteration 2: sampling" in out
    assert model.stat().st_mtime_ns == stamp
    # A changed setting redoes the loop from its first iteration.
    recipe["sample"] = {**recipe["sample"], "temperature": 0.5}  # type: ignore[dict-item]
    path.write_text(yaml.safe_dump(recipe))
    assert main(["improve", str(path), str(tmp_path / "loop"), "-q"]) == 0
    assert model.stat().st_mtime_ns != stamp


def test_rest_improve_steps_train_on_rising_thresholds_from_the_previous_step(
    loop_root: Path, tmp_path: Path
) -> None:
    recipe = loop_recipe(loop_root, "rest", iterations=1, select={"quantiles": [0.25, 0.75]})
    assert _run(tmp_path, "rest", recipe) == 0
    out = tmp_path / "rest"
    scores = sorted(s["score"] for s in _rows(out / "iter-1/samples.jsonl"))
    runs = json.loads((out / "report.json").read_text())["iterations"][0]["runs"]
    assert [r["step"] for r in runs] == [1, 2]
    assert runs[0]["threshold"] < runs[1]["threshold"]
    for r in runs:
        assert r["kept"] == sum(s >= r["threshold"] for s in scores)
    first, second = _rows(out / "iter-1/train-1.jsonl"), _rows(out / "iter-1/train-2.jsonl")
    assert all(row in first for row in second)  # the higher bar keeps a subset
    step2 = yaml.safe_load((out / "iter-1/step-2/model/training/recipe.yaml").read_text())
    assert step2["model"] == str(out / "iter-1/step-1/model")
    report = json.loads((out / "report.json").read_text())
    assert report["iterations"][0]["model"] == str(out / "iter-1/step-2/model")


def test_self_reward_judges_its_own_samples_and_trains_dpo_on_best_against_worst(
    loop_root: Path, tmp_path: Path
) -> None:
    recipe = loop_recipe(
        loop_root,
        "self_reward",
        score={"judge": {"prompt": str(loop_root / "judge.txt"), "mode": "expected"}},
        agreement=str(loop_root / "pairs.jsonl"),
    )
    assert _run(tmp_path, "sr", recipe) == 0
    out = tmp_path / "sr"
    samples = _rows(out / "iter-2/samples.jsonl")
    assert all(0 <= s["score"] <= 5 for s in samples)
    by_answer = {(s["prompt"], s["answer"]): s["score"] for s in samples}
    for pair in _rows(out / "iter-2/train.jsonl"):
        assert (
            by_answer[(pair["prompt"], pair["chosen"])]
            > by_answer[(pair["prompt"], pair["rejected"])]
        )
    run_recipe = yaml.safe_load((out / "iter-2/model/training/recipe.yaml").read_text())
    assert run_recipe["objective"] == "dpo"
    assert run_recipe["model"] == str(out / "iter-1/model")  # M2 -> M3, its own reference
    report = json.loads((out / "report.json").read_text())
    # The judge is the policy: each model of the chain is checked against the labels itself.
    assert [m["name"] for m in report["models"]] == ["start", "iter-1", "iter-2"]
    assert all(m["agreement"]["pairs"] == 4 for m in report["models"])


def test_a_judge_that_writes_no_score_stops_the_loop_with_a_fix(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = loop_recipe(
        loop_root,
        "self_reward",
        iterations=1,
        score={
            "judge": {"prompt": str(loop_root / "judge.txt"), "samples": 2, "max_new_tokens": 6}
        },
    )
    assert _run(tmp_path, "sr", recipe) == 2
    err = capsys.readouterr().err
    assert "no pairs" in err and "mode: expected" in err


def test_a_library_scorer_replaces_the_recipes(loop_root: Path, tmp_path: Path) -> None:
    """RAFT with the answer's length as its reward keeps each prompt's longest answer."""

    class Length:
        name = "length"

        def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
            return [float(len(a)) for a in answers]

    report = improve(
        loop_recipe(loop_root, iterations=1), tmp_path / "len", scorer=Length(), say=lambda m: None
    )
    samples = _rows(tmp_path / "len/iter-1/samples.jsonl")
    longest = {p: max(len(s["answer"]) for s in samples if s["prompt"] == p) for p in PROMPTS}
    kept = _rows(tmp_path / "len/iter-1/train.jsonl")
    assert [len(r["completion"]) for r in kept] == [longest[p] for p in PROMPTS]
    assert report["iterations"][0]["score"]["max"] == max(longest.values())


def test_output_folder_that_is_not_a_loop_needs_force(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("keep me")
    assert _run(tmp_path, "busy", loop_recipe(loop_root, iterations=1)) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "busy/notes.txt").read_text() == "keep me"


def test_dry_run_prints_the_plan_and_writes_nothing(
    loop_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        _run(
            tmp_path,
            "dry",
            loop_recipe(loop_root, "rest", select={"thresholds": [0.0, 0.1]}),
            "--dry-run",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "rest: 2 iteration(s)" in out and "2 sft run(s)" in out
    assert not (tmp_path / "dry").exists()


def test_empty_answers_are_never_kept(
    loop_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer that is EOS at once scores (here: best) but cannot be an SFT target."""
    from alloy.ensemble.decoder import Generation
    from alloy.improve import loop

    sample = loop.sample_answers

    def with_an_empty_first_answer(*args: Any, **kwargs: Any) -> Any:
        groups, stats = sample(*args, **kwargs)
        for g in groups:
            g[0] = Generation(g[0].prompt, "", [], "eos")
        return groups, stats

    class Shortest:
        name = "shortest"

        def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
            return [-float(len(a)) for a in answers]

    monkeypatch.setattr(loop, "sample_answers", with_an_empty_first_answer)
    report = improve(
        loop_recipe(loop_root, iterations=1), tmp_path / "e", scorer=Shortest(), say=lambda m: None
    )
    kept = _rows(tmp_path / "e/iter-1/train.jsonl")
    assert len(kept) == len(PROMPTS) and all(r["completion"].strip() for r in kept)
    assert report["iterations"][0]["empty"] == len(PROMPTS)
