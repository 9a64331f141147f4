"""`alloy generate`, `alloy rules` and `alloy eval` with an ensemble recipe, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alloy.cli.main import main


@pytest.fixture()
def recipe(lively: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "ensemble.yaml"
    data = {
        "rule": "proxy_tuning",
        "parameters": {"alpha": 0.5},
        "members": [
            {"model": str(lively["a"]), "role": "base"},
            {"model": str(lively["b"]), "role": "expert", "template": "Q: {prompt}\nA:"},
            {"model": str(lively["c"]), "role": "anti_expert"},
        ],
        "sampling": {"max_new_tokens": 6},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_generate_from_recipe_writes_jsonl(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["generate", str(recipe), "-p", "Hello", "-p", "World", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "World"]
    assert all(r["tokens"] <= 6 for r in rows)
    assert "Hello" in capsys.readouterr().out


def test_generate_from_model_folder_equals_one_member_recipe(
    lively: dict[str, Path], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n{"prompt": "The"}\n')
    outs = []
    for target in [lively["a"], tmp_path / "one.yaml"]:
        (tmp_path / "one.yaml").write_text(
            yaml.safe_dump({"rule": "log_linear", "members": [{"model": str(lively["a"])}]})
        )
        out = tmp_path / f"{target.name}.jsonl"
        argv = ["generate", str(target), "--prompts", str(prompts), "--max-new-tokens", "8"]
        assert main([*argv, "--out", str(out)]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]


def test_generate_input_errors(
    lively: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(lively["a"])]) == 2
    assert "no prompt given" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"text": "x"}\n')
    assert main(["generate", str(lively["a"]), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid JSON" in err and 'bad.jsonl:3: needs a string "prompt"' in err
    assert main(["generate", str(lively["a"]), "-p", "x", "--top-p", "2"]) == 2
    assert "--top-p: must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing.yaml"), "-p", "x"]) == 2


def test_rules_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert names == {"linear", "log_linear", "proxy_tuning", "dexperts", "contrastive", "dola"}


def test_eval_compares_an_ensemble_with_its_member(lively: dict[str, Path], tmp_path: Path) -> None:
    """A one-member recipe gets the member's perplexity; a mixture gets its own."""
    data = tmp_path / "text.txt"
    data.write_text("It is a truth universally acknowledged, that a single man.\n" * 3)
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"rule": "linear", "members": [{"model": str(lively["a"])}]}))
    two = tmp_path / "two.yaml"
    members = [{"model": str(lively["a"])}, {"model": str(lively["b"])}]
    two.write_text(yaml.safe_dump({"rule": "linear", "members": members}))
    out = tmp_path / "eval.json"
    argv = ["eval", str(lively["a"]), str(one), str(two), "--data", str(data), "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    name = next(iter(results[str(one)]))
    ppl = [results[str(k)][name]["perplexity"] for k in (lively["a"], one, two)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)
    assert ppl[2] != pytest.approx(ppl[0], rel=1e-3)


def test_eval_rejects_a_bad_recipe_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rule: linaer\nmembers: [{model: nowhere}]\n")
    data = tmp_path / "t.txt"
    data.write_text("text\n")
    assert main(["eval", str(bad), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'linear'" in err
