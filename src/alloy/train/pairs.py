"""Preference pairs: JSONL records of a prompt with a chosen and a rejected answer, as rows.

    {"prompt": "Question: ...\\nAnswer:", "chosen": " Paris", "rejected": " Lyon"}
    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

Plain strings are laid out as SFT examples are (data.py): `[start] prompt answer [eos]`, the
answer and EOS scored. Message lists are rendered with the tokenizer's chat template, turn by
turn, the prompt's messages being context and the answer's assistant turns the targets; without
`prompt`, the prompt is the messages chosen and rejected share at their start. A pair is stored
as two items of its source (chosen, then rejected), so the token cache holds pairs unchanged.

A record may also carry `margin`, a number (default 0): how much better the chosen answer was
rated, which the reward objective subtracts from the reward difference (Llama 2); dpo ignores it.

A row holds one pair. When the prompt and the longer answer do not fit `sequence_length` L, the
prompt loses tokens from its left (its first token, BOS, is kept), down to half the row; then
the answers keep their first L - (prompt) tokens. Both answers always follow the same prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from alloy.errors import Problem
from alloy.train.data import Item, TokenizedSource, render_messages
from alloy.train.packing import Row, _permutation

ANSWERS = ("chosen", "rejected")
PREFERENCE_KINDS = ("preference", "preference_chat")


def is_preference(record: dict[str, Any]) -> bool:
    return "chosen" in record or "rejected" in record


def preference_items(
    record: dict[str, Any], where: str, tokenizer: Any, problems: list[Problem]
) -> list[Item]:
    """[chosen, rejected] items of a preference record, or [] with its problems added."""
    missing = [k for k in ("prompt", *ANSWERS) if k not in record]
    chat = all(isinstance(record.get(k), list) for k in ANSWERS)
    if chat and missing == ["prompt"]:
        missing = []  # the prompt is the shared start of the two conversations
    if missing:
        problems.append(Problem(where, f"missing {', '.join(missing)}", "prompt, chosen, rejected"))
        return []
    margin = _margin(record, where, problems)
    if margin is None:
        return []
    if chat:
        items = _chat_items(record, where, tokenizer, problems)
        return [dataclasses.replace(item, margin=margin) for item in items]
    values = [record[k] for k in ("prompt", *ANSWERS)]
    if not all(isinstance(v, str) for v in values):
        kinds = ", ".join(f"{k} {type(record[k]).__name__}" for k in ("prompt", *ANSWERS))
        message = f"prompt, chosen and rejected must all be strings or message lists ({kinds})"
        problems.append(Problem(where, message))
        return []
    prompt, chosen, rejected = values
    empty = [k for k in ANSWERS if not record[k].strip()]
    if empty:
        problems.append(Problem(where, f"empty {' and '.join(empty)} answer"))
        return []
    return [
        Item("preference", ((prompt, False), (chosen, True)), margin),
        Item("preference", ((prompt, False), (rejected, True)), margin),
    ]


def _margin(record: dict[str, Any], where: str, problems: list[Problem]) -> float | None:
    """The record's `margin` (0 without one), or None with its problem added."""
    value = record.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append(
            Problem(where, f"margin must be a finite number, not {value!r}", "e.g. margin: 1.5")
        )
        return None
    return float(value)


def _chat_items(
    record: dict[str, Any], where: str, tokenizer: Any, problems: list[Problem]
) -> list[Item]:
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif not isinstance(prompt, list):
        problems.append(Problem(where, "prompt must be a message list when the answers are"))
        return []
    empty = [k for k, answer in zip(ANSWERS, (chosen, rejected), strict=True) if not answer]
    if empty:
        problems.append(Problem(where, f"empty {' and '.join(empty)} answer"))
        return []
    items = []
    for answer in (chosen, rejected):
        before = len(problems)
        segments = render_messages(prompt + answer, tokenizer, where, problems, first=len(prompt))
        if segments is None or len(problems) > before:
            return []
        items.append(Item("preference_chat", tuple(segments)))
    return items


def prompt_length(mask: np.ndarray) -> int:
    """Tokens before the first target (the prompt, with the start token)."""
    targets = np.flatnonzero(mask)
    return int(targets[0]) if len(targets) else len(mask)


def fit_pair(prompt: int, answers: int, length: int) -> tuple[int, int]:
    """(prompt tokens kept, answer tokens kept) of a pair whose prompt has `prompt` tokens and
    whose longer answer has `answers`, in rows of `length` (see the module docstring)."""
    if prompt + answers <= length:
        return prompt, answers
    kept = min(prompt, max(length - answers, length // 2))
    return kept, length - kept


def _cut(ids: np.ndarray, prompt: int, kept: int, budget: int) -> np.ndarray:
    """The prompt's first token and its last kept - 1 tokens, then the answer's first budget."""
    head = ids[: min(1, kept)]
    tail = ids[prompt - kept + len(head) : prompt]
    return np.concatenate([head, tail, ids[prompt : prompt + budget]])


class PairRows:
    """One preference pair per row, in a seeded order per epoch (a `packing.Rows`)."""

    def __init__(self, source: TokenizedSource, length: int, *, seed: int, index: int) -> None:
        self.name = source.name
        self.source = source
        self.length = length
        self.seed, self.index = seed, index
        self.pairs = source.items // 2
        self.truncated = 0
        self.identical = 0
        starts = source.starts
        for k in range(self.pairs):
            chosen = np.asarray(source.ids[starts[2 * k] : starts[2 * k + 1]])
            rejected = np.asarray(source.ids[starts[2 * k + 1] : starts[2 * k + 2]])
            if np.array_equal(chosen, rejected):
                self.identical += 1
            if max(len(chosen), len(rejected)) > length:
                self.truncated += 1
        self._orders: dict[int, np.ndarray] = {}

    def epoch_size(self, epoch: int) -> int:
        return self.pairs

    def pair(self, k: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((ids, mask) of the chosen sequence, (ids, mask) of the rejected), fitted to a row."""
        starts, ids, mask = self.source.starts, self.source.ids, self.source.mask
        spans = [(int(starts[2 * k + j]), int(starts[2 * k + j + 1])) for j in (0, 1)]
        parts = [(np.asarray(ids[a:b]), np.asarray(mask[a:b])) for a, b in spans]
        prompt = prompt_length(parts[0][1])
        answers = max(len(p[0]) for p in parts) - prompt
        kept, budget = fit_pair(prompt, answers, self.length)
        chosen, rejected = (
            (_cut(i, prompt, kept, budget), _cut(m, prompt, kept, budget)) for i, m in parts
        )
        return chosen, rejected

    def row(self, epoch: int, index: int) -> Row:
        if epoch not in self._orders:
            self._orders = {epoch: _permutation(self.seed, self.index, epoch, self.pairs)}
        k = int(self._orders[epoch][index])
        (ci, cm), rejected = self.pair(k)
        margins = self.source.margins
        return Row(ci, cm, None, rejected, 0.0 if margins is None else float(margins[2 * k]))
