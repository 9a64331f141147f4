"""Perplexity and bits per byte with sliding windows (the Hugging Face "strided" evaluation).

A document of N tokens (its first token is BOS when the tokenizer has one) is covered by windows
of at most `window` tokens starting every `stride` tokens; each window scores only the tokens the
previous window did not, so every token after the first is scored exactly once and, beyond the
first window, with at least `max(1, window - stride)` tokens of context. `stride == window` gives
chunks overlapping by one token (fast, pessimistic); a smaller stride approaches full-context
perplexity.

Bits per byte = total NLL in nats / ln 2 / UTF-8 bytes of the scored text: unlike per-token
perplexity it compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alloy.eval.scorer import Scorer, start_ids


@dataclass(frozen=True)
class Window:
    doc: int
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first: int  # first token scored (begin < first <= end)


def windows(n_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows covering tokens `[1, n_tokens)` (token 0 is only ever context)."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    out = []
    scored_until = 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        out.append(Window(doc, begin, end, scored_until))
        scored_until = end
        # A window's first token has no context, so it can only be scored by the window before:
        # windows overlap by at least one token even when stride == window.
        begin = min(begin + stride, scored_until - 1)
    return out


@dataclass(frozen=True)
class TextScore:
    nll: float  # nats, summed over scored tokens
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored text
    documents: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "nll": self.nll,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def encode_documents(
    scorer: Scorer, documents: Sequence[str], max_tokens: int | None = None
) -> tuple[list[list[int]], int]:
    """Token ids of each document, BOS-prefixed when the tokenizer has a BOS (or EOS) token.

    With `max_tokens`, documents are taken in order until that many tokens are scored; the last
    one is cut at a token boundary. Returns the ids and the UTF-8 bytes of the scored text.
    """
    tokenizer = scorer.tokenizer
    prefix = start_ids(tokenizer)
    encoded, total_bytes, budget = [], 0, max_tokens
    for text in documents:
        tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = tokens["input_ids"], tokens["offset_mapping"]
        if not prefix and not ids:
            continue
        full = prefix + ids
        # Without a prefix the first token is never scored, so its characters do not count.
        first_char = 0 if prefix else offsets[0][1]
        last_char = len(text)
        if budget is not None and len(full) - 1 > budget:
            full = full[: budget + 1]
            last_char = offsets[len(full) - len(prefix) - 1][1]
        total_bytes += len(text[first_char:last_char].encode("utf-8"))
        encoded.append(full)
        if budget is not None:
            budget -= len(full) - 1
            if budget <= 0:
                break
    return encoded, total_bytes


def score_text(
    scorer: Scorer,
    documents: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> TextScore:
    """Total NLL, tokens and bytes of `documents` under `scorer` (see the module docstring).

    `window` defaults to the scorer's `max_length` and `stride` to half the window.
    """
    window = min(window or scorer.max_length, scorer.max_length)
    stride = stride or max(1, window // 2)
    encoded, n_bytes = encode_documents(scorer, documents, max_tokens)
    jobs = [w for d, ids in enumerate(encoded) for w in windows(len(ids), window, stride, d)]
    jobs.sort(key=lambda w: w.end - w.begin, reverse=True)  # similar lengths share a batch
    pad = scorer.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    nll = 0.0
    tokens = 0
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        length = max(w.end - w.begin for w in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)  # (B, T), padded right
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for b, w in enumerate(batch):
            ids[b, : w.end - w.begin] = torch.tensor(encoded[w.doc][w.begin : w.end])
            mask[b, : w.end - w.begin] = 1
        logprobs = scorer.token_logprobs(ids, mask)  # (B, T)
        for b, w in enumerate(batch):
            nll -= float(logprobs[b, w.first - w.begin : w.end - w.begin].double().sum())
            tokens += w.end - w.first
    return TextScore(nll, tokens, n_bytes, len(encoded))
