"""make_soup on tiny checkpoints: in-memory scores match the written soup, the uniform soup is the
mean, and bad input is refused before any model is loaded or anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import alloy.soup.soup as soup_module
from alloy.errors import InputError, OutputExistsError
from alloy.eval import EvalSet, EvalSettings, evaluate, load_eval_sets, load_scorer
from alloy.io import Checkpoint
from alloy.lab.tiny import TINY, build_tiny
from alloy.merge.api import merge
from alloy.soup import Kitchen, choose_objective, make_soup, objective_value, soup_recipe
from alloy.soup.objective import Objective

SETTINGS = EvalSettings(window=64)


def _names(paths: dict[str, Path]) -> list[Path]:
    return [paths["near_a"], paths["near_b"], paths["far"]]


def _score_folder(folder: Path, data: Path, objective: Objective) -> float:
    sets = [s for s in load_eval_sets([data]) if s.name in objective.sets]
    return objective_value(evaluate(load_scorer(folder), sets, SETTINGS), objective)


def _forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("models were loaded although the input is invalid")

    monkeypatch.setattr(Kitchen, "load", refuse)
    monkeypatch.setattr(soup_module, "evaluate", refuse)


@pytest.mark.parametrize(("ingredients", "method"), [("llama", "greedy"), ("mistral", "uniform")])
def test_in_memory_scores_equal_the_written_soup(
    ingredients: str,
    method: str,
    request: pytest.FixtureRequest,
    soup_data: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The soup scored in memory is bit-for-bit the folder merge() writes, reloaded: for fp32
    llama and for bf16 mistral, whose soups are rounded to bf16 before scoring, as written."""
    paths = _names(request.getfixturevalue(f"{ingredients}_ingredients"))
    report = make_soup(
        paths, [soup_data["text"]], tmp_path / "out", method=method, settings=SETTINGS
    )
    assert _score_folder(tmp_path / "out", soup_data["text"], report.objective) == (
        report.selection.score
    )
    # Each ingredient scored through the shared vessel is the ingredient itself.
    for k, path in enumerate(paths):
        assert (
            _score_folder(path, soup_data["text"], report.objective)
            == (report.selection.individual[k])
        )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    expected_dtype = "float32" if ingredients == "llama" else "bfloat16"
    assert config.get("dtype", config.get("torch_dtype")) == expected_dtype


def test_uniform_soup_is_the_mean_of_the_ingredients(
    llama_ingredients: dict[str, Path], soup_data: dict[str, Path], tmp_path: Path
) -> None:
    """Uniform soup tensor = (a + b + c) / 3 for every tensor, both written and in memory."""
    paths = _names(llama_ingredients)
    report = make_soup(
        paths, [soup_data["text"]], tmp_path / "out", method="uniform", settings=SETTINGS
    )
    assert report.selection.chosen == report.selection.order
    assert sorted(report.selection.chosen) == [0, 1, 2]
    inputs = [Checkpoint.open(p) for p in paths]
    with Checkpoint.open(tmp_path / "out") as out:
        assert set(out.tensors) == set(inputs[0].tensors)
        for name in out.tensors:
            mean = torch.stack([c.read(name) for c in inputs]).mean(0)
            torch.testing.assert_close(out.read(name), mean, rtol=0, atol=1e-6)
    for checkpoint in inputs:
        checkpoint.close()
    kitchen = Kitchen.load(paths)
    vessel = kitchen.scorer((0, 1, 2)).model
    reference = load_scorer(tmp_path / "out").model.state_dict()
    for name, tensor in vessel.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert kitchen.nbytes == 3 * sum(t.numel() * 4 for t in kitchen.states[0].values())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_vessel_holds_the_written_soup_for_every_architecture(arch: str, tmp_path: Path) -> None:
    """Tied Conv1D (gpt2), tied fp16 (qwen2), fused MoE experts (mixtral), bf16: the soup cooked
    in the vessel equals, tensor for tensor, the folder merge() writes, loaded back."""
    paths = [build_tiny(arch, tmp_path / f"m{seed}", seed=seed) for seed in (1, 2, 3)]
    order = (2, 0, 1)
    vessel = Kitchen.load(paths).scorer(order).model.state_dict()
    merge(soup_recipe([paths[k] for k in order]), tmp_path / "soup", hash_inputs=False)
    written = load_scorer(tmp_path / "soup").model.state_dict()
    assert set(written) == set(vessel)
    for name, tensor in written.items():
        assert torch.equal(tensor, vessel[name]), name


