"""Context distillation maths: the teacher's rows and their alignment on hand-built examples, the
loss against an independent per-row computation, and the self-KL of an empty context."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alloy.lab.tiny import tiny_model, tiny_tokenizer
from alloy.train.context import ContextEntry
from alloy.train.data import Item, tokenize_items
from alloy.train.objectives.context_distill import (
    ContextDistill,
    PrefixCache,
    cached_teacher_scores,
    teacher_scores,
    with_context,
)
from alloy.train.packing import Collator


def test_with_context_inserts_after_the_start_token() -> None:
    """Rows [1 10 11 12 2] and [1 20 21] (padded), context [7 8], start 1:
    [1 7 8 10 11 12 2] and [1 7 8 20 21 pad pad]; a row without the start token gets the
    context first: [30 31] -> [7 8 30 31]."""
    ids = torch.tensor([[1, 10, 11, 12, 2], [1, 20, 21, 0, 0], [30, 31, 0, 0, 0]])
    got, mask = with_context(ids, torch.tensor([5, 3, 2]), torch.tensor([7, 8]), start=1, pad=0)
    assert got.tolist() == [
        [1, 7, 8, 10, 11, 12, 2],
        [1, 7, 8, 20, 21, 0, 0],
        [7, 8, 30, 31, 0, 0, 0],
    ]
    assert mask.tolist() == [[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3]
    same, _ = with_context(
        ids, torch.tensor([5, 3, 2]), torch.tensor([], dtype=torch.long), start=1, pad=0
    )
    assert torch.equal(same, ids)


class _NextTokenOracle(torch.nn.Module):
    """A 'model' whose logits at position p are 10 x one-hot(the id at p + 1 of its input): the
    aligned teacher must then predict, at every student position t, the student's id t + 1."""

    def __init__(self, vocab: int, keep: bool) -> None:
        super().__init__()
        self.vocab = vocab
        self.keep = keep

    def __call__(self, **inputs: Any) -> Any:
        ids = inputs["input_ids"]
        nxt = torch.nn.functional.pad(ids[:, 1:], (0, 1))
        logits = 10.0 * torch.nn.functional.one_hot(nxt, self.vocab).float()  # (B, L, V)
        if "logits_to_keep" in inputs:
            logits = logits[:, -inputs["logits_to_keep"] :]
        return SimpleNamespace(logits=logits)


class _Keeps(_NextTokenOracle):
    def forward(self, input_ids: Any, attention_mask: Any, use_cache: Any, logits_to_keep: int):  # type: ignore[no-untyped-def]
        raise NotImplementedError  # only the signature is read


class _Slices(_NextTokenOracle):
    def forward(self, input_ids: Any, attention_mask: Any, use_cache: Any):  # type: ignore[no-untyped-def]
        raise NotImplementedError


@pytest.mark.parametrize("teacher_class", [_Keeps, _Slices])
def test_teacher_positions_line_up_with_the_student(teacher_class: type) -> None:
    """Rows [1 10 11 12 2] and [1 20 21 pad pad], context [7 8 9]: at student position t the
    aligned teacher predicts row[t + 1] (t = 0: the start token, whose teacher position is the
    last context id, 9, still predicts 10), with logits_to_keep or by slicing."""
    ids = torch.tensor([[1, 10, 11, 12, 2], [1, 20, 21, 0, 0]])
    batch = {"input_ids": ids, "lengths": torch.tensor([5, 3])}
    teacher = teacher_class(40, keep=teacher_class is _Keeps)
    scores = teacher_scores(teacher, batch, torch.tensor([7, 8, 9]), start=1, pad=0)
    assert scores.shape == (2, 5, 40)
    predicted = scores.argmax(-1)  # (B, T)
    assert predicted[0, :4].tolist() == [10, 11, 12, 2]
    assert predicted[1, :2].tolist() == [20, 21]


