"""Combine adapters: their exact weighted sum, or a task-vector merge of their updates.

`sum` writes Σ w_i ΔW_i exactly as one LoRA module per weight by stacking the ranks
([w_1 B_1 | w_2 B_2 | ...] · [A_1; A_2; ...]); `linear` does the same with the weights
normalised to sum to 1 (mergekit's default). PEFT's `add_weighted_adapter(..., "linear")`
instead scales A and B by √w_i each and adds them, which creates cross terms B_i A_j and is not
the weighted sum. Any merge method that works on task vectors (task_arithmetic, ties,
dare_linear, dare_ties, breadcrumbs, della, ...) is applied to the dense updates ΔW_i of one
module at a time against a zero base (so τ_i = ΔW_i exactly) with the merge engine's own
maths; its result is generally full-rank and is SVD-truncated to `rank` (default: the stacked
rank) with the retained energy reported, or folded into the base exactly.

Every check runs before any tensor data is read; every problem is reported at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloy.adapters.adapted import open_adapted
from alloy.adapters.delta import Factors, concat, delta, fold, lowrank_truncate, truncate
from alloy.adapters.peftfile import Adapter, fit_to, read_adapter, write_lora
from alloy.errors import InputError, ProblemCollector, did_you_mean
from alloy.io import Checkpoint, TensorSpec, check_writable
from alloy.io.atomic import check_output_folder
from alloy.io.writer import CheckpointWriter
from alloy.merge.api import merge_state_dicts
from alloy.merge.registry import all_methods, get_method

EXACT = ("sum", "linear")
REPORT = "lora_merge.json"


def dense_methods() -> list[str]:
    """Merge methods of weighted task vectors against a base, usable on adapter updates."""
    return sorted(
        name
        for name, spec in all_methods().items()
        if spec.base == "required" and "weight" in spec.params
    )


@dataclass
class ModuleReport:
    """One output weight: its rank (None when folded) and the share of the merged update kept."""

    name: str
    rank: int | None
    energy: float
    error: float


@dataclass
class CombineResult:
    out: Path
    method: str
    folded: bool
    modules: list[ModuleReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        errors = sorted(m.error for m in self.modules)
        return {
            "method": self.method,
            "folded": self.folded,
            "modules": len(self.modules),
            "median_error": errors[len(errors) // 2] if errors else 0.0,
            "max_error": errors[-1] if errors else 0.0,
            "min_energy": min((m.energy for m in self.modules), default=1.0),
        }


def _parse_params(
    method: str, params: Mapping[str, Any], n: int, problems: ProblemCollector
) -> dict[str, Any]:
    if method in EXACT:
        if params:
            problems.add("--param", f"{method} takes no parameters, got {sorted(params)}")
        return {}
    spec = get_method(method)
    if n < spec.min_models:
        problems.add("ADAPTER", f"{method} needs at least {spec.min_models} adapters, got {n}")
    checked: dict[str, Any] = {}
    for name, value in params.items():
        param = spec.params.get(name)
        if param is None or name == "weight":
            hint = "weights are given with --weights" if name == "weight" else None
            problems.add(
                f"--param {name}",
                f"{method} has no such parameter",
                hint or did_you_mean(name, [p for p in spec.params if p != "weight"], "parameters"),
            )
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and (not param.per_model or len(value) != n):
            problems.add(
                f"--param {name}",
                f"gives {len(value)} values" + ("" if param.per_model else " to a shared value"),
                f"give one value, or one per adapter ({n})" if param.per_model else "one value",
            )
            continue
        if param.range is not None:
            for v in values:
                if isinstance(v, (int, float)) and float(v) not in param.range:
                    problems.add(f"--param {name}", f"{v} is outside {param.range}")
        checked[name] = value
    return checked


def check_combine(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None,
    *,
    method: str = "sum",
    base: str | os.PathLike[str] | None = None,
    fold_base: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    params: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> tuple[list[Adapter], list[float], dict[str, Any]]:
    """Every check of `combine_adapters`, before any merged tensor is computed."""
    problems = ProblemCollector()
    known = [*EXACT, *dense_methods()]
    if method not in known:
        problems.add(
            "--method", f"unknown method {method!r}", did_you_mean(method, known, "methods")
        )
    if not adapters:
        problems.add("ADAPTER", "give at least one adapter folder")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        problems.add(
            "--weights",
            f"{len(weights)} weights for {len(adapters)} adapters",
            "give one weight per adapter",
        )
    for w in weights:
        if not math.isfinite(w):
            problems.add("--weights", f"{w} is not a finite number")
    if method == "linear" and weights and math.isclose(sum(weights), 0.0, abs_tol=1e-12):
        problems.add(
            "--weights",
            "linear normalises by the sum of the weights, which is 0",
            "use --method sum",
        )
    if rank is not None and energy is not None:
        problems.add("--rank", "give --rank or --energy, not both")
    if rank is not None and rank < 1:
        problems.add("--rank", f"must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        problems.add("--energy", f"must be in (0, 1], got {energy}")
    if fold_base and (rank is not None or energy is not None):
        problems.add(
            "--rank",
            "--fold writes the exact merged update; --rank/--energy shape adapter outputs only",
        )
    if fold_base and base is None:
        problems.add("--fold", "folding needs the base model", "give --base BASE")
    checked_params = (
        _parse_params(method, params or {}, len(adapters), problems) if (method in known) else {}
    )
    loaded: list[Adapter] = []
    for path in adapters:
        try:
            loaded.append(read_adapter(path))
        except InputError as exc:
            problems.extend(exc.problems) if exc.problems else problems.add(str(path), exc.message)
    shapes: dict[str, tuple[int, ...]] | None = None
    if base is not None:
        try:
            with Checkpoint.open(base) as checkpoint:
                shapes = {n: i.shape for n, i in checkpoint.tensors.items()}
        except InputError as exc:
            problems.add(f"--base {base}", exc.message)
    for adapter in loaded:
        if shapes is not None:
            fit_to(adapter, shapes, problems)
            continue
        needs = [
            n for n, f in adapter.modules.items() if f.magnitude is not None or f.kind == "vera"
        ]
        if needs:
            problems.add(
                str(adapter.path),
                f"DoRA/VeRA modules ({needs[0]}, ...) need the base weights",
                "give --base BASE",
            )
        if adapter.full:
            problems.add(
                str(adapter.path),
                f"saved full copies ({next(iter(adapter.full))}) "
                "are merged as updates over the base",
                "give --base BASE",
            )
    _check_layouts(loaded, problems)
    if out is not None:
        try:
            check_writable(out, "OUT")
            check_output_folder(Path(out), force=force)
        except InputError as exc:
            problems.add("OUT", exc.message)
    problems.raise_if_any(InputError, "cannot merge these adapters")
    return loaded, weights, checked_params


def _check_layouts(adapters: list[Adapter], problems: ProblemCollector) -> None:
    seen: dict[str, tuple[tuple[int, int], bool, str]] = {}
    for adapter in adapters:
        for name, f in adapter.modules.items():
            first = seen.setdefault(name, (f.shape, f.transposed, str(adapter.path)))
            if (f.shape, f.transposed) != first[:2]:
                problems.add(
                    f"{adapter.path}: {name}",
                    f"shape {f.shape} differs from {first[0]} in {first[2]}",
                    "adapters of one base model only",
                )


def _effective(f: Factors, base: torch.Tensor | None) -> torch.Tensor:
    """The update a module applies: B·A, or for DoRA fold(W) − W (which needs W)."""
    if f.magnitude is None:
        return delta(f)
    assert base is not None
    return fold(base, f).float() - base.float()


def combine_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    method: str = "sum",
    base: str | os.PathLike[str] | None = None,
    fold_base: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    force: bool = False,
) -> CombineResult:
    """Merge adapters into one adapter folder (or, with `fold_base`, a full model folder).

    Args:
        adapters: PEFT adapter folders of one base model.
        weights: one per adapter (default 1 each); `linear` normalises them to sum to 1.
        method: `sum`, `linear` (exact, stacked ranks) or a task-vector merge method.
        base: the base model folder; needed for DoRA/VeRA inputs, saved full copies and folding,
            and used to check every adapter's shapes.
        fold_base: write BASE with the merged update folded in, instead of an adapter.
        rank / energy: truncate each output module to this rank, or to the smallest rank that
            keeps this share of its squared norm (default: exact for sum/linear, the stacked
            rank for other methods).
        params: the merge method's other parameters (e.g. density), by recipe name.
    """
    loaded, weights, checked = check_combine(
        adapters,
        weights,
        method=method,
        base=base,
        fold_base=fold_base,
        rank=rank,
        energy=energy,
        params=params,
        out=out,
        force=force,
    )
    if method == "linear":
        total = sum(weights)
        weights = [w / total for w in weights]
    names = list(dict.fromkeys(n for a in loaded for n in a.names))
    result = CombineResult(Path(out), method, fold_base)
    base_ckpt = Checkpoint.open(base) if base is not None else None
    try:
        updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, A), out × in
        dense: dict[str, torch.Tensor] = {}  # merged updates in the stored layout (--fold)
        full: dict[str, torch.Tensor] = {}  # merged saved copies
        for name in names:
            W = base_ckpt.read(name) if base_ckpt is not None else None
            first = next((a.modules[name] for a in loaded if name in a.modules), None)
            merged = _merge_one(name, loaded, weights, method, checked, seed, W)
            if isinstance(merged, tuple):  # exact stacked factors
                B, A = merged
                if fold_base:
                    assert first is not None
                    dense[name] = _stored_layout(B @ A, first)
                    result.modules.append(ModuleReport(name, None, 1.0, 0.0))
                elif rank is not None or energy is not None:
                    cut = lowrank_truncate(B, A, rank=rank, energy=energy)
                    updates[name] = (cut.B, cut.A)
                    result.modules.append(ModuleReport(name, cut.rank, cut.energy, cut.error))
                else:
                    updates[name] = (B, A)
                    result.modules.append(ModuleReport(name, int(A.shape[0]), 1.0, 0.0))
            elif fold_base:
                dense[name] = merged
                result.modules.append(ModuleReport(name, None, 1.0, 0.0))
            elif first is None:  # only saved full copies: the merged copy is saved in full
                assert W is not None
                full[name] = (W.float() + merged).to(W.dtype)
                result.modules.append(ModuleReport(name, None, 1.0, 0.0))
            else:
                stacked = sum(a.modules[name].rank for a in loaded if name in a.modules)
                oriented = merged.T if first.transposed else merged
                cut = truncate(
                    oriented, rank=None if energy is not None else (rank or stacked), energy=energy
                )
                updates[name] = (cut.B, cut.A)
                result.modules.append(ModuleReport(name, cut.rank, cut.energy, cut.error))
        report = (
            json.dumps(
                {
                    "summary": result.summary(),
                    "inputs": [str(a.path) for a in loaded],
                    "weights": weights,
                    "params": checked,
                    "seed": seed,
                    "modules": [asdict(m) for m in result.modules],
                },
                indent=2,
            )
            + "\n"
        )
        if fold_base:
            assert base_ckpt is not None
            _write_folded(base_ckpt, out, dense, report, force)
        else:
            embeddings = {n for a in loaded for n, f in a.modules.items() if f.embedding}
            write_lora(
                out,
                updates,
                base_model=str(base) if base is not None else loaded[0].base_model,
                full=full,
                transposed=_transposed(loaded),
                embeddings=embeddings,
                force=force,
                extra_files={REPORT: report},
            )
    finally:
        if base_ckpt is not None:
            base_ckpt.close()
    return result


def _stored_layout(update: torch.Tensor, f: Factors) -> torch.Tensor:
    """An (out × in) update in the layout its weight is stored in."""
    return update.T.contiguous() if f.transposed else update


def _merge_one(
    name: str,
    loaded: list[Adapter],
    weights: list[float],
    method: str,
    params: dict[str, Any],
    seed: int,
    W: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Stacked (B, A) for exact methods on plain low-rank modules; else the dense merged ΔW
    (in the stored layout)."""
    parts = [(w, a.modules.get(name)) for w, a in zip(weights, loaded, strict=True)]
    low_rank = all(f is None or f.magnitude is None for _, f in parts) and not any(
        name in a.full for a in loaded
    )
    if method in EXACT and low_rank:
        present = [(w, f) for w, f in parts if f is not None]
        return concat(present)
    updates = []
    for adapter in loaded:
        f = adapter.modules.get(name)
        if name in adapter.full:
            assert W is not None
            replaced = adapter.full[name].float()
            update = replaced - W.float() if f is None else fold(replaced, f).float() - W.float()
        elif f is not None:
            update = _effective(f, W)
        else:
            shape = (
                next(a.modules[name].shape for a in loaded if name in a.modules)
                if W is None
                else tuple(W.shape)
            )
            update = torch.zeros(shape)
        updates.append(update)
    if method in EXACT:
        return sum(
            (w * u for w, u in zip(weights, updates, strict=True)), torch.zeros_like(updates[0])
        )
    zero = torch.zeros_like(updates[0])
    merged = merge_state_dicts(
        method,
        [{name: u} for u in updates],
        base={name: zero},
        seed=seed,
        weight=weights,
        **params,
    )
    return merged[name]


