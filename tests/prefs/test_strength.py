"""Preference strength: hand-derived statistics and flags, AUROC, filtering, and the CLI on tiny
reward models and a causal LM, where a pair whose label is flipped must show the negated mean."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alloy.cli.main import main
from alloy.lab.tiny import tiny_model, tiny_reward_model, tiny_tokenizer
from alloy.prefs import auroc, filter_records, standardize, strength

PAIRS = [
    {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " five", "topic": "sums"},
    {"prompt": "Say hi:", "chosen": " hi", "rejected": " go away", "topic": "talk"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome", "topic": "map"},
    {"prompt": "Is ice cold?", "chosen": " yes", "rejected": " no, it is hot", "topic": "talk"},
    {"prompt": "Colour of the sky:", "chosen": " blue", "rejected": " green", "topic": "sky"},
    {"prompt": "3 * 3 =", "chosen": " 9", "rejected": " 33", "topic": "sums"},
]


def test_mean_std_and_flags_by_hand() -> None:
    d = torch.tensor([[2.0, -1.0, 0.1], [4.0, -3.0, -0.1]])
    result = strength(d)
    assert result.mean.tolist() == pytest.approx([3.0, -2.0, 0.0])
    assert result.std.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2), math.sqrt(0.02)])
    assert result.flags == ("clean", "mislabelled", "ambiguous")
    # A wider band: 3 < 3·√2 and |−2| < 3·√2, so both are now within the models' disagreement.
    assert strength(d, band=3.0).flags == ("ambiguous", "ambiguous", "ambiguous")
    # One scorer: the sign decides; exactly zero is ambiguous.
    assert strength(torch.tensor([[0.5, -0.5, 0.0]])).flags == ("clean", "mislabelled", "ambiguous")
    with pytest.raises(ValueError, match="band"):
        strength(d, band=-1)
    with pytest.raises(ValueError, match="scorers, pairs"):
        strength(torch.zeros(3))


def test_standardize_divides_each_scorer_by_its_spread() -> None:
    d = torch.tensor([[1.0, 3.0], [10.0, 10.0]])  # std 1.414...; the second row is constant
    out = standardize(d)
    assert out[0].tolist() == pytest.approx([1 / math.sqrt(2), 3 / math.sqrt(2)])
    assert out[1].tolist() == [10.0, 10.0]


def test_auroc_goldens() -> None:
    # Four positive-negative pairs: (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auroc([1.0, 1.0], [True, False]) == 0.5  # a tie counts half
    assert auroc([3.0, 2.0, 1.0], [True, True, False]) == 1.0
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([1.0], [True])


def test_filter_keeps_drops_and_flips() -> None:
    records = [dict(p) for p in PAIRS[:3]]
    kept, counts = filter_records(records, ["clean", "mislabelled", "ambiguous"])
    assert counts == {"kept": 1, "dropped": 1, "flipped": 1}
    assert kept[0] == records[0]
    assert kept[1] == {**records[1], "chosen": " go away", "rejected": " hi"}  # topic kept
    kept, counts = filter_records(
        records, ["clean", "mislabelled", "ambiguous"], mislabelled="drop", ambiguous="keep"
    )
    assert [r["prompt"] for r in kept] == ["Q: 2+2? A:", "Capital of France?"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    out = {}
    for name, model in (
        ("rm1", tiny_reward_model(seed=1)),
        ("rm2", tiny_reward_model(seed=2)),
        ("rm3", tiny_reward_model(seed=3)),
        ("lm", tiny_model("llama", seed=4)),
    ):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _table(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "strength.jsonl").read_text().splitlines()]


def test_cli_flipped_pairs_show_the_negated_mean(
    scorers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scorers are deterministic, so flipping a pair's label negates every difference: its mean
    changes sign, its spread does not, and clean and mislabelled swap."""
    models = [str(scorers[k]) for k in ("rm1", "rm2", "rm3")]
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    flips = {0, 3}
    swapped = [
        {**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i in flips else p
        for i, p in enumerate(PAIRS)
    ]
    noisy = _write(tmp_path / "noisy.jsonl", swapped)
    assert (
        main(["prefs", "strength", str(data), str(tmp_path / "a"), "-q", "--models", *models]) == 0
    )
    argv = ["prefs", "strength", str(noisy), str(tmp_path / "b"), "-m", *models, "--filter"]
    assert main([*argv, str(tmp_path / "clean.jsonl")]) == 0
    a, b = _table(tmp_path / "a"), _table(tmp_path / "b")
    swap = {"clean": "mislabelled", "mislabelled": "clean", "ambiguous": "ambiguous"}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        sign = -1 if i in flips else 1
        assert y["mean"] == pytest.approx(sign * x["mean"], abs=1e-6)
        assert y["std"] == pytest.approx(x["std"], abs=1e-6)
        assert y["flag"] == (swap[x["flag"]] if i in flips else x["flag"])
        assert len(x["differences"]) == 3 and x["line"] == i + 1
    # mean and std are those of the three models' differences, recomputed here.
    for row in a:
        d = torch.tensor(row["differences"], dtype=torch.float64)
        assert row["mean"] == pytest.approx(float(d.mean()))
        assert row["std"] == pytest.approx(float(d.std()))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["pairs"] == 6 and sum(summary["flags"].values()) == 6
    assert (tmp_path / "a" / "histogram.png").stat().st_size > 1000
    # The filter flips mislabelled pairs back and drops ambiguous ones, keeping other fields.
    cleaned = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    flags = [row["flag"] for row in b]
    assert len(cleaned) == flags.count("clean") + flags.count("mislabelled")
    assert all("topic" in r for r in cleaned)
    out = capsys.readouterr().out
    assert "6 pairs:" in out and f"{len(cleaned)} pairs written" in out


def test_cli_causal_lm_scores_answer_log_likelihoods(
    scorers: dict[str, Path], tmp_path: Path
) -> None:
    from alloy.eval.choice import continuation_logprobs
    from alloy.eval.scorer import load_scorer

    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    assert (
        main(["prefs", "strength", str(data), str(tmp_path / "o"), "-q", "-m", str(scorers["lm"])])
        == 0
    )
    scorer = load_scorer(scorers["lm"])
    chosen = continuation_logprobs(scorer, [(p["prompt"], p["chosen"]) for p in PAIRS])
    rejected = continuation_logprobs(scorer, [(p["prompt"], p["rejected"]) for p in PAIRS])
    got = [row["mean"] for row in _table(tmp_path / "o")]
    assert got == pytest.approx([c - r for c, r in zip(chosen, rejected, strict=True)], abs=1e-5)
    assert all(row["std"] == 0.0 for row in _table(tmp_path / "o"))


def test_cli_bad_input_is_reported_at_once(
    scorers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good, typed = PAIRS[0], {**PAIRS[1], "chosen": 3}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(typed) + "\nnot json\n")
    out = tmp_path / "out"
    argv = [
        "prefs",
        "strength",
        str(bad),
        str(out),
        "-m",
        str(scorers["rm1"]),
        str(tmp_path / "nope"),
    ]
    argv += ["--band", "-1", "--mislabelled", "flp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and f"{bad}:3" in err  # every bad line, by file and line
    assert "nope" in err and "--band" in err
    assert "'flp'" in err and "flip" in err  # did-you-mean
    assert "--filter" in err  # --mislabelled without --filter
    assert not out.exists()
    text = _write(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "answer": 0}])
    assert main(["prefs", "strength", str(text), str(out), "-m", str(scorers["rm1"])]) == 2
    assert "choice data" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("x")
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["prefs", "strength", str(data), str(out), "-m", str(scorers["rm1"])]) == 2
    assert (out / "keep.txt").read_text() == "x"  # never overwritten without --force


