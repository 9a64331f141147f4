"""Evaluation: window coverage, parity with transformers' loss, hand-made goldens for accuracy."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.cli.main import main
from alloy.errors import InputError
from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
from alloy.eval.choice import choice_accuracy, preference_accuracy
from alloy.eval.data import Choice, Preference
from alloy.eval.perplexity import score_text, windows
from alloy.lab.tiny import tiny_reward_model, tiny_tokenizer

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed."
)


def test_windows_golden() -> None:
    """n=10, window=4, stride=2: windows start at 0,2,4,6; each scores what the last did not.

    Scored ranges [1,4) [4,6) [6,8) [8,10) cover tokens 1..9 exactly once; token 0 (BOS) is
    context only.
    """
    got = [(w.begin, w.end, w.first) for w in windows(10, 4, 2)]
    assert got == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # stride == window: consecutive windows share one token, the context of the next's first
    assert [(w.begin, w.end, w.first) for w in windows(10, 4, 4)] == [
        (0, 4, 1),
        (3, 7, 4),
        (6, 10, 7),
    ]
    assert windows(1, 4, 2) == []  # BOS alone: nothing to score
    with pytest.raises(ValueError):
        windows(10, 4, 5)


@pytest.mark.parametrize(("n", "window", "stride"), [(37, 8, 3), (64, 16, 16), (5, 16, 8)])
def test_windows_cover_every_token_once(n: int, window: int, stride: int) -> None:
    scored = [t for w in windows(n, window, stride) for t in range(w.first, w.end)]
    assert scored == list(range(1, n))
    for w in windows(n, window, stride):
        assert w.end - w.begin <= window
        assert w.begin == 0 or w.first - w.begin >= window - stride


@pytest.mark.parametrize(("window", "stride", "batch"), [(16, 8, 3), (16, 16, 1), (128, 64, 8)])
def test_perplexity_equals_transformers_loss(
    tiny_root: Path, window: int, stride: int, batch: int
) -> None:
    """Sum over windows of HF's mean loss x scored tokens, with unscored labels set to -100."""
    scorer = load_scorer(tiny_root / "llama")
    docs = [TEXT, TEXT[:50], "x"]
    got = score_text(scorer, docs, window=window, stride=stride, batch_size=batch)

    model, tok = scorer.model, scorer.tokenizer
    nll, tokens = 0.0, 0
    for doc in docs:
        ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
        for w in windows(len(ids), window, stride):
            x = torch.tensor([ids[w.begin : w.end]])
            labels = x.clone()
            labels[0, : w.first - w.begin] = -100
            with torch.no_grad():
                loss = model(input_ids=x, labels=labels).loss
            nll += float(loss) * (w.end - w.first)
            tokens += w.end - w.first
    assert got.tokens == tokens == sum(len(d) for d in docs)  # char tokenizer: 1 token per char
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got.bytes == sum(len(d.encode()) for d in docs)


@dataclass
class RuleScorer:
    """A hand-made 'model' over the tiny char tokenizer: vowels cost 0 nats, anything else 1."""

    name: str = "rule"
    max_length: int = 64

    def __post_init__(self) -> None:
        self.tokenizer: Any = tiny_tokenizer()

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vowels = set(self.tokenizer.convert_tokens_to_ids(list("aeiou")))
        out = torch.tensor([[0.0 if int(t) in vowels else -1.0 for t in row] for row in input_ids])
        out[:, 0] = 0.0
        return out


def test_bits_per_byte_golden() -> None:
    """'ab\u00e9': tokens a,b,<unk for é>; nll = 0 + 1 + 1 = 2 nats over 4 UTF-8 bytes."""
    score = score_text(RuleScorer(), ["ab\u00e9"], window=8)
    assert score.tokens == 3
    assert score.nll == pytest.approx(2.0)
    assert score.bytes == 4
    assert score.bits_per_byte == pytest.approx(2.0 / math.log(2) / 4)
    assert score.perplexity == pytest.approx(math.exp(2 / 3))


def test_max_tokens_cuts_at_token_budget() -> None:
    score = score_text(RuleScorer(), ["abcdef", "ghij"], window=8, max_tokens=8)
    assert score.tokens == 8 and score.documents == 2 and score.bytes == 8