def test_incompatible_candidates_rejected_before_any_evaluation(
    llama_ingredients: dict[str, Path],
    mistral_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another architecture, another depth and a missing folder are all reported at once."""
    deeper = build_tiny("llama", tmp_path / "deeper", layers=3, seed=7)
    _forbid_loading(monkeypatch)
    with pytest.raises(InputError) as info:
        make_soup(
            [llama_ingredients["near_a"], mistral_ingredients["near_a"], deeper],
            [soup_data["text"]],
            tmp_path / "out",
        )
    text = str(info.value)
    assert "MistralForCausalLM" in text and "LlamaForCausalLM" in text
    with pytest.raises(InputError) as info:
        make_soup(
            [llama_ingredients["near_a"], deeper, tmp_path / "missing"],
            [soup_data["text"], tmp_path / "missing.txt"],
            tmp_path / "out",
            method="best",
        )
    text = str(info.value)
    for fragment in ("missing.txt", "no such model folder", "'best'"):
        assert fragment in text
    with pytest.raises(InputError, match="layers"):
        make_soup([llama_ingredients["near_a"], deeper], [soup_data["text"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_before_any_work(
    llama_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with monkeypatch.context() as patch:
        _forbid_loading(patch)
        with pytest.raises(OutputExistsError):
            # The data does not even exist: the output check comes first and alone.
            make_soup(_names(llama_ingredients), [tmp_path / "nope.txt"], out)
    assert (out / "keep.txt").read_text() == "mine"
    make_soup(_names(llama_ingredients), [soup_data["text"]], out, force=True, settings=SETTINGS)
    assert not (out / "keep.txt").exists() and (out / "soup.json").is_file()


def test_a_failure_while_writing_leaves_nothing(
    llama_ingredients: dict[str, Path],
    soup_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model is already merged when the plot fails: still no output, no temporary folder."""

    def broken_plot(*args: Any) -> bool:
        raise RuntimeError("disk full")

    monkeypatch.setattr(soup_module, "plot_soup", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        make_soup(_names(llama_ingredients), [soup_data["text"]], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _set(name: str, kind: str, n: int = 1) -> EvalSet:
    return EvalSet(name, Path(name), kind, ("x",) * n)  # type: ignore[arg-type]


def test_objective_follows_the_data_and_pools_sets() -> None:
    """Text -> perplexity (lower); tasks -> accuracy (higher), pooled by item count:
    (1.0 * 2 + 0.5 * 6) / 8 = 0.625."""
    text, mc, pref = _set("t", "text"), _set("mc", "choice"), _set("p", "preference")
    objective, problems = choose_objective([text], None, reward_models=False)
    assert objective == Objective("perplexity", False, ("t",)) and not problems
    objective, _ = choose_objective([mc, pref], None, reward_models=False)
    assert objective == Objective("accuracy", True, ("mc", "p"))
    results = {"mc": {"accuracy": 1.0, "items": 2}, "p": {"accuracy": 0.5, "items": 6}}
    assert objective_value(results, objective) == pytest.approx(0.625)
    objective, _ = choose_objective([text, pref], None, reward_models=True)
    assert objective == Objective("accuracy", True, ("p",))
    objective, _ = choose_objective([text, mc], "bits_per_byte", reward_models=False)
    assert objective == Objective("bits_per_byte", False, ("t",))
    two_texts = Objective("perplexity", False, ("t", "u"))
    assert objective_value({"overall": {"perplexity": 3.0}}, two_texts) == 3.0
    for sets, metric, reward, fragment in [
        ([text, mc], None, False, "mixes text sets"),
        ([text], None, True, "preference data only"),
        ([pref], "accuracy_norm", True, "not defined for reward models"),
        ([text], "accuracy", False, "needs choice or preference data"),
        ([text], "loss", False, "is not one of"),
    ]:
        objective, problems = choose_objective(sets, metric, reward_models=reward)
        assert objective is None and fragment in str(problems[0])
