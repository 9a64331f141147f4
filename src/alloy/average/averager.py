"""Online weight averaging: EMA, SWA or LaWA of a model along training, in fp32, without syncs.

Call `update(model)` after every optimizer step; read the average with `averaged_state_dict()`,
`copy_to(model)` or `save_pretrained(model, out)`. The maths is in alloy.average.rules; this
module owns precision, memory, placement and step counting.

Why not torch.optim.swa_utils.AveragedModel, which does the same job:
- It deep-copies the model, so a bf16 model gets a bf16 average. At decay 0.999 an EMA update
  moves a weight by 0.001 * (x - s), below half a bf16 ulp of s (at least 2^-9 * |s|) unless x
  and s differ by about 2 |s| or more: the bf16 EMA stalls at its first value. Here the average
  is always fp32 (4 bytes per parameter, beside a bf16 model's 2).
- Its update reads a tensor counter on the host (`n_averaged == 0`), a device sync per update.
  Here counters are Python ints and an update is a few fused multi-tensor kernels.
- It holds a second copy of the whole module (buffers, hooks, caches); here only the tensors that
  are averaged are held.

Memory and speed, per averaged parameter:
- EMA and SWA hold one fp32 tensor per unique floating parameter. Tied parameters (an embedding
  shared with the LM head) are one Parameter object, listed once by `model.parameters()`, so
  they are averaged once and written under both names.
- Parameters that are not fp32, or that live on another device than the average (`offload`),
  are cast chunk by chunk through a small fp32 staging buffer (alloy.average.staging), so
  transient memory stays bounded and the update stays two fused kernels per chunk.
- LaWA holds the k latest snapshots in the model's own dtype: they are exact copies, so storing
  them in fp32 would double the memory of a bf16 model for nothing. The mean is computed in
  fp32 tensor by tensor when it is read (saves are rare; updates are not). A running fp32 sum
  updated with "add newest, subtract oldest" would cost 4 more bytes per parameter and
  accumulate rounding drift over a long run; k snapshots are the minimum the rule needs.
- With `offload`, the average lives in CPU memory; each update then copies the parameters to
  the host, which waits for the device: use it with `every` > 1.
- Memory is allocated when the averager is built, so an out-of-memory error happens at the
  start of training, not hours in.

Buffers: by default they are not averaged; the average takes the model's current buffers, like
AveragedModel(use_buffers=False). Transformers' buffers are constants (rotary frequencies) or
not saved at all. With `average_buffers=True`, persistent floating buffers (e.g. BatchNorm
running statistics) are averaged with the same rule as the parameters, like
AveragedModel(use_buffers=True); integer buffers (`num_batches_tracked`) are taken from the
current model rather than averaged.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alloy.average import rules
from alloy.average.options import AveragingOptions, Method
from alloy.average.staging import Stager, copy_
from alloy.errors import InputError
from alloy.io.atomic import AtomicFolder
from alloy.io.sidefiles import TOKENIZER_FILES, side_files
from alloy.io.writer import check_finite

Tensors = list[torch.Tensor]


class WeightAverager:
    """A running average of a model's weights (fp32), updated after optimizer steps.

    Args:
        model: the model being trained; its floating parameters (each unique tensor once) are
            averaged. Build the averager after the model is on its device.
        method: "ema" (exponential moving average), "swa" (uniform mean of every collected
            model) or "lawa" (uniform mean of the latest `k` collected models).
        decay: EMA decay beta (default 0.999); the average moves by (1 - beta) per update.
        warmup: EMA decay warm-up beta_t = min(decay, (1 + t) / (10 + t)).
        bias_correction: EMA starting from zero, divided by 1 - prod(beta_t) when read,
            instead of starting from the first model.
        start: first optimizer step whose weights are collected (default 0: from the first).
        every: collect every `every` optimizer steps from `start` (default 1).
        k: LaWA: how many of the latest collected models to average (default 5).
        offload: keep the average in CPU memory instead of beside the parameters.
        average_buffers: also average persistent floating buffers (see the module docstring).
        trainable_only: average only parameters with requires_grad; frozen ones are read from
            the model (an adapter run then holds no average of the frozen base).
        compile: EMA/SWA of a bf16/fp16 model: fuse the cast into the lerp with torch.compile
            (one pass over the weights instead of cast-then-lerp through a staging buffer;
            compiles once, some seconds, on the first update; falls back to staging with a
            warning if compiling fails). Default None: on when at least
            `AUTO_COMPILE_ELEMENTS` low-precision parameters sit on the average's device and
            a compiler is there (a C++ compiler on CPU, triton on CUDA); off for smaller
            models, where staging costs little and compiling would dominate.

    See alloy.average.rules for the exact formulas.

    Raises:
        InputError: invalid options (all listed), or a model with nothing to average.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: Method,
        decay: float | None = None,
        warmup: bool | None = None,
        bias_correction: bool | None = None,
        start: int = 0,
        every: int = 1,
        k: int | None = None,
        offload: bool = False,
        average_buffers: bool = False,
        trainable_only: bool = False,
        compile: bool | None = None,
    ) -> None:
        options = AveragingOptions.check(
            method,
            decay=decay,
            warmup=warmup,
            bias_correction=bias_correction,
            start=start,
            every=every,
            k=k,
            offload=offload,
            average_buffers=average_buffers,
            trainable_only=trainable_only,
            compile=compile,
        )
        self.options = options
        self.step = 0  # optimizer steps seen
        self.count = 0  # models folded into the average
        self._model = model
        self._buffer_names = (
            [name for name, tensor in _persistent_buffers(model) if tensor.is_floating_point()]
            if options.average_buffers
            else []
        )
        tensors = self._collect(model, check=False)
        if not tensors:
            raise InputError(
                f"{type(model).__name__} has no floating parameters to average"
                + (" that require grad" if options.trainable_only else "")
            )
        slot_of = {id(t): slot for slot, t in enumerate(tensors)}
        # state-dict name -> slot; tied names share a slot.
        self._slots = {
            name: slot_of[id(t)]
            for name, t in model.state_dict(keep_vars=True).items()
            if id(t) in slot_of
        }
        self._dtypes = [t.dtype for t in tensors]
        self._shapes = [t.shape for t in tensors]

        def place(t: torch.Tensor) -> torch.device:
            return torch.device("cpu") if options.offload else t.device

        self._product = 1.0  # prod of the EMA decays applied so far (bias correction)
        self._shadow: Tensors = []
        self._ring: list[Tensors] = []  # LaWA snapshots, oldest at self._next once full
        self._next = 0
        self._filled = 0
        with torch.no_grad():
            if options.method == "lawa":
                self._ring = [
                    [torch.empty(t.shape, dtype=t.dtype, device=place(t)) for t in tensors]
                    for _ in range(options.k)
                ]
            else:
                make = torch.zeros if options.bias_correction else torch.empty
                self._shadow = [
                    make(t.shape, dtype=torch.float32, device=place(t)) for t in tensors
                ]
        self._stager = Stager(compile=_compile_wanted(options, tensors))

    # ---- updating -------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int | None = None) -> bool:
        """Account for one optimizer step; fold the model into the average if this step is
        collected (`start`, `every`). Returns whether it was.

        Args:
            step: the optimizer step just taken (e.g. Trainer's `state.global_step`); by
                default the previous one plus one.
        """
        self.step = self.step + 1 if step is None else step
        options = self.options
        if self.step < options.start or (self.step - options.start) % options.every:
            return False
        current = self._collect(model, check=True)
        if options.method == "lawa":
            copy_(self._ring[self._next], current)
            self._next = (self._next + 1) % options.k
            self._filled = min(self._filled + 1, options.k)
        elif self.count == 0 and not options.bias_correction:
            copy_(self._shadow, current)  # s_1 = x_1 for SWA and copy-init EMA
        elif options.method == "swa":
            self._stager.lerp_(self._shadow, current, rules.swa_weight(self.count))
        else:
            decay = rules.ema_decay(self.count, decay=options.decay, warmup=options.warmup)
            self._stager.lerp_(self._shadow, current, rules.ema_weight(decay))
            self._product *= decay
        self.count += 1
        return True

    def _collect(self, model: nn.Module, *, check: bool) -> Tensors:
        """The averaged tensors of `model`, in slot order (each unique tensor once)."""
        trainable_only = self.options.trainable_only
        tensors: Tensors = [
            p
            for p in model.parameters()  # unique by identity: tied weights once
            if p.is_floating_point() and (p.requires_grad or not trainable_only)
        ]
        if self._buffer_names:
            wanted = set(self._buffer_names)
            tensors += [b for name, b in model.named_buffers() if name in wanted]
        if check and (
            len(tensors) != len(self._shapes)
            or any(t.shape != shape for t, shape in zip(tensors, self._shapes, strict=True))
        ):
            raise InputError(
                f"update(): {type(model).__name__} does not have the tensors this averager "
                f"was built for ({len(tensors)} averaged tensors now, {len(self._shapes)} "
                "then); pass the model given to the averager"
            )
        return tensors

    # ---- reading --------------------------------------------------------------------------

    def _average(self, slot: int, *, fresh: bool) -> torch.Tensor:
        """The fp32 average of one slot; a new tensor if `fresh`, else possibly the shadow."""
        if self.options.method == "lawa":
            k = self.options.k
            order = [(self._next - self._filled + j) % k for j in range(self._filled)]
            return rules.lawa_mean([self._ring[j][slot] for j in order])  # oldest first
        shadow = self._shadow[slot]
        if self.options.bias_correction:
            return shadow / (1.0 - self._product)
        return shadow.clone() if fresh else shadow

    def _require_average(self) -> None:
        if self.count == 0:
            options = self.options
            raise InputError(
                f"no model has been averaged yet ({self.step} steps seen; collecting from step "
                f"{options.start} every {options.every}); call update(model) after optimizer "
                "steps first"
            )

    @torch.no_grad()
    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model as a state dict: the model's names, dtypes and order.

        Tied weights appear under each of their names as one tensor. Entries that are not
        averaged (buffers, frozen parameters with `trainable_only`) are the model's current
        tensors, not copies, as in `nn.Module.state_dict`. Averaged tensors live where the
        average does (the parameters' device, or the CPU with `offload`).
        """
        self._require_average()
        state: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        for name, tensor in self._model.state_dict(keep_vars=True).items():
            slot = self._slots.get(name)
            if slot is None:
                state[name] = tensor.detach()
                continue
            if slot not in done:
                value = self._average(slot, fresh=self._dtypes[slot] == torch.float32)
                done[slot] = value.to(self._dtypes[slot])
            state[name] = done[slot]
        return state

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s averaged tensors with the average (cast to their dtype/device).

        Raises:
            InputError: `model` lacks tensors that are averaged.
        """
        self._require_average()
        state = model.state_dict(keep_vars=True)
        missing = sorted(name for name in self._slots if name not in state)
        if missing:
            raise InputError(
                f"copy_to(): {type(model).__name__} has no {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
        done: set[int] = set()
        for name, slot in self._slots.items():
            target = state[name]
            if id(target) not in done:
                done.add(id(target))
                target.detach().copy_(self._average(slot, fresh=False))

    def save_pretrained(
        self,
        model: Any,
        out: str | os.PathLike[str],
        *,
        force: bool = False,
        tokenizer: Any = None,
        **save_options: Any,
    ) -> Path:
        """Write the averaged model as a Hugging Face folder, atomically.

        Args:
            model: the transformers model (its `save_pretrained` writes the config, generation
                config and weights, dropping tied duplicates as it always does).
            out: destination folder; it appears only once complete.
            force: replace a non-empty `out`.
            tokenizer: a tokenizer or processor (its `save_pretrained` is called), or a folder
                whose tokenizer files and chat templates are copied.
            save_options: passed to `model.save_pretrained` (e.g. max_shard_size).

        Raises:
            OutputExistsError: `out` is not empty and `force` is not given.
        """
        on_cpu: dict[int, torch.Tensor] = {}  # keeps tied names one tensor
        state = {
            name: on_cpu.setdefault(id(t), t.to("cpu"))
            for name, t in self.averaged_state_dict().items()
        }
        check_finite(state.items(), out, "the averaged weights hold NaN/Inf: so did a snapshot")
        with AtomicFolder(out, force=force) as tmp:
            model.save_pretrained(tmp, state_dict=state, **save_options)
            if isinstance(tokenizer, (str, os.PathLike)):
                _copy_tokenizer_files(Path(tokenizer), tmp)
            elif tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(out)

    def save_state(self, folder: str | os.PathLike[str]) -> Path:
        """Write the exact state (fp32 shadow or LaWA snapshots, counters) to
        `folder/averager-state.safetensors`, for resuming (see alloy.average.state)."""
        from alloy.average.state import save_state

        return save_state(self, folder)

    @torch.no_grad()
    def load_state(self, folder: str | os.PathLike[str]) -> None:
        """Continue from a state `save_state` wrote (same method, options and model)."""
        from alloy.average.state import load_state

        load_state(self, folder)

    # ---- accounting -----------------------------------------------------------------------

    @property
    def method(self) -> Method:
        return self.options.method

    @property
    def nbytes(self) -> int:
        """Bytes of averaging state held (average or snapshots, plus staging buffers)."""
        held = self._shadow + [t for snapshot in self._ring for t in snapshot]
        return sum(t.numel() * t.element_size() for t in held) + self._stager.nbytes

    def __repr__(self) -> str:
        o = self.options
        detail = {"ema": f"decay={o.decay}", "swa": "", "lawa": f"k={o.k}"}[o.method]
        return (
            f"WeightAverager({o.method}{', ' + detail if detail else ''}, start={o.start}, "
            f"every={o.every}, tensors={len(self._shapes)}, averaged={self.count}, "
            f"step={self.step})"
        )


# Low-precision parameters from which compile=None turns the fused cast-and-lerp on: below
# this the staged update takes a few milliseconds, less than compiling would cost in a run.
AUTO_COMPILE_ELEMENTS = 10_000_000


def _compile_wanted(options: AveragingOptions, tensors: Tensors) -> bool:
    if options.compile is not None:
        return options.compile
    if options.method == "lawa" or options.offload:
        return False
    low = sum(t.numel() for t in tensors if t.dtype != torch.float32)
    if low < AUTO_COMPILE_ELEMENTS:
        return False
    device = tensors[0].device
    if device.type == "cpu":
        return shutil.which("c++") is not None or shutil.which("g++") is not None
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    state_ids = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for name, buffer in model.named_buffers():
        if id(buffer) in state_ids:
            yield name, buffer


def _copy_tokenizer_files(folder: Path, dest: Path) -> None:
    files = side_files(folder, TOKENIZER_FILES)
    if not files:
        raise InputError(f"{folder}: no tokenizer files to copy (tokenizer.json, ...)")
    for source in files:
        target = dest / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