def _reference_total(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    context: str,
    examples: list[tuple[str, str]],
    *,
    kind: str,
    temperature: float,
    alpha: float,
) -> float:
    """The loss summed over answer tokens, row by row without padding, from the text parts:
    student [bos] prompt answer [eos], teacher [bos] context prompt answer [eos]; the answer's
    k-th token (and the EOS) is predicted at student index len(bos + prompt) + k - 1 and at
    teacher index len(bos + context + prompt) + k - 1. Softmaxes in float64, by hand, over the
    tokenizer's ids."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab = len(tokenizer)  # the model's padded embedding rows beyond are no tokens
    total = 0.0
    for prompt, answer in examples:
        head, ctx, tail = [bos, *encode(prompt)], encode(context), [*encode(answer), eos]
        s_ids = torch.tensor([head + tail])
        t_ids = torch.tensor([[bos, *ctx, *encode(prompt), *tail]])
        with torch.no_grad():
            q_logits = student(input_ids=s_ids).logits[0, :, :vocab].double()
            p_logits = teacher(input_ids=t_ids).logits[0, :, :vocab].double()
        for k, target in enumerate(tail):
            q = torch.softmax(q_logits[len(head) + k - 1] / temperature, -1)
            p = torch.softmax(p_logits[len(head) + len(ctx) + k - 1] / temperature, -1)
            if kind == "forward_kl":
                kd = (p * (p.log() - q.log())).sum()
            else:
                kd = (q * (q.log() - p.log())).sum()
            ce = -torch.log_softmax(q_logits[len(head) + k - 1], -1)[target]
            total += float(alpha * kd * temperature**2 + (1 - alpha) * ce)
    return total


EXAMPLES = [("12+7=", "19"), ("3+30=", "33"), ("5+5=", "10 ok")]
CONTEXT = "1+1=2\n4+5=9\n"


@pytest.mark.parametrize(
    ("kind", "temperature", "alpha"), [("forward_kl", 1.0, 1.0), ("reverse_kl", 2.0, 0.6)]
)
def test_loss_equals_an_independent_per_row_computation(
    kind: str, temperature: float, alpha: float
) -> None:
    tokenizer = tiny_tokenizer()
    student = tiny_model("llama", seed=1, noise=0.3)
    teacher = tiny_model("llama", seed=2, noise=0.3)
    ids = tokenizer(CONTEXT, add_special_tokens=False)["input_ids"]
    settings = ContextEntry(text=CONTEXT, loss=kind, temperature=temperature, alpha=alpha)
    objective = ContextDistill(
        settings,
        torch.tensor(ids),
        start=tokenizer.bos_token_id,
        pad=tokenizer.pad_token_id,
        vocab=len(tokenizer),
        teacher=teacher,
    )
    batch = _collate(tokenizer, EXAMPLES)
    assert len(set(batch["lengths"].tolist())) > 1  # padding is exercised
    parts = objective.loss(student, batch)
    expected = _reference_total(
        student,
        teacher,
        tokenizer,
        CONTEXT,
        EXAMPLES,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
    )
    assert int(parts.count) == sum(len(a) + 1 for _, a in EXAMPLES)  # answer tokens + EOS
    assert float(parts.total) == pytest.approx(expected, rel=1e-5)
    assert float(parts.total) > 0.05


def _collate(tokenizer: Any, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A padded batch of the examples, in order, as the trainer's collator makes it."""
    items = [Item("completion", ((p, False), (c, True))) for p, c in examples]
    source = tokenize_items(items, tokenizer)
    rows = []
    for i in range(source.items):
        a, b = int(source.starts[i]), int(source.starts[i + 1])
        ids = torch.from_numpy(source.ids[a:b].astype("int64"))
        labels = ids.masked_fill(~torch.from_numpy(source.mask[a:b]), -100)
        rows.append({"input_ids": ids, "labels": labels, "source": 0, "index": i})
    return Collator(tokenizer.pad_token_id)(rows)


def test_empty_context_is_the_self_kl_zero_at_start() -> None:
    """No context: the frozen start model and the student read the same rows, KD = 0."""
    tokenizer = tiny_tokenizer()
    student = tiny_model("llama", seed=1, noise=0.3)
    objective = ContextDistill(
        ContextEntry(text="-"),
        torch.tensor([], dtype=torch.long),
        start=tokenizer.bos_token_id,
        pad=tokenizer.pad_token_id,
        vocab=len(tokenizer),
        teacher=copy.deepcopy(student),
    )
    parts = objective.loss(student.train(), _collate(tokenizer, EXAMPLES))
    # zero up to float32 rounding (the teacher's start token comes from the cached prefix)
    assert abs(float(parts.metrics["kd"])) < 1e-6 * float(parts.count)
    assert float(parts.metrics["ce"]) > 1.0  # the student is no oracle: only the KD vanished


