"""`context_distill`: learn to answer without a context what the model answers with it.

Context distillation (Snell et al. 2022, https://arxiv.org/abs/2209.15189): the teacher is the
start model reading `context + prompt + answer` (an instruction, a few-shot prefix: the recipe's
`context:`), the student reads `prompt + answer`, and at every answer position the student's
next-token distribution Q is pulled towards the teacher's P by `losses.distillation_loss`
(forward KL, reverse KL or JSD at a temperature, optionally top-k; with alpha < 1 mixed with the
cross-entropy on the real answer). Trained on the data's prompts, the context's effect moves into
the weights, and the context no longer needs to be in the prompt.

Alignment: the C context ids go after a row's start token (BOS, else EOS, as data.py frames an
example; a row without one gets them first), so the teacher's row is the student's with C ids
inserted before the prompt. Every target position t of the student (the answer, after the
insertion point) is position t + C of the teacher: `teacher_scores[:, C:]` lines up with the
student's (B, T) positions. Rows are right-padded, so the last T of the teacher's C + T positions
are exactly those, and only their logits are computed (`logits_to_keep`).

Cost: every row shares the prefix [start] + context, so its keys and values are computed once
(`PrefixCache`) and each step's teacher forward covers the rows' own tokens after it: about one
student forward instead of (C + T) / T of them. A batch whose rows do not share it (rows with and
without a start token mixed) takes the whole forward.

The teacher is the *start* model, frozen: targets that moved with the student would drift with
it and could reward forgetting the context's effect in both. Without an adapter it is a frozen
float32 copy of `model.path` in memory; with an adapter it is the policy itself with the adapter
switched off (PEFT's `disable_adapter()`), which is exactly the start model and costs no second
copy. Either runs in eval mode without autograd.

Shapes: B rows, T student positions, C context ids, V vocabulary, N target positions.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloy.train.losses import SparseTeacher, distillation_loss
from alloy.train.objectives.base import (
    LossParts,
    Objective,
    ObjectiveContext,
    model_inputs,
    objective,
    shifted_labels,
)


def with_context(
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    context: torch.Tensor,
    *,
    start: int | None,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's rows: each student row with the context ids after its start token.

    Args:
        input_ids: (B, T) right-padded student rows.
        lengths: (B,) real tokens of each row.
        context: (C,) context ids.
        start: the id a framed row begins with (the context goes after it), or None.
        pad: the id padding is filled with.
    Returns:
        (B, C + T) right-padded teacher ids and their (B, C + T) attention mask.
    """
    rows, width = input_ids.shape
    c = len(context)
    ids = torch.full((rows, c + width), pad, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((rows, c + width), dtype=torch.long, device=input_ids.device)
    context = context.to(input_ids.device, input_ids.dtype)
    for b in range(rows):
        n = int(lengths[b])
        row = input_ids[b, :n]
        s = 1 if start is not None and n and int(row[0]) == start else 0
        ids[b, : n + c] = torch.cat([row[:s], context, row[s:]])
        mask[b, : n + c] = 1
    return ids, mask


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """`model` in eval mode (no dropout) and without autograd, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def teacher_scores(
    teacher: Any, batch: dict[str, torch.Tensor], context: torch.Tensor, start: int | None, pad: int
) -> torch.Tensor:
    """(B, T, V') the teacher's logits on context + row, aligned with the student's positions
    (position t predicts the row's token t + 1)."""
    width = batch["input_ids"].shape[1]
    ids, mask = with_context(batch["input_ids"], batch["lengths"], context, start=start, pad=pad)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if "logits_to_keep" in inspect.signature(teacher.forward).parameters:
        inputs["logits_to_keep"] = width  # the last T positions: C .. C + T - 1
        return teacher(**inputs).logits
    return teacher(**inputs).logits[:, len(context) :]


@dataclass(frozen=True)
class PrefixCache:
    """The teacher's keys and values over a fixed prefix ([start] + context, or the context
    alone), computed once, and its last position's logits (what follows the prefix)."""

    cache: Any  # a transformers Cache of batch 1
    last: torch.Tensor  # (V',)
    length: int

    @classmethod
    def build(cls, teacher: Any, prefix: torch.Tensor) -> PrefixCache:
        device = next(teacher.parameters()).device
        out = teacher(input_ids=prefix[None].to(device), use_cache=True)
        cache = out.cache if _cache_keyword(teacher) == "cache" else out.past_key_values
        return cls(cache, out.logits[0, -1], len(prefix))


def _cache_keyword(model: Any) -> str:
    """What the model's forward calls its KV cache: `cache` (transformers >= 5.2x) or the older
    `past_key_values` (a PEFT model forwards keywords: its base model's signature decides)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cached_teacher_scores(
    teacher: Any, batch: dict[str, torch.Tensor], prefix: PrefixCache, skip: int
) -> torch.Tensor:
    """`teacher_scores` from a prefix computed once: the same (B, T, V') logits, with the teacher
    running over the rows' own T - skip tokens only (skip = 1: every row starts with the start
    token, which is the prefix's first; 0: no row does)."""
    ids = batch["input_ids"][:, skip:]  # (B, T - skip)
    rows, width = ids.shape
    new = torch.arange(width, device=ids.device)
    real = new[None, :] < (batch["lengths"].to(ids.device) - skip)[:, None]  # (B, T - skip)
    mask = torch.cat([real.new_ones(rows, prefix.length), real], dim=1).long()  # (B, P + T - s)
    cache = copy.deepcopy(prefix.cache)  # the forward appends to it
    cache.batch_repeat_interleave(rows)
    inputs = {_cache_keyword(teacher): cache, "use_cache": True}
    logits = teacher(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(prefix.length + new).expand(rows, -1),
        **inputs,
    ).logits  # (B, T - skip, V'): position j predicts the row's token skip + j + 1
    if skip:  # the start token's position: what the teacher predicts after the prefix
        logits = torch.cat([prefix.last.expand(rows, 1, -1).to(logits.dtype), logits], dim=1)
    return logits


class ContextDistill:
    def __init__(
        self,
        settings: Any,
        context: torch.Tensor,
        *,
        start: int | None,
        pad: int,
        vocab: int,
        teacher: Any = None,
    ) -> None:
        self.settings = settings  # the recipe's context entry (KD settings)
        self.context = context  # (C,) context ids
        self.start, self.pad, self.vocab = start, pad, vocab
        self.teacher = teacher  # a frozen copy of the start model; None: the adapter-less policy
        self.prefixes: dict[int, PrefixCache] = {}  # by the number of row ids it replaces

    def targets(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, V) the start model's logits with the context, aligned with the student's."""
        teacher = self.teacher
        disabled: Any = contextlib.nullcontext()
        if teacher is None:
            teacher = getattr(model, "module", model)  # DDP's wrapper has no disable_adapter
            disabled = teacher.disable_adapter()
        skip = self._shared_start(batch)
        with _frozen(teacher), disabled:
            if skip is None:  # no prefix shared by every row: the whole context + row
                scores = teacher_scores(teacher, batch, self.context, self.start, self.pad)
            else:
                if skip not in self.prefixes:
                    head = batch["input_ids"][0, :skip].cpu()  # the start token, or nothing
                    prefix = torch.cat([head, self.context.to(head.dtype)])
                    self.prefixes[skip] = PrefixCache.build(teacher, prefix)
                scores = cached_teacher_scores(teacher, batch, self.prefixes[skip], skip)
        return scores[..., : self.vocab].float()

    def _shared_start(self, batch: dict[str, torch.Tensor]) -> int | None:
        """How many ids every row shares with the prefix: 1 when each starts with the start
        token, 0 when none does; None when the rows differ or there is no prefix at all."""
        first = batch["input_ids"][:, 0]
        starts = (first == self.start) & (batch["lengths"] > 0)
        if self.start is None or not bool(starts.any()):
            skip = 0
        elif bool(starts.all()):
            skip = 1
        else:
            return None
        return skip if skip + len(self.context) > 0 else None

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        s = self.settings
        assert "position_ids" not in batch, "context_distill rows are never packed"
        teacher = self.targets(model, batch)  # (B, T, V)
        logits = model(**model_inputs(batch)).logits  # (B, T, V')
        labels = shifted_labels(batch)  # (B, T)
        mask = labels != -100
        student = logits[mask][..., : self.vocab]  # (N, V)
        scores = teacher[mask].to(student.device)  # (N, V)
        target: torch.Tensor | SparseTeacher = scores
        if s.top_k:
            top = torch.log_softmax(scores, dim=-1).topk(s.top_k, dim=-1)
            target = SparseTeacher(top.values, top.indices)
        loss, kd, ce = distillation_loss(
            student,
            labels[mask],
            target,
            alpha=float(s.alpha),
            kind=s.loss,
            temperature=float(s.temperature),
            beta=float(s.beta),
        )
        metrics = {"kd": kd.sum().detach(), "ce": ce.sum().detach()}
        return LossParts(loss.sum(), mask.sum(), metrics)


@objective(
    "context_distill",
    summary="context distillation: the start model with a context teaches itself without it",
    reference="https://arxiv.org/abs/2209.15189",
    rows="examples",
)
def build_context_distill(context: ObjectiveContext) -> Objective:
    from alloy.train.context import context_text
    from alloy.train.data import special_ids
    from alloy.train.objectives.dpo import load_reference

    spec = context.recipe.spec
    settings = spec.context
    tokenizer = context.tokenizer
    ids = tokenizer(context_text(settings), add_special_tokens=False)["input_ids"]
    start, _ = special_ids(tokenizer)
    pad = tokenizer.pad_token_id
    teacher = None
    if spec.adapter is None:
        assert spec.model.path is not None  # checked with the recipe
        teacher = load_reference(Path(spec.model.path), context.device)
    which = "a frozen copy of the" if teacher is not None else "the adapter-disabled"
    context.say(f"context: {len(ids)} tokens; teacher: {which} start model")
    return ContextDistill(
        settings,
        torch.tensor(ids, dtype=torch.long),
        start=start,
        pad=0 if pad is None else int(pad),
        vocab=len(tokenizer),
        teacher=teacher,
    )
