"""The multi-token loss: hand-derived goldens, the trunk capture against transformers' own
hidden states, and the sequential (recomputed) heads against the naive ones: same loss, same
gradients, less memory saved for the backward pass."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from alloy.lab.tiny import tiny_model
from alloy.mtp.heads import ATTRIBUTE, MTPHeads, TrunkCapture, decoder_parts, trunk, unembed
from alloy.mtp.losses import head_ce, multi_token_loss, shift_labels
from alloy.train.objectives.mtp import MultiToken


def test_shift_labels_golden() -> None:
    labels = torch.tensor([[5, 6, 7, -100, 9]])
    assert shift_labels(labels, 1).tolist() == [[6, 7, -100, 9, -100]]
    assert shift_labels(labels, 3).tolist() == [[-100, 9, -100, -100, -100]]


def test_head_ce_golden() -> None:
    """logits (0, ln 3) give p = (1/4, 3/4): target 1 costs ln(4/3); -100 costs nothing."""
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, 0.0]]])
    ce, hits = head_ce(logits, torch.tensor([[1, -100]]))
    assert ce.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert hits.item() == 1


def test_multi_token_loss_golden() -> None:
    """The trunk's states are the logits (identity head), labels [0, 1, 1].

    k=1: position 0 (0, ln 3) -> labels[1] = 1: ln(4/3); position 1 (ln 3, 0) -> labels[2] = 1:
    p = 1/4, ln 4; position 2 predicts nothing. Sum ln(16/3), one hit (position 0).
    k=2: position 0 -> labels[2] = 1: ln(4/3), one hit. Weights (1, 0.5):
    total = ln(16/3) + 0.5 ln(4/3).
    """
    states = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 1]])
    for sequential in (False, True):
        leaf = states.clone().requires_grad_(True)
        heads: list[tuple[int, float, Callable[[torch.Tensor], torch.Tensor]]] = [
            (1, 1.0, lambda h: h),
            (2, 0.5, lambda h: h),
        ]
        total, parts = multi_token_loss(leaf, labels, heads, sequential=sequential)
        expected = math.log(16 / 3) + 0.5 * math.log(4 / 3)
        assert total.item() == pytest.approx(expected, abs=1e-6)
        assert [(k, round(ce.item(), 6), int(h)) for k, ce, h in parts] == [
            (1, round(math.log(16 / 3), 6), 1),
            (2, round(math.log(4 / 3), 6), 1),
        ]
        total.backward()
        # d/dz of CE at position 0 for k=1 and k=2 (weight 0.5): 1.5 * (p - onehot(1))
        assert leaf.grad is not None
        assert leaf.grad[0, 0].tolist() == pytest.approx([1.5 * 0.25, 1.5 * -0.25], abs=1e-6)


def _batch(vocab: int, rows: int = 2, width: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_trunk_is_the_last_layers_input_and_heads_start_as_the_next_token_head() -> None:
    model = tiny_model("llama", seed=1, noise=0.3, num_hidden_layers=3).eval()
    batch = _batch(model.config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
        states, layer_kwargs = trunk(model, inputs)
        torch.testing.assert_close(states, reference.hidden_states[-2])
        layers, norm = decoder_parts(model)
        own = unembed(model, norm(layers[-1](states, **layer_kwargs)))
        torch.testing.assert_close(own, reference.logits)
        heads = MTPHeads.from_model(model, 2)
        for i in range(2):
            head = unembed(model, heads.hidden(i, states, layer_kwargs))
            torch.testing.assert_close(head, reference.logits)
    with TrunkCapture(model) as capture, torch.no_grad():
        model(**inputs)  # without stop the pass completes and the input is still recorded
    assert capture.hidden is not None
    torch.testing.assert_close(capture.hidden, reference.hidden_states[-2])


def _model_with_heads(train_trunk: bool) -> Any:
    model = tiny_model("llama", seed=2, noise=0.3)
    if not train_trunk:
        model.requires_grad_(False)
    torch.manual_seed(0)
    heads = MTPHeads.from_model(model, 3)
    with torch.no_grad():  # heads that differ from each other and from the last layer
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    setattr(model, ATTRIBUTE, heads)
    return model


def _total(objective: MultiToken, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return objective.loss(model, batch).total


def _saved_bytes(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The loss of `run()` and the bytes of the distinct tensors autograd saved for backward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    return loss, sum(nbytes for _, nbytes in seen)


@pytest.mark.parametrize("train_trunk", [False, True])
def test_sequential_heads_give_the_naive_gradients(train_trunk: bool) -> None:
    batch = _batch(128, rows=2, width=16)
    grads = {}
    losses = {}
    for sequential in (False, True):
        model = _model_with_heads(train_trunk)
        objective = MultiToken([1.0, 0.5, 0.25], 1.0 if train_trunk else None, sequential)
        parts = objective.loss(model, batch)
        parts.total.backward()
        losses[sequential] = (parts.total.item(), {k: v.item() for k, v in parts.metrics.items()})
        grads[sequential] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-6)
    assert grads[True].keys() == grads[False].keys()
    trained = {n.split(".")[0] for n in grads[True]}
    assert trained == ({"model", "lm_head", ATTRIBUTE} if train_trunk else {ATTRIBUTE}) - (
        {"lm_head"} if model.config.tie_word_embeddings else set()
    )
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-7)
        assert grad.abs().sum() > 0, name


def test_sequential_heads_save_no_logits_for_backward() -> None:
    """Naive: each of the 3 heads keeps its (B, T, V) logits (and softmax) for backward;
    sequential keeps only what the trunk's input needs. The difference is at least the 3 heads'
    logits, 3 * 2 * 16 * 128 * 4 bytes."""
    batch = _batch(128, rows=2, width=16)
    saved = {}
    for sequential in (False, True):
        model = _model_with_heads(False)
        objective = MultiToken([1.0, 1.0, 1.0], None, sequential)
        _, saved[sequential] = _saved_bytes(partial(_total, objective, model, batch))
    assert saved[False] - saved[True] >= 3 * 2 * 16 * 128 * 4
