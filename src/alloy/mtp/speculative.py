"""Self-speculative greedy decoding with multi-token heads (Gloeckle et al. 2024, section 3.2;
the blockwise parallel decoding of Stern et al. 2018, https://arxiv.org/abs/1811.03115).

Every step, with the committed text x_1..x_m in the KV cache and the model's next token y known:

    block = [y, d_1, .., d_n]       d_i: head i's argmax at the last committed position
    g = argmax model(block)         one forward over the block, through the cache  # (n + 1,)
    a = longest prefix with d_j == g_{j-1} (j = 1..a)
    commit y, d_1..d_a; the next y is g_a; crop the caches back to m + 1 + a positions

The committed tokens are exactly the model's greedy tokens: y is the model's argmax, and d_j is
kept only where it equals the model's argmax after the tokens before it, which are themselves
the model's greedy tokens. The model's forward runs once per step instead of once per token;
each step adds 1 + a tokens (a = accepted drafts). The heads (one decoder layer each) run over
the block too, through their own KV caches, laid out as the model's and cropped with it.

One prompt at a time (batch 1): rows of a batch accept different numbers of drafts, and keeping
them in one cache would need per-row cache lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alloy.mtp.heads import MTPHeads, TrunkCapture, unembed

FinishReason = Literal["eos", "length"]


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens (an EOS that ended it included)
    finish_reason: FinishReason
    forwards: int  # forward passes of the model, the prompt's included
    accepted: list[int] = field(default_factory=list)  # drafts accepted at each verify step
    drafts: list[list[int]] = field(default_factory=list)  # the heads' drafts, step by step

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.forwards)


def accepted_prefix(drafts: list[int], predicted: list[int]) -> int:
    """How many drafts the model agrees with: the largest a with drafts[j] == predicted[j] for
    every j < a (predicted[j]: the model's argmax after the block's token j, which is the token
    before drafts[j])."""
    a = 0
    while a < len(drafts) and a < len(predicted) and drafts[a] == predicted[a]:
        a += 1
    return a


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _finished(tokens: list[int], eos: set[int], max_new_tokens: int) -> FinishReason | None:
    if tokens and tokens[-1] in eos:
        return "eos"
    return "length" if len(tokens) >= max_new_tokens else None


@torch.inference_mode()
def greedy(model: Any, prompt: list[int], *, max_new_tokens: int, eos: set[int]) -> Decoded:
    """Plain greedy decoding through a KV cache, one token per forward (the baseline)."""
    device = next(model.parameters()).device
    cache = _new_cache(model)
    ids = torch.tensor([prompt], device=device)
    tokens: list[int] = []
    forwards = 0
    while True:
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        forwards += 1
        tokens.append(int(logits[0, -1].argmax()))
        reason = _finished(tokens, eos, max_new_tokens)
        if reason is not None:
            return Decoded(tokens, reason, forwards)
        ids = torch.tensor([[tokens[-1]]], device=device)


def _drafts(
    model: Any, heads: MTPHeads, capture: TrunkCapture, caches: list[Any], keep: int
) -> list[int]:
    """Run every head over the block the model just read (its trunk states are in `capture`),
    keep the first `keep` positions in the heads' caches, and return each head's argmax at
    position keep - 1."""
    assert capture.hidden is not None
    states = capture.hidden  # (1, q, H)
    extra = states.shape[1] - keep
    drafts = []
    for i, cache in enumerate(caches):
        hidden = heads.hidden(i, states, capture.layer_kwargs, cache=cache)  # (1, q, H)
        drafts.append(int(unembed(model, hidden[0, keep - 1]).argmax()))
        if extra:
            cache.crop(-extra)
    return drafts


@torch.inference_mode()
def speculative_greedy(
    model: Any,
    heads: MTPHeads,
    prompt: list[int],
    *,
    max_new_tokens: int,
    eos: set[int],
    draft: int | None = None,
) -> Decoded:
    """Greedy decoding of `model` drafted by `heads` (see the module docstring): the same tokens
    as `greedy`, in fewer forward passes of the model.

    Args:
        prompt: token ids (one prompt).
        draft: heads to draft with (the first `draft`; default all).
    """
    device = next(model.parameters()).device
    n = len(heads) if draft is None else max(1, min(draft, len(heads)))
    cache = _new_cache(model)
    head_caches = [_new_cache(model) for _ in range(n)]
    capture = TrunkCapture(model)
    ids = torch.tensor([prompt], device=device)
    with capture:
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    forwards = 1  # the prompt's
    y = int(logits[0, -1].argmax())
    drafts = _drafts(model, heads, capture, head_caches, keep=len(prompt))
    result = Decoded([], "length", forwards)
    tokens = result.tokens
    while True:
        tokens.append(y)
        reason = _finished(tokens, eos, max_new_tokens)
        if reason is not None:
            result.finish_reason = reason
            return result
        block = [y, *drafts[: max_new_tokens - len(tokens)]]
        result.drafts.append(block[1:])
        with capture:
            block_ids = torch.tensor([block], device=device)
            logits = model(input_ids=block_ids, cache=cache, use_cache=True).logits
        result.forwards += 1
        predicted = logits[0].argmax(-1).tolist()  # (len(block),) the model's token after each
        a = accepted_prefix(block[1:], predicted)
        result.accepted.append(a)
        for token in block[1 : 1 + a]:
            tokens.append(token)
            reason = _finished(tokens, eos, max_new_tokens)
            if reason is not None:
                result.finish_reason = reason
                return result
        if len(block) > a + 1:
            cache.crop(-(len(block) - a - 1))
        drafts = _drafts(model, heads, capture, head_caches, keep=a + 1)
        y = predicted[a]


def acceptance(
    model: Any,
    heads: MTPHeads,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos: set[int],
    draft: int | None = None,
) -> dict[str, Any]:
    """Plain greedy against speculative greedy decoding of every prompt: how many outputs are
    identical (all of them, unless something is wrong), drafts accepted per verify step and
    tokens per model forward."""
    accepted, steps, tokens, forwards, exact = 0, 0, 0, 0, 0
    for prompt in prompts:
        plain = greedy(model, prompt, max_new_tokens=max_new_tokens, eos=eos)
        fast = speculative_greedy(
            model, heads, prompt, max_new_tokens=max_new_tokens, eos=eos, draft=draft
        )
        exact += fast.tokens == plain.tokens
        accepted += sum(fast.accepted)
        steps += len(fast.accepted)
        tokens += len(fast.tokens)
        forwards += fast.forwards
    return {
        "draft": len(heads) if draft is None else draft,
        "accepted_per_step": accepted / max(1, steps),
        "tokens_per_forward": tokens / max(1, forwards),
        "exact": exact,
        "prompts": len(prompts),
        "tokens": tokens,
    }