def test_the_adapter_disabled_policy_is_the_frozen_start_model() -> None:
    """With a LoRA adapter (B = 0 at start) the teacher is the policy with the adapter off: the
    same loss as a separate frozen copy; after the adapter moves, the teacher does not."""
    peft = pytest.importorskip("peft")
    tokenizer = tiny_tokenizer()
    start = tiny_model("llama", seed=1, noise=0.3)
    frozen = copy.deepcopy(start)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    policy = peft.get_peft_model(copy.deepcopy(start), config).train()
    ids = torch.tensor(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])

    def build(teacher: Any) -> ContextDistill:
        return ContextDistill(
            ContextEntry(text=CONTEXT),
            ids,
            start=tokenizer.bos_token_id,
            pad=tokenizer.pad_token_id,
            vocab=len(tokenizer),
            teacher=teacher,
        )

    batch = _collate(tokenizer, EXAMPLES)
    live, copied = build(None), build(frozen)
    assert float(live.loss(policy, batch).total) == pytest.approx(
        float(copied.loss(policy, batch).total), rel=1e-6
    )
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert torch.allclose(live.targets(policy, batch), copied.targets(policy, batch), atol=1e-5)
    assert policy.training  # the teacher's eval mode is undone
    assert math.isfinite(float(live.loss(policy, batch).total))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_the_cached_prefix_gives_the_full_forward_logits(arch: str) -> None:
    """The context's keys and values computed once, then each padded batch of rows run after
    them, give the teacher's logits of the whole context + row forward at every real position."""
    tokenizer = tiny_tokenizer()
    teacher = tiny_model(arch, seed=2, noise=0.3).float()  # some tiny specs are fp16
    batch = _collate(tokenizer, EXAMPLES)
    context = torch.tensor(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    start, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        full = teacher_scores(teacher, batch, context, start, pad)
        prefix = PrefixCache.build(teacher, torch.cat([torch.tensor([start]), context]))
        cached = cached_teacher_scores(teacher, batch, prefix, skip=1)
    real = torch.arange(full.shape[1])[None, :] < batch["lengths"][:, None]  # (B, T)
    assert cached.shape == full.shape
    assert torch.allclose(cached[real], full[real], atol=1e-5)


def test_rows_with_and_without_the_start_token_take_the_full_forward() -> None:
    """A batch mixing a framed row (BOS first) and a template's row (no BOS) shares no prefix:
    the loss is then the full forward's, and equals the per-row sum."""
    tokenizer = tiny_tokenizer()
    student = tiny_model("llama", seed=1, noise=0.3)
    teacher = tiny_model("llama", seed=2, noise=0.3)
    ids = torch.tensor(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    objective = ContextDistill(
        ContextEntry(text=CONTEXT),
        ids,
        start=tokenizer.bos_token_id,
        pad=tokenizer.pad_token_id,
        vocab=len(tokenizer),
        teacher=teacher,
    )
    batch = _collate(tokenizer, EXAMPLES)
    whole = float(objective.loss(student, batch).total)
    unframed = {k: v.clone() for k, v in batch.items()}
    unframed["input_ids"][0, :-1] = batch["input_ids"][0, 1:].clone()  # drop row 0's BOS
    unframed["labels"][0, :-1] = batch["labels"][0, 1:].clone()
    unframed["lengths"][0] -= 1
    assert objective._shared_start(unframed) is None
    mixed = float(objective.loss(student, unframed).total)
    each = sum(
        float(objective.loss(student, {k: v[i : i + 1] for k, v in unframed.items()}).total)
        for i in range(len(EXAMPLES))
    )
    assert mixed == pytest.approx(each, rel=1e-5)
    assert mixed != pytest.approx(whole, rel=1e-3)  # row 0 really lost its BOS
