"""Early exits of one model: which layers DoLa contrasts, and their next-token logits.

An early exit reads the hidden state after layer j (j = 0: the embeddings; j >= 1: the output of
the j-th decoder layer) through the model's own final norm and LM head, so it costs one norm and
one head product per exit and needs no new weights. `hidden_states[N]` is the final layer (already
normed by transformers) and gives the model's own logits; exits are 0 <= j < N.

Candidate buckets follow the paper's and transformers' choice: `low` is the even layers of the
first half, `high` the even layers of the second half (for models of more than 40 layers the first
and the last 20). With tied embeddings layer 0 is skipped as a candidate of `low`: its head is the
embedding matrix against itself, an identity map that tells nothing about the next token.

Shapes: B rows, T tokens, E exits, H hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alloy.errors import InputError, Problem

BUCKETS = ("low", "high")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def parse_layers(value: str | Sequence[int]) -> str | tuple[int, ...]:
    """`low`, `high`, a list of ints or a string "0,4,8" -> a bucket name or a tuple of layers.

    Raises ValueError with a message for anything else."""
    if isinstance(value, str):
        if value in BUCKETS:
            return value
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"{value!r} is neither low, high nor a list of layer numbers")
        return tuple(int(p) for p in parts)
    layers = tuple(value)
    if not layers or not all(isinstance(j, int) and not isinstance(j, bool) for j in layers):
        raise ValueError("give layer numbers as a non-empty list of integers")
    return layers


def candidate_layers(value: str | tuple[int, ...], num_layers: int, tied: bool) -> tuple[int, ...]:
    """The early layers to contrast for a model of `num_layers` decoder layers.

    Raises InputError when an explicit layer is out of range (0 <= j < num_layers)."""
    n = num_layers
    if value == "low":
        start = 2 if tied else 0
        stop = n // 2 if n <= 40 else 20
        layers = tuple(range(start, stop, 2))
        return layers or (min(start, n - 1),)  # a very shallow model: one candidate
    if value == "high":
        return tuple(range(n // 2 if n <= 40 else n - 20, n, 2))
    assert not isinstance(value, str)
    bad = [j for j in value if not 0 <= j < n]
    if bad:
        raise InputError(
            f"layers {list(value)}: the model has {n} layers",
            [
                Problem(
                    "layers", f"{bad} out of range", f"early layers are 0..{n - 1} (0: embeddings)"
                )
            ],
        )
    return tuple(sorted(set(value)))


def final_norm(model: Any) -> torch.nn.Module:
    """The norm a causal LM applies before its LM head (Llama's `model.norm`, GPT-2's `ln_f`,
    ...); raises InputError for an architecture whose final norm is not found."""
    base = model.base_model
    for name in _NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    kind = type(model).__name__
    raise InputError(
        f"{kind}: cannot find the final norm that early exits need",
        [Problem(kind, f"none of {', '.join(_NORM_NAMES)} on its base model", None)],
    )


class EarlyExits:
    """The logits of a model's final layer and its early exits from one forward's hidden states."""

    def __init__(self, model: Any, layers: tuple[int, ...], vocab: int) -> None:
        self.layers = layers
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.vocab = vocab

    def logits(self, logits: torch.Tensor, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, [T,] V') final logits and the forward's hidden states -> (B, [T,] 1 + E, V)
        fp32: the final layer's logits, then each exit's in the order of `layers`."""
        width = logits.shape[-2] if logits.dim() == 3 else None
        exits = []
        for j in self.layers:
            hidden = hidden_states[j]  # (B, T_all, H)
            hidden = hidden[:, -width:] if width is not None else hidden[:, -1]
            exits.append(self.head(self.norm(hidden))[..., : self.vocab].float())
        final = logits[..., : self.vocab].float()
        return torch.stack([final, *exits], dim=-2)
