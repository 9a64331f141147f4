"""Candidate soups in memory: every ingredient's weights held once, any subset averaged into one
model instance and scored, nothing written.

A greedy soup scores up to 2n - 1 candidate soups; writing each one to disk and loading it back
would cost a full write and read per step. Instead every ingredient's state dict is kept in fp32
on the CPU and a candidate soup is averaged tensor by tensor straight into the parameters of a
single loaded model (the "vessel"), which the evaluator then scores like any model.

Memory: n ingredients x the model's fp32 size (4 bytes per parameter), plus the vessel and, while
loading, one more model. That is fine for the models soups are usually made of on one machine;
the final soup is then written by the streaming merge engine (`alloy.merge.api.merge`), whose
memory does not grow with the model.

The average is the registered `linear` merge method with equal weights, computed in fp32 and
rounded to the ingredients' stored dtype, which is exactly what the final `merge()` writes; so
the score of a candidate soup in memory is the score of the folder that would be written
(tests/soup/test_soup_make.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alloy.errors import AlloyError
from alloy.eval import ModelScorer, load_scorer
from alloy.io import Checkpoint
from alloy.merge.registry import get_method

LINEAR = get_method("linear")


def stored_float_dtype(path: Path, *, allow_pickle: bool = False) -> torch.dtype | None:
    """The one floating dtype a checkpoint stores its weights in (None when it mixes several)."""
    with Checkpoint.open(path, allow_pickle=allow_pickle) as checkpoint:
        dtypes = {
            info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point
        }
    return dtypes.pop() if len(dtypes) == 1 else None


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict, floats in fp32; tied tensors are copied once."""
    copies: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in copies:
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            copies[key] = tensor.detach().to("cpu", dtype, copy=True)
        state[name] = copies[key]
    return state


class Kitchen:
    """Ingredients in memory and one model to cook candidate soups in.

    Build it with `Kitchen.load(paths)`; `scorer(subset)` returns the vessel holding the uniform
    average of `subset` (indices into `paths`), ready for `alloy.eval.evaluate`.
    """

    def __init__(
        self,
        vessel: ModelScorer,
        states: Sequence[dict[str, torch.Tensor]],
        stored_dtypes: Sequence[torch.dtype | None],
    ) -> None:
        if not states or len(states) != len(stored_dtypes):
            raise ValueError("need one stored dtype per ingredient, and at least one ingredient")
        self.vessel = vessel
        self.states = list(states)
        self.stored_dtypes = list(stored_dtypes)
        self._targets = vessel.model.state_dict()  # shares storage with the vessel's weights
        owned = {t.data_ptr() for t in (*vessel.model.parameters(), *vessel.model.buffers())}
        copies = [name for name, t in self._targets.items() if t.data_ptr() not in owned]
        if copies:  # writing into a converted copy would leave the model unchanged
            raise AlloyError(f"the model's state dict holds copies, not its weights: {copies[:3]}")
        names = set(self._targets)
        for k, state in enumerate(self.states):
            if set(state) != names:
                missing = sorted(names ^ set(state))[:3]
                raise AlloyError(f"ingredient {k} loads with different tensors ({missing} ...)")

    @classmethod
    def load(
        cls,
        paths: Sequence[Path],
        *,
        device: str = "cpu",
        allow_pickle: bool = False,
        on_load: Callable[[int], None] | None = None,
    ) -> Kitchen:
        """Load every ingredient once (fp32), keep its weights, keep the first as the vessel."""
        vessel = load_scorer(paths[0], device=device, allow_pickle=allow_pickle, name="soup")
        states = [snapshot(vessel.model)]
        if on_load is not None:
            on_load(0)
        for k, path in enumerate(paths[1:], 1):
            model = load_scorer(path, allow_pickle=allow_pickle).model
            states.append(snapshot(model))
            del model
            if on_load is not None:
                on_load(k)
        dtypes = [stored_float_dtype(p, allow_pickle=allow_pickle) for p in paths]
        return cls(vessel, states, dtypes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the ingredients' weights (tied tensors counted once)."""
        seen = {t.data_ptr(): t.nbytes for state in self.states for t in state.values()}
        return sum(seen.values())

    def average(self, subset: Sequence[int], name: str) -> torch.Tensor:
        """One tensor of the soup of `subset`, as `merge()` would write it, in fp32.

        The order of `subset` is the order of the summation (the written recipe uses the same).
        """
        inputs = [self.states[k][name] for k in subset]  # each [*shape]
        if not inputs[0].is_floating_point():
            return inputs[0]
        soup = inputs[0] if len(inputs) == 1 else LINEAR(inputs, weight=[1.0] * len(inputs))
        stored = self.stored_dtypes[subset[0]]  # merge() writes in its first model's dtype
        return soup.to(stored).float() if stored not in (None, torch.float32) else soup

    @torch.no_grad()
    def scorer(self, subset: Sequence[int]) -> ModelScorer:
        """The vessel, its weights replaced by the uniform average of `subset`."""
        if not subset:
            raise ValueError("a soup needs at least one ingredient")
        for name, target in self._targets.items():
            target.copy_(self.average(subset, name))
        return self.vessel
