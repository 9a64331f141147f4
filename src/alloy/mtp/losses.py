"""The multi-token loss: every head's summed cross-entropy on its own shifted targets.

Head k (k = 1 the model's own next-token head, k = 1 + i extra head i) at position t is scored on
token t + k:

    loss = sum_k w_k * sum_{t, labels[t + k] != -100} -log softmax(logits_k[t])[labels[t + k]]

Memory (the paper's section 3.2 fix): the naive way keeps every head's (B, T, V) logits, their
float copy and the head layer's activations alive until the backward pass, N times one head's.
With `sequential`, each head's layer + norm + unembedding + loss runs under
`torch.utils.checkpoint`: the forward keeps only the trunk's (B, T, H) input, and the backward
recomputes one head at a time, so the logits of only one head are alive at once, inside
Trainer's own single `backward()`. The price is one more forward of each head (one decoder layer
and the unembedding). The paper instead runs each head's backward before the next head's
forward and the trunk's backward once at the end; under one `backward()` call, recomputation is
the way to get the same peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def shift_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) labels -> (B, T): position t holds labels[t + k], the last k positions -100."""
    return torch.nn.functional.pad(labels[:, k:], (0, k), value=-100)


def head_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) targets (-100: none) -> summed cross-entropy (with grad) and the
    number of targets whose argmax is right (top-1 hits)."""
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    hits = ((logits.detach().argmax(-1) == targets) & (targets != -100)).sum()
    return ce, hits


HeadFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T, H) trunk states -> (B, T, V) logits


def multi_token_loss(
    trunk: torch.Tensor,
    labels: torch.Tensor,
    heads: Sequence[tuple[int, float, HeadFn]],
    *,
    sequential: bool = True,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """The weighted sum of the heads' summed cross-entropies.

    Args:
        trunk: (B, T, H) the trunk's output.
        labels: (B, T) token ids, -100 where a token is not a target (the batch's labels).
        heads: (k, weight, logits_fn) per head: head k predicts token t + k.
        sequential: recompute each head in the backward pass (see the module docstring).
    Returns:
        the total (with grad) and (k, summed CE, top-1 hits) per head, detached.
    """
    total = trunk.new_zeros((), dtype=torch.float32)
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for k, weight, logits_fn in heads:
        targets = shift_labels(labels, k)

        def run(states: torch.Tensor, fn: HeadFn = logits_fn, t: torch.Tensor = targets) -> Any:
            return head_ce(fn(states), t)

        ce, hits = checkpoint(run, trunk, use_reentrant=False) if sequential else run(trunk)
        if weight:
            total = total + weight * ce
        parts.append((k, ce.detach(), hits))
    return total, parts