def test_choice_accuracy_golden() -> None:
    """Choice score = -(consonants). Item 1: 'xyz'=-3 < 'aa'=0 -> picks 1 (right).

    Item 2: raw 'bb'=-2 beats 'aaaabbb'=-3, but per byte -1 < -3/7, so only the normalised
    rule picks the answer (index 1). accuracy = 1/2, accuracy_norm = 2/2.
    """
    items = [Choice("q", ("xyz", "aa"), 1), Choice("q", ("bb", "aaaabbb"), 1)]
    got = choice_accuracy(RuleScorer(), items, batch_size=3)
    assert got == {"accuracy": 0.5, "accuracy_norm": 1.0, "chance": 0.5, "items": 2}


def test_preference_accuracy_golden() -> None:
    """chosen 'aa' (0) beats 'bb' (-2); 'ab' vs 'ba' tie -> 0.5; 'zz' loses to 'e'."""
    items = [Preference("p", "aa", "bb"), Preference("p", "ab", "ba"), Preference("p", "zz", "e")]
    got = preference_accuracy(RuleScorer(), items)
    assert got["accuracy"] == pytest.approx(1.5 / 3)


def test_reward_model_preference_and_padding(tmp_path: Path) -> None:
    tiny_reward_model(seed=0).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    scorer = load_scorer(tmp_path)
    assert scorer.is_reward_model
    items = [Preference("Q: 2+2?", " 4", " five hundred"), Preference("hi", " yes", " no")]
    got = preference_accuracy(scorer, items, batch_size=4)
    expected = 0.0
    for item in items:
        r = []
        for text in (item.prompt + item.chosen, item.prompt + item.rejected):
            # alloy train's reward layout: [BOS] text [EOS] (pad 0 is not EOS, so the reward
            # is read at the EOS), each row alone, unpadded.
            tokens = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
            bos, eos = scorer.tokenizer.bos_token_id, scorer.tokenizer.eos_token_id
            ids = torch.tensor([[bos, *tokens, eos]])
            with torch.no_grad():
                r.append(float(scorer.model(input_ids=ids).logits[0, 0]))
        expected += 1.0 if r[0] > r[1] else 0.0
    assert got["accuracy"] == expected / 2


def test_data_problems_reported_together(tmp_path: Path) -> None:
    bad = tmp_path / "mc.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps({"context": "a", "choices": ["x", "y"], "answer": 1}),
                json.dumps({"context": "a", "choices": ["x"], "answer": 0}),
                "{not json",
                json.dumps({"context": "a", "choices": ["x", "y"], "answer": "z"}),
            ]
        )
    )
    with pytest.raises(InputError) as info:
        load_eval_sets([bad, tmp_path / "missing.txt"])
    text = str(info.value)
    for fragment in ("mc.jsonl:2", "mc.jsonl:3", "mc.jsonl:4", "missing.txt"):
        assert fragment in text


def test_cli_eval_writes_json(tiny_root: Path, tmp_path: Path) -> None:
    (tmp_path / "prose.txt").write_text(TEXT)
    (tmp_path / "mc.jsonl").write_text(
        json.dumps({"context": "Q", "choices": [" a", " b"], "answer": " b"}) + "\n"
    )
    (tmp_path / "pref.jsonl").write_text(
        json.dumps({"prompt": "P", "chosen": " x", "rejected": " y"}) + "\n"
    )
    out = tmp_path / "r.json"
    code = main(
        [
            "eval",
            str(tiny_root / "llama"),
            str(tiny_root / "gpt2"),
            "--data",
            str(tmp_path),
            "--window",
            "32",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())["results"]
    llama = results[str(tiny_root / "llama")]
    assert set(llama) == {f"{tmp_path.name}/prose", f"{tmp_path.name}/mc", f"{tmp_path.name}/pref"}
    assert llama[f"{tmp_path.name}/prose"]["tokens"] == len(TEXT)
    assert 0 <= llama[f"{tmp_path.name}/mc"]["accuracy"] <= 1


def test_cli_eval_bad_input_exit_2(tiny_root: Path, tmp_path: Path) -> None:
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", str(tiny_root / "llama"), "--data", str(tmp_path), "--stride", "0"]) == 2


def test_evaluate_overall_pools_text_sets(tiny_root: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[::-1])
    scorer = load_scorer(tiny_root / "llama")
    results = evaluate(scorer, load_eval_sets([tmp_path]), EvalSettings(window=32))
    a, b, overall = (results[k] for k in (f"{tmp_path.name}/a", f"{tmp_path.name}/b", "overall"))
    assert overall["nll"] == pytest.approx(a["nll"] + b["nll"])
    assert overall["tokens"] == a["tokens"] + b["tokens"]
