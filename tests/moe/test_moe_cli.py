"""`alloy moe` end to end: build from a recipe or by sparse upcycling, and routing reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from alloy.cli.main import main
from alloy.moe.report import expert_names, load_moe, routing_report


def write_recipe(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_build_and_report(dense: dict[str, Path], tmp_path: Path) -> None:
    folder = dense["llama"]
    texts = ["hello there, my dear friend", "3.14159 * 2.71828 = 8.53973"]
    recipe = write_recipe(
        tmp_path / "moe.yaml",
        {
            "base_model": str(folder / "base"),
            "gate_mode": "hidden",
            "experts_per_token": 1,
            "experts": [
                {
                    "source_model": str(folder / "base"),
                    "name": "words",
                    "positive_prompts": [texts[0]],
                },
                {
                    "source_model": str(folder / "expert"),
                    "name": "digits",
                    "positive_prompts": [texts[1]],
                },
            ],
        },
    )
    out = tmp_path / "moe"
    assert main(["moe", str(recipe), str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["experts"] == ["words", "digits"] and report["sets"] == ["words", "digits"]
    assert report["tokens"] == [len(texts[0]), len(texts[1])]  # character tokenizer, start skipped
    for name, shares in report["accuracy"].items():  # routed by the very prompts: mostly home
        assert sum(shares) / len(shares) > 0.6, (name, shares)
    assert (out / "routing.png").stat().st_size > 0 and "Routing report" in (
        out / "routing.md"
    ).read_text()

    data = tmp_path / "sets"
    data.mkdir()
    (data / "digits.txt").write_text("1 + 1 = 2, 2 * 3 = 6")
    assert main(["moe", str(out), "--report", str(data / "digits.txt"), str(tmp_path / "rep")]) == 0
    again = json.loads((tmp_path / "rep" / "routing.json").read_text())
    assert again["sets"] == ["sets/digits"] and list(again["accuracy"]) == ["sets/digits"]


def test_sparse_upcycling_from_the_cli(dense: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "moe"
    args = [
        "moe",
        str(dense["qwen3"] / "base"),
        str(out),
        "--experts",
        "4",
        "--gate-mode",
        "uniform",
    ]
    assert main([*args, "--experts-per-token", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == (
        "qwen3_moe",
        4,
        4,
    )
    model, tokenizer = load_moe(out)
    text = "abc de"
    report = routing_report(model, tokenizer, {"x": [text]}, experts=expert_names(out, 4))
    # zero routers and every expert active: each expert takes exactly a quarter of the choices
    torch.testing.assert_close(report.topk, torch.full((1, 2, 4), 0.25))
    torch.testing.assert_close(report.top1.sum(-1), torch.ones(1, 2))
    assert report.tokens == [len(text)] and report.experts == [f"copy{i}" for i in range(4)]


def test_cli_errors(
    dense: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = str(dense["llama"] / "base")
    assert main(["moe", base]) == 2  # neither --experts nor --report
    assert "--experts N" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["moe", base, "--report", str(text)]) == 2  # a dense model has no experts
    assert "no experts to report on" in capsys.readouterr().err
    recipe = write_recipe(
        tmp_path / "r.yaml", {"base_model": base, "num_experts": 2, "gate_mode": "random"}
    )
    assert main(["moe", str(recipe)]) == 2
    assert main(["moe", str(recipe), str(tmp_path / "o"), "--experts", "2"]) == 2
    assert (
        main(["moe", base, str(tmp_path / "o"), "--experts", "1", "--experts-per-token", "2"]) == 2
    )
    assert "2 experts per token but only 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "moe").glob("*.yaml"))
DEMO = "runs/lab/family/demo/"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    from alloy.lab.tiny import build_tiny

    text = example.read_text()
    assert DEMO in text
    for seed, name in enumerate(sorted(set(re.findall(rf"{DEMO}(\S+)", text)))):
        build_tiny("llama", tmp_path / name, seed=seed, noise=0.3)
    recipe = tmp_path / example.name
    recipe.write_text(text.replace(DEMO, f"{tmp_path}/"))
    assert main(["moe", str(recipe), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