def test_unscored_entries_are_left_out() -> None:
    nan = float("nan")
    d = torch.tensor([[2.0, nan, 1.0], [4.0, -1.0, nan], [nan, -3.0, 3.0]])
    result = strength(d)
    assert result.mean.tolist() == pytest.approx([3.0, -2.0, 2.0])
    assert result.std.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2), math.sqrt(2)])
    assert result.flags == ("clean", "mislabelled", "clean")
    with pytest.raises(ValueError, match="all NaN"):
        strength(torch.tensor([[nan, 1.0]]))
    assert standardize(torch.tensor([[1.0, nan, 3.0]]))[0, 2] == pytest.approx(3 / math.sqrt(2))


def test_holdout_assignment_is_exact_balanced_and_seeded() -> None:
    from alloy.prefs.strength import holdout_assignment

    mask = holdout_assignment(101, 4, 2, seed=5)
    assert mask.shape == (4, 101)
    assert (mask.sum(dim=0) == 2).all()  # every pair held out by exactly two models
    shares = mask.sum(dim=1)
    assert int(shares.max() - shares.min()) <= 1 and int(shares.sum()) == 202
    assert torch.equal(mask, holdout_assignment(101, 4, 2, seed=5))
    assert not torch.equal(mask, holdout_assignment(101, 4, 2, seed=6))
    with pytest.raises(ValueError, match="held"):
        holdout_assignment(10, 3, 3)
