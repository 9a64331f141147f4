"""Multiple-choice and pairwise-preference accuracy by log-likelihood (or reward).

Each choice is scored as the summed log-probability of its tokens after the context, with the
context and the continuation tokenised separately (so a choice is always the same tokens, whatever
the context ends with). `accuracy` picks the highest sum; `accuracy_norm` divides by the choice's
UTF-8 length in bytes first, which removes the bias towards short answers and is tokenizer-free.
Preference accuracy counts a tie as half right. A reward model scores `prompt + response`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alloy.eval.data import Choice, Preference
from alloy.eval.scorer import RewardScorer, Scorer, start_ids


def continuation_logprobs(
    scorer: Scorer, pairs: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[float]:
    """Summed log p(continuation | context) for each `(context, continuation)` pair."""
    tokenizer = scorer.tokenizer
    prefix = start_ids(tokenizer)
    rows = []
    for context, continuation in pairs:
        ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:  # no BOS and no context: the first continuation token cannot be scored
            ctx, cont = cont[:1], cont[1:]
        ids = (ctx + cont)[-scorer.max_length :]  # keep the end: the continuation is scored
        rows.append((ids, min(len(cont), len(ids) - 1)))
    scores = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        length = max(len(rows[j][0]) for j in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for b, j in enumerate(batch):
            ids[b, : len(rows[j][0])] = torch.tensor(rows[j][0])
            mask[b, : len(rows[j][0])] = 1
        logprobs = scorer.token_logprobs(ids, mask)  # (B, T)
        for b, j in enumerate(batch):
            n, count = len(rows[j][0]), rows[j][1]
            scores[j] = float(logprobs[b, n - count : n].double().sum())
    return scores


def choice_accuracy(
    scorer: Scorer, items: Sequence[Choice], batch_size: int = 8
) -> dict[str, float]:
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    flat = continuation_logprobs(scorer, pairs, batch_size)
    right = right_norm = 0
    k = 0
    for item in items:
        scores = flat[k : k + len(item.choices)]
        k += len(item.choices)
        normed = [
            s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, item.choices, strict=True)
        ]
        right += int(max(range(len(scores)), key=scores.__getitem__) == item.answer)
        right_norm += int(max(range(len(normed)), key=normed.__getitem__) == item.answer)
    n = len(items)
    chance = sum(1 / len(item.choices) for item in items) / n
    return {"accuracy": right / n, "accuracy_norm": right_norm / n, "chance": chance, "items": n}


def _pairwise(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    wins = sum(
        1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)
    )
    return wins / len(chosen)


def preference_accuracy(
    scorer: Scorer | RewardScorer, items: Sequence[Preference], batch_size: int = 8
) -> dict[str, float]:
    if isinstance(scorer, RewardScorer) and getattr(scorer, "is_reward_model", True):
        chosen = reward_scores(scorer, [i.prompt + i.chosen for i in items], batch_size)
        rejected = reward_scores(scorer, [i.prompt + i.rejected for i in items], batch_size)
        return {"accuracy": _pairwise(chosen, rejected), "items": len(items)}
    assert isinstance(scorer, Scorer)
    pairs = [(i.prompt, i.chosen) for i in items] + [(i.prompt, i.rejected) for i in items]
    flat = continuation_logprobs(scorer, pairs, batch_size)
    chosen, rejected = flat[: len(items)], flat[len(items) :]
    chosen_norm = [s / max(1, len(i.chosen.encode())) for s, i in zip(chosen, items, strict=True)]
    rejected_norm = [
        s / max(1, len(i.rejected.encode())) for s, i in zip(rejected, items, strict=True)
    ]
    return {
        "accuracy": _pairwise(chosen, rejected),
        "accuracy_norm": _pairwise(chosen_norm, rejected_norm),
        "items": len(items),
    }


def reward_inputs(tokenizer: Any, text: str, max_length: int, pad_id: int | None) -> list[int]:
    """Token ids a reward model scores `text` on, laid out as `alloy train`'s reward objective
    trained it: `[start] text`, plus EOS when padding is not EOS (training reads the reward at
    the last non-pad token, which is then the EOS it appended). Too long: the text loses tokens
    from its left, the start token stays."""
    start = start_ids(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and pad_id is not None and pad_id != eos:
        ids.append(int(eos))
    return start + ids[-(max_length - len(start)) :]


def reward_scores(scorer: RewardScorer, texts: Sequence[str], batch_size: int = 8) -> list[float]:
    tokenizer = scorer.tokenizer
    out = [0.0] * len(texts)
    config = getattr(getattr(scorer, "model", None), "config", None)
    pad_id = getattr(config, "pad_token_id", tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(texts), batch_size):
        encoded = [
            reward_inputs(tokenizer, t, scorer.max_length, pad_id)
            for t in texts[i : i + batch_size]
        ]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for b, e in enumerate(encoded):
            ids[b, : len(e)] = torch.tensor(e)
            mask[b, : len(e)] = 1
        values = scorer.rewards(ids, mask)  # (B,)
        out[i : i + len(encoded)] = [float(v) for v in values]
    return out
