"""Router initialisation goldens, one per gate mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alloy.moe.routers import (
    directions,
    mean_embeddings,
    mean_router_inputs,
    prompted_routers,
    random_routers,
    similar_experts,
)


def test_directions_by_hand() -> None:
    positive = torch.tensor([[4.0, 4.0], [1.0, 1.0]])
    negative = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # (3, 4) / 5, and a zero difference stays zero instead of dividing by 0
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0]])
    torch.testing.assert_close(directions(positive, negative), expected)
    assert directions(torch.tensor([0.0, -2.0]), None).tolist() == [0.0, -1.0]


def test_prompt_free_modes() -> None:
    shape = (3, 4, 64)
    random = random_routers(shape, "random", seed=5)
    assert torch.equal(random, torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(random, random_routers(shape, "random", seed=5))
    assert not torch.equal(random, random_routers(shape, "random", seed=6))
    assert 0.9 < float(random.std()) < 1.1  # mergekit's standard normal
    uniform_random = random_routers(shape, "uniform_random", seed=5)
    bound = 1 / math.sqrt(64)  # torch.nn.Linear's default: U(-1/sqrt(H), 1/sqrt(H))
    assert float(uniform_random.abs().max()) <= bound
    assert float(uniform_random.abs().max()) > 0.9 * bound
    assert abs(float(uniform_random.std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.equal(random_routers(shape, "uniform", seed=5), torch.zeros(shape))
    with pytest.raises(ValueError, match="needs prompts"):
        random_routers(shape, "hidden", seed=0)


def test_mean_embeddings_by_hand() -> None:
    embed = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    # token 0 is the start token of every prompt and is skipped
    ids = [[0, 1, 1], [0, 3]]
    torch.testing.assert_close(mean_embeddings(embed, ids, skip=1), torch.tensor([5 / 3, 1.0]))


def test_cheap_embed_golden(dense: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from alloy.io import Checkpoint

    base = dense["llama"] / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    with Checkpoint.open(base) as checkpoint:
        embed = checkpoint.read("model.embed_tokens.weight").float()
    routers = prompted_routers(base, [(["ab"], []), (["c"], ["ab"])], "cheap_embed", 2)
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in "abc")
    first = (embed[a] + embed[b]) / 2
    second = embed[c] - first
    expected = torch.stack([first / first.norm(), second / second.norm()])
    assert routers.shape == (2, 2, 32)
    for layer in range(2):  # the same in every layer
        torch.testing.assert_close(routers[layer], expected)


def test_hidden_is_the_mean_router_input(dense: dict[str, Path]) -> None:
    """Golden from a second path: the MLP's own input, caught by a pre-hook on the MLP."""
    from transformers import AutoModelForCausalLM

    base = dense["qwen3"] / "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = [[1, 40, 41, 42, 43], [1, 50, 51]]  # start token 1, then the prompt
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: seen[i].append(args[0][0, 1:].detach().clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for seq in ids:
            model(torch.tensor([seq]))
    for handle in handles:
        handle.remove()
    expected = torch.stack([torch.cat(seen[i]).mean(0) for i in range(2)])
    torch.testing.assert_close(mean_router_inputs(model, ids, skip=1), expected)


def test_hidden_routers_separate_prompts(dense: dict[str, Path]) -> None:
    base = dense["llama"] / "base"
    texts = ["hello there, friend", "3.14159 * 2 = 6.28"]
    routers = prompted_routers(base, [([texts[0]], []), ([texts[1]], [])], "hidden", 2)
    assert routers.shape == (2, 2, 32)
    torch.testing.assert_close(routers.norm(dim=-1), torch.ones(2, 2))
    assert similar_experts(routers) == []
    assert similar_experts(torch.stack([routers[:, 0], routers[:, 0]], 1)) == [(0, 0, 1), (1, 0, 1)]
