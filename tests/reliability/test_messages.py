"""Error messages name what the user wrote: an option of the command they ran, never a recipe
key of another command (`slices:`), an option of another command (`--data`) or the nearest
spelling of a flag that means something else (`--allow-pickle` for `--lazy-unpickle`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloy.cli.main import main
from alloy.lab.tiny import build_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a, b: two tiny Llamas of one shape; deep: three layers; wide: hidden size 48."""
    root = tmp_path_factory.mktemp("models")
    found = {
        "a": build_tiny("llama", root / "a", seed=1),
        "b": build_tiny("llama", root / "b", seed=2),
        "deep": build_tiny("llama", root / "deep", seed=3, layers=3),
    }
    tiny_model("llama", seed=4, hidden_size=48, intermediate_size=96).save_pretrained(root / "wide")
    tiny_tokenizer().save_pretrained(root / "wide")
    found["wide"] = root / "wide"
    return found


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("text") / "t.txt"
    file.write_text("It is a truth universally acknowledged, that a single man. " * 20)
    return file


def _err(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("other", "says"), [("deep", "numbers of layers"), ("wide", "shapes")])
def test_average_names_checkpoints_not_a_recipe(
    other: str,
    says: str,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _err(["average", str(models["a"]), str(models[other]), str(tmp_path / "out")], capsys)
    assert says in err and "checkpoints" in err
    assert "slices" not in err and "recipe" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("other", "says"),
    [("deep", "the candidates have different numbers of layers"), ("wide", "cannot be averaged")],
)
def test_soup_names_candidates_not_a_recipe(
    other: str,
    says: str,
    models: dict[str, Path],
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "out")
    err = _err(
        ["soup", out, "-c", str(models["a"]), str(models[other]), "--eval", str(text)], capsys
    )
    assert "--candidates" in err and says in err
    assert "slices" not in err and "recipe" not in err
    assert list(tmp_path.iterdir()) == []


def test_soup_missing_data_names_eval(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.jsonl")
    args = ["soup", str(tmp_path / "out"), "-c", str(models["a"]), str(models["b"])]
    err = _err([*args, "--eval", missing], capsys)
    assert missing in err and "check the --eval path" in err and "--data" not in err


def test_soup_out_taken_as_a_candidate(
    models: dict[str, Path], text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "soup")
    err = _err(["soup", "-c", str(models["a"]), str(models["b"]), out, "--eval", str(text)], capsys)
    assert f"missing OUT: {out!r} was taken as a candidate" in err
    assert "put OUT before -c" in err and "-c once per candidate" in err
    assert list(tmp_path.iterdir()) == []


def test_soup_without_out_still_says_missing(
    models: dict[str, Path], text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _err(["soup", "-c", str(models["a"]), str(models["b"]), "--eval", str(text)], capsys)
    assert "Missing argument 'OUT'" in err  # the last candidate is a model: nothing was taken


@pytest.mark.parametrize("command", ["average", "soup", "moe"])
def test_lazy_unpickle_is_explained_not_respelt(
    command: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = str(models["a"]), str(models["b"]), str(tmp_path / "out")
    args = {
        "average": ["average", a, b, out],
        "soup": ["soup", out, "-c", a, b, "--eval", a],
        "moe": ["moe", a, out, "--experts", "2"],
    }[command]
    err = _err([*args, "--lazy-unpickle"], capsys)
    assert "--lazy-unpickle (a mergekit flag)" in err and "drop the flag" in err
    assert "Possible options" not in err
    assert list(tmp_path.iterdir()) == []


def test_moe_report_missing_data_names_report(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.txt")
    err = _err(["moe", str(models["a"]), "--report", missing], capsys)
    assert missing in err and "check the --report path" in err and "--data" not in err


def test_eval_table_title_is_one_line(tiny_root: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "val.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    assert main(["eval", str(tiny_root / "llama"), "--data", str(text)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "alloy eval (perplexity for text sets, accuracy for tasks)"
