"""Apply an averaging rule to an fp32 average from tensors of another dtype or device.

The rules (alloy.average.rules) take fp32 lists on one device. Parameters already like that go
to the rule directly. The others (bf16/fp16 weights; any weights when the average is offloaded
to the CPU) are cast through a small fp32 staging buffer, chunk by chunk: one fused copy (the
cast, and the host copy when offloading), then the rule, per chunk of at most
`STAGING_ELEMENTS` elements. Why chunks: a whole-model fp32 cast would add 4 bytes per
parameter of transient memory (and on CPU, page faults that cost more than the update); a 1 MiB
chunk is still in cache when the rule reads it back.

The chunk views are planned once and reused while the same tensors hold the same storage:
slicing ~200 pieces anew costs about 10% of a bf16 update on CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch

from alloy.average import rules

Tensors = list[torch.Tensor]
Rule = Callable[[Tensors, Tensors], None]
_Chunk = tuple[Tensors, Tensors, Tensors]  # average pieces, current pieces, staging views
_Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (fp32 average, current tensor)

# fp32 elements staged per chunk. CPU: 1 MiB, so the cast chunk stays in L2 for the rule. GPUs:
# 64 MiB, so a chunk is a few large fused launches.
STAGING_ELEMENTS = {"cpu": 1 << 18}
STAGING_ELEMENTS_DEFAULT = 1 << 24


def copy_(targets: Tensors, sources: Tensors) -> None:
    """targets[i] <- sources[i] (cast to the target's dtype), fused when on one device."""
    if all(t.device == s.device for t, s in zip(targets, sources, strict=True)):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)


class Stager:
    """Holds the staging buffers and chunk plans of one average (one buffer per device).

    With `compile=True`, tensors of another dtype on the average's own device skip the staging
    buffer: a `torch.compile`d loop casts and lerps them in one pass. If compiling fails (no
    compiler on the machine, say) a warning is given and staging is used from then on.
    """

    def __init__(self, *, compile: bool = False) -> None:
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._plans: dict[torch.device, tuple[tuple[tuple[int, int], ...], list[_Chunk]]] = {}
        self._compiled: Callable[..., None] | None = None
        if compile:
            self._compiled = torch.compile(rules.lerp_cast_, fullgraph=True, dynamic=False)

    @property
    def compiled(self) -> bool:
        """Whether the compiled cast-and-lerp path is in use."""
        return self._compiled is not None

    @torch.no_grad()
    def lerp_(self, averages: Tensors, current: Tensors, weight: float) -> None:
        """averages <- lerp(averages, current, weight), `current` cast as in `apply`."""
        if self._compiled is not None:
            near = [
                i
                for i, (a, t) in enumerate(zip(averages, current, strict=True))
                if a.device == t.device and a.dtype != t.dtype
            ]
            if near:
                try:
                    w = torch.tensor(weight, dtype=torch.float32, device=averages[near[0]].device)
                    self._compiled([averages[i] for i in near], [current[i] for i in near], w)
                except Exception as error:  # compiling failed before any tensor was written
                    warnings.warn(
                        f"torch.compile of the fused cast-and-lerp failed ({type(error).__name__}:"
                        f" {str(error).splitlines()[0] if str(error) else ''}); using the "
                        "staging buffer instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self._compiled = None
                else:
                    done = set(near)
                    averages = [a for i, a in enumerate(averages) if i not in done]
                    current = [t for i, t in enumerate(current) if i not in done]
        if averages:
            self.apply(partial(rules.lerp_, weight=weight), averages, current)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    @torch.no_grad()
    def apply(self, rule: Rule, averages: Tensors, current: Tensors) -> None:
        """rule(averages, current) with `current` cast to each average's dtype and device."""
        direct_average: Tensors = []
        direct_current: Tensors = []
        staged: dict[torch.device, _Pairs] = {}
        for average, tensor in zip(averages, current, strict=True):
            if tensor.dtype == average.dtype and tensor.device == average.device:
                direct_average.append(average)
                direct_current.append(tensor)
            else:
                staged.setdefault(average.device, []).append((average, tensor))
        if direct_average:
            rule(direct_average, direct_current)
        for device, pairs in staged.items():
            for average_pieces, current_pieces, stage in self._plan(device, pairs):
                copy_(stage, current_pieces)
                rule(average_pieces, stage)

    def _plan(self, device: torch.device, pairs: _Pairs) -> list[_Chunk]:
        """The chunks of `pairs`, cached by (tensor id, data_ptr).

        The cached views keep their storage alive, so a tensor given new storage (e.g. by
        `model.to()` or `p.data = ...`) cannot show the same data_ptr again: the key notices.
        Non-contiguous tensors are flattened by copying, so their plans are never cached.
        """
        key = tuple((id(tensor), tensor.data_ptr()) for _, tensor in pairs)
        cached = self._plans.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        chunks = list(self._chunks(device, pairs))
        if all(tensor.is_contiguous() for _, tensor in pairs):
            self._plans[device] = (key, chunks)
        return chunks

    def _chunks(self, device: torch.device, pairs: _Pairs) -> Iterator[_Chunk]:
        """Groups of (average pieces, current pieces, staging views) of at most the budget;
        large tensors are split, small ones share a group."""
        budget = STAGING_ELEMENTS.get(device.type, STAGING_ELEMENTS_DEFAULT)
        size = min(budget, sum(average.numel() for average, _ in pairs))
        scratch = self._scratch.get(device)
        if scratch is None or scratch.numel() < size:
            scratch = torch.empty(size, dtype=torch.float32, device=device)
            self._scratch[device] = scratch
        average_pieces: Tensors = []
        current_pieces: Tensors = []
        stage: Tensors = []
        used = 0
        for average, tensor in pairs:
            flat_average = average.view(-1)  # [numel]
            flat_tensor = tensor.detach().reshape(-1)  # [numel]; a view unless non-contiguous
            begin, numel = 0, flat_average.numel()
            while begin < numel:
                if used == budget:
                    yield average_pieces, current_pieces, stage
                    average_pieces, current_pieces, stage, used = [], [], [], 0
                end = min(numel, begin + budget - used)
                average_pieces.append(flat_average[begin:end])
                current_pieces.append(flat_tensor[begin:end])
                stage.append(scratch[used : used + end - begin])
                used += end - begin
                begin = end
        if average_pieces:
            yield average_pieces, current_pieces, stage
