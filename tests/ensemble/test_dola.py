"""DoLa: the rule against hand-derived values, decoding and scoring against a reference that
recomputes every step from `output_hidden_states` without a cache, the layer buckets, the
repetition penalty and the recipe / CLI checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alloy import Ensemble
from alloy.cli.main import main
from alloy.ensemble.filters import repetition_penalty
from alloy.ensemble.layers import candidate_layers, parse_layers
from alloy.ensemble.recipe import load_ensemble_recipe
from alloy.ensemble.rules import dola, layer_divergences, premature_layers
from alloy.errors import InputError, RecipeError
from alloy.lab.tiny import build_tiny, tiny_tokenizer

PROMPTS = ["Hello there", "a", "The quick brown fox jumps over"]


def probs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()


def test_dola_picks_the_farthest_layer_and_contrasts_it_by_hand() -> None:
    # final [.7 .2 .1]; candidate a [.6 .3 .1] is close, b [.1 .2 .7] far: b is contrasted.
    scores = torch.stack([probs([0.7, 0.2, 0.1]), probs([0.6, 0.3, 0.1]), probs([0.1, 0.2, 0.7])])
    assert premature_layers(scores).tolist() == [1]  # index into the candidates: b
    # log q_N - log q_b = [log 7, 0, -log 7] -> softmax [49, 7, 1] / 57
    out = dola(scores, alpha=0.1, beta=1.0).exp()
    assert torch.allclose(out, torch.tensor([[49 / 57, 7 / 57, 1 / 57]]), atol=1e-6)
    # alpha 0.2: token 3 (0.1 < 0.2 * 0.7) leaves the head -> [7, 1] / 8
    out = dola(scores, alpha=0.2, beta=1.0).exp()
    assert torch.allclose(out, torch.tensor([[7 / 8, 1 / 8, 0.0]]), atol=1e-6)
    # beta 0: the final layer alone, on its head
    out = dola(scores, alpha=0.01, beta=0.0).exp()
    assert torch.allclose(out, torch.tensor([[0.7, 0.2, 0.1]]), atol=1e-6)


def test_the_premature_layer_is_chosen_per_row() -> None:
    final = probs([0.7, 0.2, 0.1], [0.1, 0.2, 0.7])
    near_row0 = probs([0.6, 0.3, 0.1], [0.7, 0.2, 0.1])  # close to row 0, far from row 1
    near_row1 = probs([0.1, 0.2, 0.7], [0.1, 0.3, 0.6])
    chosen = premature_layers(torch.stack([final, near_row0, near_row1]))
    assert chosen.tolist() == [1, 0]
    # JSD([.7 .2 .1], [.1 .2 .7]): m = [.4 .2 .4] and both KL terms are equal by symmetry,
    # so JSD = .7 log(.7/.4) + .1 log(.1/.4); row 1 against near_row0 is the same pair.
    divergences = layer_divergences(torch.stack([final, near_row0, near_row1]))
    by_hand = 0.7 * math.log(0.7 / 0.4) + 0.1 * math.log(0.1 / 0.4)
    assert float(divergences[1, 0]) == pytest.approx(by_hand, abs=1e-6)
    assert float(divergences[0, 1]) == pytest.approx(by_hand, abs=1e-6)
    same = layer_divergences(torch.stack([final, final]))
    assert torch.allclose(same, torch.zeros(1, 2), atol=1e-7)


def test_repetition_penalty_by_hand() -> None:
    logprobs = probs([0.5, 0.3, 0.2])
    seen = torch.tensor([[True, False, False]])
    # log .5 * 2 = log .25 -> [.25, .3, .2] / .75
    out = repetition_penalty(logprobs, seen, 2.0).exp()
    assert torch.allclose(out, torch.tensor([[1 / 3, 0.4, 0.2 / 0.75]]), atol=1e-6)


@pytest.mark.parametrize(
    ("value", "layers", "tied", "expected"),
    [
        ("low", 32, False, tuple(range(0, 16, 2))),
        ("low", 32, True, tuple(range(2, 16, 2))),
        ("high", 32, False, tuple(range(16, 32, 2))),
        ("low", 48, False, tuple(range(0, 20, 2))),
        ("high", 48, True, tuple(range(28, 48, 2))),
        ("low", 4, True, (2,)),
        ("low", 2, True, (1,)),
        ((4, 0, 4), 8, False, (0, 4)),
    ],
)
def test_candidate_layers(
    value: str | tuple[int, ...], layers: int, tied: bool, expected: tuple[int, ...]
) -> None:
    assert candidate_layers(value, layers, tied) == expected


def test_layer_lists_parse_and_are_range_checked() -> None:
    assert parse_layers("0, 4,8") == (0, 4, 8)
    assert parse_layers([1, 2]) == (1, 2)
    assert parse_layers("high") == "high"
    for bad in ("middle", "1,x", ""):
        with pytest.raises(ValueError):
            parse_layers(bad)
    with pytest.raises(InputError, match="out of range"):
        candidate_layers((0, 9), 4, False)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny llama with lively weights (untied), so exits 0..3 all differ."""
    root = tmp_path_factory.mktemp("dola")
    return build_tiny("llama", root / "m", seed=11, noise=0.5, layers=4, vocab_size=102)