def _transposed(loaded: list[Adapter]) -> bool:
    """Conv1D-style (fan_in_fan_out) weights, as every non-embedding module has them."""
    flags = {f.transposed for a in loaded for f in a.modules.values() if not f.embedding}
    return flags == {True}


def _write_folded(
    base: Checkpoint,
    out: str | os.PathLike[str],
    dense: dict[str, torch.Tensor],
    report: str,
    force: bool,
) -> None:
    """BASE with each merged update added (fp32 maths, base dtypes), streamed tensor by tensor."""
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in base.tensors.items()]
    with CheckpointWriter(
        out, specs, force=force, donor=base.path, extra_files={REPORT: report}
    ) as writer:
        for name, info in base.tensors.items():
            tensor = base.read(name)
            if name in dense:
                tensor = (tensor.float() + dense[name]).to(info.dtype)
            writer.write(name, tensor)


def fold_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Path:
    """Write BASE with ADAPTER folded in (PEFT's merge_and_unload, streamed, base dtypes)."""
    check_writable(out, "OUT")
    check_output_folder(Path(out), force=force)
    with open_adapted(base, adapter) as adapted:
        specs = [TensorSpec(n, i.shape, i.dtype) for n, i in adapted.tensors.items()]
        with CheckpointWriter(out, specs, force=force, donor=adapted.path) as writer:
            for name in adapted.tensors:
                writer.write(name, adapted.read(name))
    return Path(out)
