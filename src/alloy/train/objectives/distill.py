"""`distill`: a student trained on a teacher's next-token distributions (mixed with CE).

Token-level knowledge distillation (Hinton et al. 2015; for language models Kim and Rush 2016,
https://arxiv.org/abs/1606.07947): at every target position the student's distribution is pulled
towards the teacher's by `teacher.loss` (forward KL, reverse KL or generalised JSD, losses.py),
weighted `alpha` against the usual cross-entropy on the real next token. The teacher is a model
folder or an ensemble recipe (teacher.py); with `top_k` it is truncated to its k most likely
tokens, and with `cache` those are computed once for the whole run and read back from disk.
"""

from __future__ import annotations

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


class Distill:
    def __init__(self, teacher: Any, cache: Any, settings: Any, vocab: int) -> None:
        self.teacher = teacher  # alloy.train.teacher.Teacher, None when every target is cached
        self.cache = cache  # alloy.train.teacher.TopKCache or None
        self.settings = settings  # the recipe's teacher entry
        self.vocab = vocab  # ids the two tokenizers share; padded rows beyond are not compared

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        s = self.settings
        logits = model(**model_inputs(batch)).logits  # (B, T, V')
        # When every position but the last is a target (packed rows) the losses run on the
        # whole (B, T, V) batch as it is and the last position is zeroed after; otherwise the
        # target positions are gathered into (N, V) first. Either way no (B, T-1, V) copy is
        # made of the student's or the teacher's scores.
        labels = shifted_labels(batch)  # (B, T)
        mask = labels != -100
        dense = bool(mask[:, :-1].all())

        def select(x: torch.Tensor) -> torch.Tensor:
            return x if dense else x[mask]

        student = select(logits)[..., : self.vocab]  # (B, T, V) or (N, V)
        targets = select(labels.clamp(min=0))
        teacher: torch.Tensor | SparseTeacher
        if self.cache is not None:
            values, ids = self.cache.lookup(batch["index"], mask.shape[1] - 1)  # (B, T-1, k)
            last = (0, 0, 0, 1)  # one row for the last position, which predicts nothing
            values = torch.nn.functional.pad(values, last).to(student.device)
            ids = torch.nn.functional.pad(ids, last).to(student.device)
            teacher = SparseTeacher(select(values), select(ids))
        else:
            scores = select(self.teacher.scores(batch).to(student.device))
            if s.top_k:
                top = torch.log_softmax(scores, dim=-1).topk(s.top_k, dim=-1)
                teacher = SparseTeacher(top.values, top.indices)
            else:
                teacher = scores
        loss, kd, ce = distillation_loss(
            student,
            targets,
            teacher,
            alpha=float(s.alpha),
            kind=s.loss,
            temperature=float(s.temperature),
            beta=float(s.beta),
        )
        if dense:  # the last position predicts nothing (where, not a product: 0 * inf is nan)
            loss, kd, ce = (torch.where(mask, x, 0.0) for x in (loss, kd, ce))
        metrics = {"kd": kd.sum().detach(), "ce": ce.sum().detach()}
        return LossParts(loss.sum(), mask.sum(), metrics)


@objective(
    "distill",
    summary="knowledge distillation from a model or an ensemble recipe (KL / JSD, + CE)",
    reference="https://arxiv.org/abs/1503.02531",
    rows="either",
    needs_teacher=True,
)
def build_distill(context: ObjectiveContext) -> Objective:
    from alloy.train.data import cache_root
    from alloy.train.packing import Collator
    from alloy.train.teacher import TopKCache, load_teacher, teacher_identity

    settings = context.recipe.spec.teacher
    vocab = len(context.tokenizer)
    teacher: Any = load_teacher(
        settings.model, device=context.device, dtype=settings.dtype, vocab=vocab
    )
    cache = None
    if settings.cache:
        root = cache_root() if settings.cache is True else Path(settings.cache)
        pad = context.tokenizer.pad_token_id
        cache = TopKCache.build(
            teacher,
            context.rows,
            Collator(0 if pad is None else pad),
            k=settings.top_k,
            identity=teacher_identity(settings.model),
            root=root,
            batch_size=context.recipe.spec.micro_batch_size or 8,
            width=context.width - 1,
            say=context.say,
        )
        teacher = None  # every target is on disk: free the teacher's memory
    return Distill(teacher, cache, settings, vocab)