def reference_step(
    model: torch.nn.Module,
    ids: list[int],
    layers: list[int],
    alpha: float,
    seen: set[int],
    penalty: float,
) -> int:
    """DoLa's next token without a cache: one full forward over `ids`, every exit through the
    final norm and head, JSD by torch's kl_div, the plausibility head, the penalty."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    final = torch.log_softmax(out.logits[0, -1, :102].float(), dim=-1)
    exits = [
        torch.log_softmax(model.lm_head(model.model.norm(out.hidden_states[j][0, -1]))[:102], -1)
        for j in layers
    ]

    def jsd(a: torch.Tensor, b: torch.Tensor) -> float:
        m = torch.log((a.exp() + b.exp()) / 2)
        kl = torch.nn.functional.kl_div
        return float(
            0.5 * kl(m, a, log_target=True, reduction="sum")
            + 0.5 * kl(m, b, log_target=True, reduction="sum")
        )

    divergences = [jsd(final, e) for e in exits]
    early = exits[divergences.index(max(divergences))]
    keep = final >= final.max() + math.log(alpha)
    score = torch.where(keep, final - early, torch.tensor(float("-inf")))
    score = torch.log_softmax(score, dim=-1)
    for token in seen:
        score[token] = score[token] * penalty
    return int(score.argmax())


@pytest.mark.parametrize(("penalty", "alpha"), [(1.0, 0.1), (1.3, 0.05)])
def test_dola_decoding_equals_a_no_cache_reference(
    deep: Path, penalty: float, alpha: float
) -> None:
    ensemble = Ensemble.from_recipe(
        {
            "rule": "dola",
            "members": [{"model": str(deep)}],
            "layers": [0, 1, 2, 3],
            "parameters": {"alpha": alpha},
        }
    )
    ours = ensemble.generate(
        PROMPTS, max_new_tokens=12, repetition_penalty=penalty, ignore_eos=True
    )
    model = ensemble.members[0].model
    with torch.inference_mode():
        for prompt, generation in zip(PROMPTS, ours, strict=True):
            ids = ensemble.members[0].encode_prompt(prompt)
            seen = set(ids) if penalty != 1.0 else set()
            expected = []
            for _ in range(12):
                token = reference_step(model, ids, [0, 1, 2, 3], alpha, seen, penalty)
                expected.append(token)
                ids = [*ids, token]
                if penalty != 1.0:
                    seen.add(token)
            assert generation.token_ids == expected
    assert len({t for g in ours for t in g.token_ids}) > 4


def test_dola_without_contrast_is_plain_greedy(deep: Path) -> None:
    plain = Ensemble.from_models([deep], rule="linear").generate(PROMPTS, max_new_tokens=16)
    off = Ensemble.from_recipe(
        {"rule": "dola", "members": [{"model": str(deep)}], "parameters": {"beta": 0.0}}
    ).generate(PROMPTS, max_new_tokens=16)
    assert [g.token_ids for g in off] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in off] == [g.finish_reason for g in plain]


def test_dola_scoring_equals_the_reference_at_every_position(deep: Path) -> None:
    ensemble = Ensemble.from_recipe(
        {"rule": "dola", "members": [{"model": str(deep)}], "layers": "0,2"}
    )
    tokenizer = tiny_tokenizer()
    rows = [[1, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in PROMPTS[::2]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    scored = ensemble.token_logprobs(ids, mask)
    model = ensemble.members[0].model
    with torch.inference_mode():
        for b, row in enumerate(rows):
            out = model(torch.tensor([row]), output_hidden_states=True)
            for t in range(1, len(row)):
                final = torch.log_softmax(out.logits[0, t - 1, :102], -1)
                exits = torch.stack(
                    [
                        torch.log_softmax(
                            model.lm_head(model.model.norm(out.hidden_states[j][0, t - 1]))[:102],
                            -1,
                        )
                        for j in (0, 2)
                    ]
                )
                expected = dola(torch.cat([final[None], exits])[:, None], alpha=0.1, beta=1.0)
                assert float(scored[b, t]) == pytest.approx(float(expected[0, row[t]]), abs=1e-4)


def test_dola_recipes_report_every_problem(deep: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_ensemble_recipe(
            {
                "rule": "dola",
                "layers": [0, 7],
                "members": [
                    {"model": str(deep), "weight": 0.5, "filters": {"top_k": 5}},
                    {"model": str(deep), "role": "base"},
                ],
            }
        )
    text = str(caught.value)
    for needle in (
        "members.0.weight",
        "members.0.filters",
        "members.1.role",
        "one model",
        "[7] out of range",
    ):
        assert needle in text
    with pytest.raises(RecipeError, match="does not contrast layers"):
        load_ensemble_recipe({"rule": "linear", "layers": "low", "members": [{"model": str(deep)}]})
    with pytest.raises(RecipeError, match="neither low, high"):
        load_ensemble_recipe(
            {"rule": "dola", "layers": "middle", "members": [{"model": str(deep)}]}
        )


def test_generate_cli_dola(deep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.jsonl"
    args = [
        "generate",
        str(deep),
        "-p",
        "Hello",
        "--max-new-tokens",
        "6",
        "--rule",
        "dola",
        "--layers",
        "low",
        "--repetition-penalty",
        "1.2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert '"tokens": 6' in out.read_text() or '"finish_reason": "eos"' in out.read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"rule: linear\nmembers: [{{model: {deep}}}]\n")
    assert main(["generate", str(recipe), "-p", "x", "--rule", "dola"]) == 2
    assert main(["generate", str(deep), "-p", "x", "--layers", "low"]) == 2
    assert main(["generate", str(deep), "-p", "x", "--rule", "contrastive"]) == 2
    assert main(["generate", str(deep), "-p", "x", "--rule", "dola", "--layers", "0,9"]) == 2
    err = capsys.readouterr().err
    assert "only with a model folder" in err and "only with --rule dola" in err
    assert "needs members expert, amateur" in err and "out of range" in err


def test_eval_scores_a_dola_recipe(deep: Path, tmp_path: Path) -> None:
    import json

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man.\n" * 2)
    results = {}
    for name, recipe in (
        ("plain", f"rule: linear\nmembers: [{{model: {deep}}}]\n"),
        ("dola", f"rule: dola\nlayers: [0, 2]\nmembers: [{{model: {deep}}}]\n"),
        ("open", f"rule: dola\nparameters: {{alpha: 0}}\nmembers: [{{model: {deep}}}]\n"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe)
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(path), "--data", str(text), "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    scores = {k: next(iter(v["results"].values())) for k, v in results.items()}
    perplexity = {k: next(iter(v.values()))["perplexity"] for k, v in scores.items()}
    # the plausibility head gives -inf to some text tokens; alpha 0 scores every token
    assert perplexity["dola"] == float("inf")
    assert math.isfinite(perplexity["open"]) and perplexity["open"] != perplexity["plain"]
