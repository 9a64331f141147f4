"""`BASE+ADAPTER`: a base checkpoint seen with an adapter folded in, one tensor at a time.

`AdaptedCheckpoint` is a `Checkpoint` whose `read(name, rows)` returns the base tensor (or the
requested rows of it) with the adapter's update added in fp32 and cast back to the stored dtype,
so the merge engine and MoE upcycling stream it exactly like a folded model on disk: memory
holds the adapter's small factors plus the one tensor being read. The spelling is mergekit's
(`model: path/to/base+path/to/lora`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from alloy.adapters.delta import Factors, fold
from alloy.adapters.peftfile import Adapter, fit_to, is_adapter, read_adapter
from alloy.errors import CheckpointError, InputError, ProblemCollector
from alloy.io import Checkpoint


def split_spec(spec: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """`BASE+ADAPTER` -> (BASE, ADAPTER); a path that exists as written is taken literally.

    Of the places a `+` could split the text, the first whose right side is an adapter folder
    (it holds adapter_config.json) wins, so folder names may themselves contain `+`.
    """
    text = os.fspath(spec)
    if "+" not in text or Path(text).exists():
        return Path(text), None
    for at in (k for k, ch in enumerate(text) if ch == "+"):
        base, adapter = text[:at], text[at + 1 :]
        if base and adapter and is_adapter(adapter):
            return Path(base), Path(adapter)
    base, adapter = text.rsplit("+", 1)
    return Path(base), Path(adapter)


FOLD_ELEMENTS = 1 << 16  # ΔW rows formed at once: 256 KB of fp32, in cache while it is added


class AdaptedCheckpoint(Checkpoint):
    """A base model with one adapter folded in on read (same names, shapes and dtypes)."""

    def __init__(self, base: Checkpoint, adapter: Adapter, spec: str) -> None:
        super().__init__(base.path, base.format, base.files, dict(base.tensors), base.config)
        self._base = base
        self.adapter = adapter
        self.spec = spec

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        factors = self.adapter.modules.get(name)
        whole = factors is not None and factors.magnitude is not None and factors.transposed
        base = self._base_tensor(name, None if whole else rows)
        if factors is None:
            return base
        if whole:
            folded = fold(base, factors)
            return folded if rows is None else folded[rows[0] : rows[1]].contiguous()
        _fold_in_place(base, factors, 0 if rows is None else rows[0])
        return base

    def _base_tensor(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """The base's tensor, or the adapter's saved copy of it (modules_to_save, embeddings)."""
        replacement = self.adapter.full.get(name)
        if replacement is None:
            return self._base.read(name, rows)
        tensor = replacement.to(self.info(name).dtype)
        return (tensor if rows is None else tensor[rows[0] : rows[1]]).clone()

    def close(self) -> None:
        self._base.close()
        super().close()

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({self.spec!r})"


def _fold_in_place(weight: torch.Tensor, f: Factors, start: int) -> None:
    """`weight` (stored rows [start, start + len) of a tensor) <- fold(weight, f), in place.

    Plain LoRA and VeRA: W + B'·A' with every scale in B' (Factors.low_rank), the sum `fold`
    computes. ΔW is formed in canonical chunks of about FOLD_ELEMENTS, aligned to row 0 of the
    tensor, whatever rows are asked for: a matrix product's rounding depends on its shape (one
    row goes to gemv, few rows to other kernels), so this is what makes a row block read by the
    streaming engine bit-identical to the same rows of a whole read. The fp32 scratch stays at
    one chunk whatever the tensor's size (a whole 5632 x 2048 ΔW alone is 46 MB), small enough
    to stay in cache while the rows are added to it.
    DoRA rows go through `fold` itself (equal to float rounding across splits).
    """
    if f.magnitude is not None:
        step = max(1, FOLD_ELEMENTS // max(1, weight[0].numel())) if weight.shape[0] else 1
        for a in range(0, weight.shape[0], step):
            b = min(a + step, weight.shape[0])
            weight[a:b] = fold(weight[a:b], f, (start + a, start + b))
        return
    B, A = f.low_rank()  # (out, r), (r, in)
    left, right = (A.T, B.T) if f.transposed else (B, A)  # (stored rows, r), (r, stored cols)
    stop, total = start + weight.shape[0], left.shape[0]
    step = max(1, FOLD_ELEMENTS // max(1, right.shape[1]))
    for c0 in range(start - start % step, stop, step):
        c1 = min(c0 + step, total)
        update = left[c0:c1] @ right  # (c1 - c0, cols): the same product for every split
        a, b = max(c0, start), min(c1, stop)
        rows = weight[a - start : b - start]
        rows.copy_(update[a - c0 : b - c0].add_(rows))  # fp32 += stored rows, cast back


def open_adapted(
    base: str | os.PathLike[str], adapter: str | os.PathLike[str], *, allow_pickle: bool = False
) -> AdaptedCheckpoint:
    """Open BASE (headers only) and ADAPTER (its small tensors), checking they fit each other.

    Raises:
        CheckpointError: the base is unreadable.
        InputError: the adapter is unreadable or was made for another base shape (every
            mismatching tensor listed).
    """
    checkpoint = Checkpoint.open(base, allow_pickle=allow_pickle)
    try:
        loaded = read_adapter(adapter)
        problems = ProblemCollector()
        fit_to(loaded, {n: i.shape for n, i in checkpoint.tensors.items()}, problems)
        problems.raise_if_any(InputError, f"{adapter} does not fit {base}")
    except BaseException:
        checkpoint.close()
        raise
    return AdaptedCheckpoint(checkpoint, loaded, f"{base}+{adapter}")


def fold_into(module: torch.nn.Module, spec: str | os.PathLike[str]) -> None:
    """Overwrite the tensors an adapter changes in `module` (BASE, loaded by transformers) with
    their folded values, as read from `BASE+ADAPTER`: the module then computes what the folded
    model on disk would, in the dtype it was loaded in.

    Raises:
        CheckpointError: the adapter is missing, or changes a tensor the module does not have.
        InputError: the adapter is unreadable or does not fit BASE.
    """
    with open_model(spec) as adapted:
        if not isinstance(adapted, AdaptedCheckpoint):
            return
        state = module.state_dict()
        missing = [name for name in adapted.adapter.names if name not in state]
        if missing:
            raise CheckpointError(
                f"{spec}: the loaded model has no parameter {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            )
        with torch.no_grad():
            for name in adapted.adapter.names:
                state[name].copy_(adapted.read(name))


def open_model(spec: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """A model folder, a `.safetensors` file, or `BASE+ADAPTER` (the adapter folded on read)."""
    base, adapter = split_spec(spec)
    if adapter is None:
        return Checkpoint.open(base, allow_pickle=allow_pickle)
    if not adapter.exists():
        raise CheckpointError(f"{spec}: no adapter folder {adapter}")
    return open_adapted(base, adapter, allow_pickle=allow_pickle)
