"""The decoding loop: K members, one KV cache each, one token per member per step.

Each step runs, in order, four named stages: every member's forward on the last token (logits of
the last position only), its *member filters*, the *rule* that combines the members, then the
*warpers* (temperature, top-k, top-p, min-p) and the pick (argmax, or a seeded sample). The only
host synchronisation per step is reading the B new token ids, which stopping needs anyway. When a
row stops (EOS, a stop string, or its token budget) it is removed from every member's cache, so
finished rows cost no more compute.

Shapes: K members, B rows still decoding, V shared vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alloy.ensemble.filters import apply_filters, repetition_penalty
from alloy.errors import NonFiniteError, Problem

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop (a recipe's `sampling`, or CLI flags)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float | None = None  # > 1 discourages tokens the row has seen

    def warpers(self) -> dict[str, float]:
        settings = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
        }
        return {k: v for k, v in settings.items() if v is not None}


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "length"

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
        }


def decode(
    ensemble: Any,
    prompts: Sequence[str],
    sampling: Sampling,
    on_token: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Continue every prompt under `ensemble` (an `alloy.Ensemble`); one batch, all prompts.

    `on_token(n)` is called after each step with the number of rows that took a token.
    """
    members = ensemble.members
    tokenizer = members[0].tokenizer
    device = ensemble.device
    eos = set() if sampling.ignore_eos else ensemble.eos_ids
    warpers = sampling.warpers()
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    if any(m.spec.samples > 1 for m in members):
        # Dropout masks come from torch's global RNG: seed it only when a member draws them.
        torch.manual_seed(sampling.seed)

    results = [Generation(p, "") for p in prompts]
    if not prompts or sampling.max_new_tokens <= 0:
        return results
    states, scores = [], []
    for member in members:
        first, state = member.prefill([member.encode_prompt(p) for p in prompts])
        if not bool(torch.isfinite(first).all()):
            # Broken weights give NaN from the first step on: say so instead of empty text.
            raise NonFiniteError(
                f"member {member.name!r}: its next-token scores hold NaN or infinity",
                [Problem(member.spec.model, "non-finite outputs", "are its weights finite?")],
            )
        states.append(state)
        scores.append(first)
    alive = list(range(len(prompts)))  # rows still decoding -> index into results
    penalty = sampling.repetition_penalty
    seen = None  # (B, V) True for tokens already in a row (its prompt included)
    if penalty is not None and penalty != 1.0:
        seen = torch.zeros((len(prompts), ensemble.vocab), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            ids = [i for i in members[0].encode_prompt(prompt) if i < ensemble.vocab]
            seen[row, torch.tensor(ids, dtype=torch.long)] = True
    for step in range(1, sampling.max_new_tokens + 1):
        logprobs = ensemble.combine(scores)  # (B, V)
        if seen is not None:
            logprobs = repetition_penalty(logprobs, seen, float(penalty or 1.0))
        if warpers:
            logprobs = apply_filters(logprobs, warpers)
        if sampling.do_sample:
            tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
        else:
            tokens = logprobs.argmax(dim=-1)  # (B,)
        picked = tokens.tolist()  # the one host sync per step
        if seen is not None:
            seen[torch.arange(len(picked), device=device), tokens.to(device)] = True
        finished = []
        for row, token in enumerate(picked):
            result = results[alive[row]]
            if token in eos:
                result.finish_reason = "eos"
                finished.append(row)
                continue
            result.token_ids.append(token)
            if sampling.stop and _hit_stop(result, tokenizer, sampling.stop):
                result.finish_reason = "stop"
                finished.append(row)
        if on_token is not None:
            on_token(len(picked))
        # Every live row takes one token per step, so they all reach the budget together.
        if step == sampling.max_new_tokens or len(finished) == len(alive):
            break
        if finished:
            done = set(finished)
            keep_rows = [row for row in range(len(alive)) if row not in done]
            keep = torch.tensor(keep_rows, dtype=torch.long)
            for member, state in zip(members, states, strict=True):
                member.keep_rows(state, keep, len(alive))
            tokens = tokens[keep.to(tokens.device)]
            if seen is not None:
                seen = seen[keep.to(device)]
            alive = [alive[row] for row in keep_rows]
        scores = [m.step(s, tokens) for m, s in zip(members, states, strict=True)]
    for result in results:
        if result.finish_reason != "stop":
            result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return results


def _hit_stop(result: Generation, tokenizer: Any, stop: tuple[str, ...]) -> bool:
    """Whether the text so far contains a stop string; if so, cut the text before it."""
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop if s in text]
    if not cuts:
        return False
    result.text = text[: min(cuts)]
    return True
