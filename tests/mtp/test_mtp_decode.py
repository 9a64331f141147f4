"""Self-speculative greedy decoding: token for token the plain greedy output (transformers'
own `generate` as the reference), whatever the heads draft, at EOS and max_new_tokens edges;
and the heads' drafts, made through their cropped KV caches, equal the heads run over the whole
sequence at once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alloy.lab.tiny import tiny_model
from alloy.mtp.heads import MTPHeads, trunk, unembed
from alloy.mtp.speculative import acceptance, accepted_prefix, greedy, speculative_greedy

PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23, 24, 25, 26, 27], [1]]


def test_accepted_prefix_golden() -> None:
    assert accepted_prefix([4, 5, 6], [4, 5, 9, 7]) == 2
    assert accepted_prefix([4, 5, 6], [3, 5, 6, 7]) == 0  # a later match does not count
    assert accepted_prefix([4, 5], [4, 5, 8]) == 2
    assert accepted_prefix([], [8]) == 0


@pytest.fixture(scope="module")
def model() -> Any:
    # noise 0.5: greedy output that varies with context (not one repeated token)
    return tiny_model("llama", seed=3, noise=0.5, num_hidden_layers=3).eval()


def _heads(model: Any, noise: float, seed: int = 0) -> MTPHeads:
    heads = MTPHeads.from_model(model, 3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return heads.eval()


def _reference(model: Any, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_speculative_equals_plain_greedy(model: Any, noise: float) -> None:
    heads = _heads(model, noise)
    for prompt in PROMPTS:
        reference = _reference(model, prompt, 24, None)
        assert greedy(model, prompt, max_new_tokens=24, eos=set()).tokens == reference
        decoded = speculative_greedy(model, heads, prompt, max_new_tokens=24, eos=set())
        assert decoded.tokens == reference
        assert decoded.finish_reason == "length"
        one = speculative_greedy(model, heads, prompt, max_new_tokens=24, eos=set(), draft=1)
        assert one.tokens == reference and all(len(d) <= 1 for d in one.drafts)
        assert decoded.forwards == 1 + len(decoded.accepted)
        # each forward adds the model's token and the step's accepted drafts (the last step's
        # may be cut by max_new_tokens)
        assert len(decoded.tokens) <= decoded.forwards + sum(decoded.accepted)


def test_heads_that_are_right_are_accepted() -> None:
    """Fresh heads are copies of the next-token head, so each drafts the model's next token y
    at every shift. A noise-free tiny model settles on one repeated token after 4 tokens; from
    then on every draft (y, y, y) is right and every step accepts all 3."""
    flat = tiny_model("llama", seed=5, noise=0.0, num_hidden_layers=2).eval()
    heads = MTPHeads.from_model(flat, 3).eval()
    reference = _reference(flat, [1, 7], 20, None)
    assert len(set(reference[4:])) == 1  # the precondition: a constant tail
    decoded = speculative_greedy(flat, heads, [1, 7], max_new_tokens=20, eos=set())
    assert decoded.tokens == reference
    assert decoded.accepted[-3:] == [3, 3, 3]
    assert decoded.forwards < len(reference) / 2
    # the summary the experiment, the benchmark and the demo report, from the same decode
    summary = acceptance(flat, heads, [[1, 7]] * 2, max_new_tokens=20, eos=set(), draft=3)
    assert summary["exact"] == summary["prompts"] == 2 and summary["draft"] == 3
    assert summary["accepted_per_step"] == sum(decoded.accepted) / len(decoded.accepted)
    assert summary["tokens_per_forward"] == len(reference) / decoded.forwards


def test_eos_and_max_new_tokens_edges(model: Any) -> None:
    heads = _heads(model, 0.3, seed=1)
    prompt = PROMPTS[2]
    plain = _reference(model, prompt, 24, None)
    for limit in (1, 2, 3, 5, 7):
        decoded = speculative_greedy(model, heads, prompt, max_new_tokens=limit, eos=set())
        assert decoded.tokens == plain[:limit]
        assert decoded.finish_reason == "length"
    for position in (0, 3, len(plain) - 1):
        eos = plain[position]
        first = plain.index(eos)
        reference = _reference(model, prompt, 24, eos)
        assert reference == plain[: first + 1]
        decoded = speculative_greedy(model, heads, prompt, max_new_tokens=24, eos={eos})
        assert decoded.tokens == reference
        assert decoded.finish_reason == "eos"


def test_drafts_equal_heads_over_the_whole_sequence(model: Any) -> None:
    """Step s drafts at the last committed position p_s; running the trunk and heads over the
    final sequence in one pass (no cache) must give the same argmax there."""
    heads = _heads(model, 0.3, seed=2)
    prompt = PROMPTS[0]
    decoded = speculative_greedy(model, heads, prompt, max_new_tokens=30, eos=set())
    sequence = torch.tensor([prompt + decoded.tokens])
    with torch.no_grad():
        states, layer_kwargs = trunk(model, {"input_ids": sequence, "use_cache": False})
        argmax = [
            unembed(model, heads.hidden(i, states, layer_kwargs))[0].argmax(-1)
            for i in range(len(heads))
        ]
    committed = len(prompt)  # tokens in the cache before the first verify step
    for step, drafts in enumerate(decoded.drafts):
        position = committed - 1
        assert drafts == [int(argmax[i][position]) for i in range(len(drafts))], step
        committed += 1 + decoded.accepted[step]
