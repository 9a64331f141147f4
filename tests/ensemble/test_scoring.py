"""An ensemble as an eval Scorer: the same numbers as its members where they must agree."""

from __future__ import annotations

from pathlib import Path

import torch

from alloy import Ensemble
from alloy.eval import load_scorer
from alloy.eval.perplexity import score_text

TEXTS = ["It was the best of times, it was the worst of times.", "To be, or not to be: that."]


def batch(scorer: object) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = scorer.tokenizer  # type: ignore[attr-defined]
    rows = [[1] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_one_member_ensemble_scores_like_the_model(lively: dict[str, Path]) -> None:
    model = load_scorer(lively["a"])
    ensemble = Ensemble.from_models([lively["a"]], rule="linear")
    ids, mask = batch(model)
    got, want = ensemble.token_logprobs(ids, mask), model.token_logprobs(ids, mask)
    torch.testing.assert_close(got * mask, want * mask, atol=1e-5, rtol=0)
    a = score_text(ensemble, TEXTS, window=16, stride=8)
    b = score_text(model, TEXTS, window=16, stride=8)
    assert a.tokens == b.tokens and abs(a.nll - b.nll) < 1e-3


def test_linear_ensemble_scores_the_mixture(lively: dict[str, Path]) -> None:
    """log p = log(0.3 p_a + 0.7 p_b) at every scored token, from the members' own scores."""
    a, b = load_scorer(lively["a"]), load_scorer(lively["b"])
    ensemble = Ensemble.from_models([lively["a"], lively["b"]], rule="linear", weights=[0.3, 0.7])
    ids, mask = batch(a)
    want = torch.log(
        0.3 * a.token_logprobs(ids, mask).exp() + 0.7 * b.token_logprobs(ids, mask).exp()
    )
    torch.testing.assert_close(
        ensemble.token_logprobs(ids, mask) * mask, want * mask, atol=1e-5, rtol=0
    )


def test_log_linear_scoring_matches_decoding_distribution(lively: dict[str, Path]) -> None:
    """Scoring position t applies the same combine() the decoder applies after prefix ids[:t]."""
    ensemble = Ensemble.from_models(
        [lively["a"], lively["b"]], rule="log_linear", weights=[1.5, -0.5]
    )
    ids, mask = batch(ensemble)
    scored = ensemble.token_logprobs(ids, mask)
    row, t = 0, 9
    prefix = ids[row : row + 1, :t]
    with torch.inference_mode():
        scores = [
            torch.log_softmax(m.model(input_ids=prefix).logits[:, -1, : m.vocab].float(), -1)
            for m in ensemble.members
        ]
    expected = ensemble.combine(scores)[0, ids[row, t]]
    assert abs(float(scored[row, t]) - float(expected)) < 1e-5
