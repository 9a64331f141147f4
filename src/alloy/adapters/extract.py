"""A LoRA adapter from a fine-tune: ΔW = W_ft − W_base, truncated by SVD one module at a time.

The best rank-r approximation of ΔW in the Frobenius norm is its truncated SVD (Eckart–Young),
so an extracted LoRA is as close to the fine-tune as rank r allows; what it keeps is reported,
never assumed: per module the rank, the share of ‖ΔW‖² retained (energy) and the relative error
‖ΔW − B·A‖ / ‖ΔW‖ of the factors as written (measured, not derived from singular values).

Streaming: both checkpoints are opened from their headers, checked against each other (every
problem at once), then each tensor pair is read, subtracted in fp32, factored and dropped, so
memory holds one pair plus the small factors. With `rank` much smaller than a matrix, a seeded
randomized SVD (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061; four power
iterations) finds the top subspace at a fraction of a full SVD's cost; B is then the exact
projection ΔW·V, so its error is still measured exactly and is within 0.02% of the optimum on
the spectra we tried (docs/adapters.md). Energy targets need the whole spectrum: exact SVD.

Only 2-D weights of Linear / Conv1D layers become LoRA modules. Embeddings, output heads, norms,
biases and other tensors are "not low-rank": they are compared and listed with their relative
change; with `save_full` the changed ones PEFT can restore become `modules_to_save` copies.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alloy.adapters.adapted import open_model, split_spec
from alloy.adapters.delta import Truncation, truncate
from alloy.adapters.peftfile import write_lora
from alloy.errors import IncompatibleModelsError, InputError, Problem, ProblemCollector
from alloy.io import Checkpoint
from alloy.io.atomic import check_output_folder
from alloy.io.modelinfo import BUFFER_SUFFIXES, INPUT_EMBEDDINGS, OUTPUT_HEADS
from alloy.io.sidefiles import TOKENIZER_FILES, side_files
from alloy.ranges import Range

Svd = Literal["auto", "exact", "randomized"]
SVD_METHODS: tuple[Svd, ...] = ("auto", "exact", "randomized")
RANK = Range(1)
ENERGY = Range(0, 1, low_open=True)
REPORT = "extract.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Model types whose linear layers are transformers' Conv1D, stored (in × out): fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
_EMBEDDINGS = (*INPUT_EMBEDDINGS, "wpe.weight", "embed_positions.weight", "position_embeddings")
# auto: randomized when the rank is at most this share of the smaller side (docs/adapters.md).
_RANDOMIZED_SHARE = 0.25
_POWER_ITERATIONS = 4
_SEED = 0
_BLOCK_ELEMENTS = 1 << 22  # rows read at a time when only norms are needed (16 MiB in fp32)

Kind = Literal["linear", "embedding", "head", "norm", "bias", "other"]


def tensor_kind(name: str, shape: Sequence[int]) -> Kind:
    """What a tensor is, from its name and shape: only `linear` ones are factored."""
    if name.endswith(".bias"):
        return "bias"
    if any(name == s or name.endswith("." + s) for s in OUTPUT_HEADS):
        return "head"
    if any(s in name for s in _EMBEDDINGS):
        return "embedding"
    if len(shape) == 1:
        return "norm" if name.endswith(".weight") else "other"
    return "linear" if len(shape) == 2 and name.endswith(".weight") else "other"


@dataclass(frozen=True)
class ModuleResult:
    """One LoRA module: rank, energy kept, measured relative error, change ‖ΔW‖ / ‖W_base‖."""

    name: str
    shape: tuple[int, ...]
    rank: int
    energy: float
    error: float
    change: float
    svd: str


@dataclass(frozen=True)
class FullResult:
    """A changed tensor that is not low-rank: saved as a full copy, or why not."""

    name: str
    shape: tuple[int, ...]
    kind: str
    change: float
    saved: bool
    why: str | None = None


@dataclass
class Extraction:
    """What `extract_lora` wrote and how much of the fine-tune's change the adapter keeps."""

    out: Path
    finetuned: str
    base: str
    rank: int | None
    energy: float | None
    dtype: str
    modules: list[ModuleResult] = field(default_factory=list)
    full: list[FullResult] = field(default_factory=list)
    unchanged: int = 0
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Squared norms over every changed tensor: of ΔW, and of what the adapter misses.
    delta_sq: float = 0.0
    missed_sq: float = 0.0

    @property
    def total_error(self) -> float:
        """‖ΔW − adapter‖ / ‖ΔW‖ over all changed tensors (dropped ones count whole)."""
        return (self.missed_sq / self.delta_sq) ** 0.5 if self.delta_sq else 0.0

    def as_json(self) -> dict[str, Any]:
        """The report as written to extract.json (a change over a zero base tensor is null)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("out", "delta_sq", "missed_sq")}
        for row in [*data["modules"], *data["full"]]:
            row["change"] = row["change"] if math.isfinite(row["change"]) else None
        return {**data, "total_error": self.total_error}


@dataclass(frozen=True)
class _Plan:
    linear: list[str]
    other: list[str]
    excluded: list[str]
    transposed: bool
    tied: bool


def check_options(
    rank: int | None,
    energy: float | None,
    svd: str,
    include: Sequence[str],
    exclude: Sequence[str],
) -> None:
    """Every problem with the numbers and patterns at once (InputError)."""
    problems = ProblemCollector()
    if (rank is None) == (energy is None):
        problems.add("--rank / --energy", "give exactly one of them")
    if rank is not None and (why := RANK.problem(rank)):
        problems.add("--rank", why)
    if energy is not None and (why := ENERGY.problem(energy)):
        problems.add("--energy", why, "the share of ‖ΔW‖² each module keeps, e.g. 0.9")
    if svd not in SVD_METHODS:
        problems.add("--svd", f"unknown method {svd!r}", f"choose from {', '.join(SVD_METHODS)}")
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.add(f"{option} {pattern!r}", f"not a regular expression ({exc})")
    problems.raise_if_any(InputError, "cannot extract an adapter")


def _open_both(finetuned: str, base: str, allow_pickle: bool) -> tuple[Checkpoint, Checkpoint]:
    opened: list[Checkpoint] = []
    problems: list[Problem] = []
    for what, spec in (("FINETUNED", finetuned), ("BASE", base)):
        try:
            opened.append(open_model(spec, allow_pickle=allow_pickle))
        except InputError as exc:
            problems.append(Problem(f"{what} {spec}", str(exc)))
    if problems:
        for checkpoint in opened:
            checkpoint.close()
        raise InputError("cannot read the models", problems)
    return opened[0], opened[1]


def _plan(
    ft: Checkpoint,
    base: Checkpoint,
    rank: int | None,
    include: Sequence[str],
    exclude: Sequence[str],
) -> _Plan:
    """Names and shapes agree, every matrix can hold the rank: all checked from headers."""
    problems = ProblemCollector()
    ft_info = ft.model_info()
    ft_arch, base_arch = ((m.architecture or m.model_type) for m in (ft_info, base.model_info()))
    if ft_arch and base_arch and ft_arch != base_arch:
        problems.add("", f"FINETUNED is {ft_arch} but BASE is {base_arch}", "same architecture")
    for what, names in (
        ("FINETUNED", [n for n in ft.tensors if n not in base.tensors]),
        ("BASE", [n for n in base.tensors if n not in ft.tensors]),
    ):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.add(what, f"{len(names)} tensors only in {what}: {shown}")
    linear, other, excluded = [], [], []
    too_small: list[str] = []
    for name, info in ft.tensors.items():
        if name not in base.tensors or name.endswith(BUFFER_SUFFIXES):
            continue
        if tuple(base.info(name).shape) != tuple(info.shape):
            problems.add(
                name,
                f"shape {tuple(info.shape)} in FINETUNED but {tuple(base.info(name).shape)} in "
                "BASE",
                "extraction needs a fine-tune of this very base (same vocabulary and sizes)",
            )
            continue
        if tensor_kind(name, info.shape) != "linear":
            other.append(name)
        elif (include and not any(re.search(p, name) for p in include)) or any(
            re.search(p, name) for p in exclude
        ):
            excluded.append(name)
        else:
            linear.append(name)
            if rank is not None and rank > min(info.shape):
                too_small.append(name)
                problems.add(name, f"--rank {rank} exceeds min{tuple(info.shape)}")
    if too_small:
        smallest = min(min(ft.info(n).shape) for n in linear)
        problems.add(
            "--rank",
            f"{len(too_small)} matrices are smaller than rank {rank}",
            f"use --rank {smallest} or less, --exclude those tensors, or --energy",
        )
    problems.raise_if_any(IncompatibleModelsError, "cannot extract an adapter from these models")
    transposed = ft_info.model_type in CONV1D_MODEL_TYPES
    return _Plan(linear, other, excluded, transposed, ft_info.tied_embeddings)


def randomized_truncate(
    matrix: torch.Tensor, rank: int, *, seed: int = _SEED, power_iterations: int = _POWER_ITERATIONS
) -> Truncation:
    """Rank-`rank` factors of `matrix` (out × in, fp32) from a seeded randomized range finder:
    Q spans M·G (G Gaussian, rank + max(10, rank/2) columns) refined by re-orthonormalised power
    iterations; the SVD of the small Qᵀ·M gives V_r, and B = M·V_r is the exact projection, so
    B·A = M·V_r·V_rᵀ and the energy ‖M·V_r‖² / ‖M‖² is exact for these factors."""
    m = matrix.float()
    columns = min(min(m.shape), rank + max(10, rank // 2))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(m.shape[1], columns, generator=generator).to(m.device)  # (in, q)
    Q = torch.linalg.qr(m @ probe).Q  # (out, q)
    for _ in range(power_iterations):
        Q = torch.linalg.qr(m.T @ Q).Q  # (in, q)
        Q = torch.linalg.qr(m @ Q).Q  # (out, q)
    Vh = torch.linalg.svd(Q.T @ m, full_matrices=False).Vh  # (q, in)
    A = Vh[:rank].contiguous()  # (r, in)
    B = m @ A.T  # (out, r)
    total = float(m.double().square().sum())
    energy = float(B.double().square().sum()) / total if total else 1.0
    return Truncation(B, A, rank, min(energy, 1.0), max(0.0, 1.0 - energy) ** 0.5)


def _factor(
    matrix: torch.Tensor, rank: int | None, energy: float | None, svd: Svd
) -> tuple[Truncation, str]:
    """The truncation of one (out × in) delta, and which SVD made it."""
    small = rank is not None and rank <= _RANDOMIZED_SHARE * min(matrix.shape)
    if rank is not None and (svd == "randomized" or (svd == "auto" and small)):
        return randomized_truncate(matrix, rank), "randomized"
    if matrix.shape[0] >= matrix.shape[1]:
        return truncate(matrix, rank=rank, energy=energy), "exact"
    # LAPACK is far slower on wide matrices than on their transposes (768 × 3072: 7-25 s vs
    # 1.4-2.7 s on two busy cores), so factor Mᵀ = B'·A' and return M = A'ᵀ·B'ᵀ.
    cut = truncate(matrix.T.contiguous(), rank=rank, energy=energy)
    return Truncation(cut.A.T, cut.B.T, cut.rank, cut.energy, cut.error), "exact"


def _balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B_k, A_k rescaled to norm √σ_k each: same product, one scale (better for bf16, training)."""
    sigma = torch.linalg.norm(B, dim=0) * torch.linalg.norm(A, dim=1)  # (r,)
    scale = sigma.clamp_min(1e-30).sqrt() / torch.linalg.norm(A, dim=1).clamp_min(1e-30)
    return B / scale, A * scale[:, None]


def extract_lora(
    finetuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    svd: Svd = "auto",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_full: bool = False,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    force: bool = False,
    allow_pickle: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Extraction:
    """Write the LoRA adapter that turns BASE into (nearly) FINETUNED to `out` (a PEFT folder).

    Give `rank` (every module) or `energy` (per module: the least rank keeping that share of
    ‖ΔW‖²). Either model may be `BASE+ADAPTER`. `out` also gets `extract.json` (the report) and
    FINETUNED's tokenizer files; `on_start(n)` and `on_tensor(name)` report progress.
    Raises:
        InputError: bad options, unreadable or incompatible models (every problem listed), a rank
            larger than a matrix, an existing `out` without `force`, or nothing changed.
    """
    check_options(rank, energy, svd, include, exclude)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    out_path = Path(out)
    check_output_folder(out_path, force=force)
    ft_spec, base_spec = os.fspath(finetuned), os.fspath(base)
    for spec in (ft_spec, base_spec):
        folder = split_spec(spec)[0]
        if out_path.exists() and folder.exists() and out_path.resolve() == folder.resolve():
            raise InputError(f"OUT {out_path} is an input model; choose another output folder")
    ft, bs = _open_both(ft_spec, base_spec, allow_pickle)
    with ft, bs:
        plan = _plan(ft, bs, rank, include, exclude)
        result = Extraction(out_path, ft_spec, base_spec, rank, energy, dtype)
        result.excluded = plan.excluded
        if on_start is not None:
            on_start(len(plan.linear) + len(plan.other) + len(plan.excluded))
        factors = _extract_modules(ft, bs, plan, result, svd, DTYPES[dtype], device, on_tensor)
        full = _compare_others(ft, bs, plan, result, save_full, set(factors), on_tensor)
    if not factors:  # PEFT refuses an adapter without modules
        raise InputError(
            f"{ft_spec} vs {base_spec}: no extracted linear weight differs, so "
            "there is no LoRA to write; is FINETUNED a fine-tune of BASE?"
        )
    extra = _tokenizer_files(ft_spec, result)
    extra[REPORT] = json.dumps(result.as_json(), indent=2, allow_nan=False) + "\n"
    write_lora(
        out_path,
        factors,
        base_model=base_spec,
        full=full,
        transposed=plan.transposed,
        dtype=DTYPES[dtype],
        force=force,
        extra_files=extra,
    )
    return result


def _extract_modules(
    ft: Checkpoint,
    bs: Checkpoint,
    plan: _Plan,
    result: Extraction,
    svd: Svd,
    dtype: torch.dtype,
    device: str | torch.device,
    on_tensor: Callable[[str], None] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in plan.linear:
        original = bs.read(name).to(device, torch.float32)
        base_norm = float(torch.linalg.vector_norm(original))
        stored = ft.read(name).to(device, torch.float32).sub_(original)  # ΔW, stored layout
        del original
        matrix = stored.T if plan.transposed else stored  # (out, in)
        norm = float(torch.linalg.vector_norm(matrix))
        if norm == 0.0:
            result.unchanged += 1
        else:
            cut, method = _factor(matrix, result.rank, result.energy, svd)
            B, A = (f.to(dtype) for f in _balanced(cut.B, cut.A))
            # The residual of the factors as written, in place of the delta: ‖ΔW − B·A‖.
            missed = float(torch.linalg.vector_norm(matrix.addmm_(B.float(), A.float(), alpha=-1)))
            factors[name] = (B.cpu(), A.cpu())
            shape = tuple(ft.info(name).shape)
            change = norm / base_norm if base_norm else float("inf")
            result.modules.append(
                ModuleResult(name, shape, cut.rank, cut.energy, missed / norm, change, method)
            )
            result.delta_sq += norm**2
            result.missed_sq += missed**2
        del stored, matrix
        if on_tensor is not None:
            on_tensor(name)
    return factors


def _compare_others(
    ft: Checkpoint,
    bs: Checkpoint,
    plan: _Plan,
    result: Extraction,
    save_full: bool,
    lora_targets: set[str],
    on_tensor: Callable[[str], None] | None,
) -> dict[str, torch.Tensor]:
    """Relative change of every tensor left out of the LoRA; the full copies PEFT can restore."""
    changed: dict[str, tuple[float, float]] = {}  # name -> (‖ΔW‖², ‖ΔW‖ / ‖W_base‖)
    for name in [*plan.other, *plan.excluded]:
        norm_sq, base_sq = _squared_norms(ft, bs, name)
        if norm_sq == 0.0:
            result.unchanged += 1
        else:
            changed[name] = (norm_sq, (norm_sq / base_sq) ** 0.5 if base_sq else float("inf"))
        if on_tensor is not None:
            on_tensor(name)
    why: dict[str, str] = {}
    full: dict[str, torch.Tensor] = {}
    if save_full:
        tied = ft.model_info().input_embedding if plan.tied else None
        lora_modules = {t.rsplit(".", 1)[0] for t in lora_targets}
        why, write = _full_copies(list(changed), list(ft.tensors), lora_modules, tied)
        full = {name: ft.read(name) for name in write}
        copies = [name for name in write if name not in changed]
        if copies:
            result.notes.append(
                f"{len(copies)} unchanged tensors are saved too: PEFT's modules_to_save wraps "
                "every module whose name ends like a saved one, and needs all of their tensors"
            )
    for name, (norm_sq, change) in changed.items():
        saved = name in full
        result.delta_sq += norm_sq
        result.missed_sq += 0.0 if saved else norm_sq
        shape = tuple(ft.info(name).shape)
        kind = tensor_kind(name, shape)
        result.full.append(FullResult(name, shape, kind, change, saved, why.get(name)))
    return full


def _squared_norms(ft: Checkpoint, bs: Checkpoint, name: str) -> tuple[float, float]:
    """(‖W_ft − W_base‖², ‖W_base‖²) in fp32, read in row blocks so a large embedding costs
    no more memory than a block (an fp32 difference of distinct values is never zero)."""
    shape = ft.info(name).shape
    rows = shape[0] if shape else 1
    step = max(1, _BLOCK_ELEMENTS * rows // max(1, ft.info(name).numel))
    norm_sq = base_sq = 0.0
    for start in range(0, rows, step):
        block = None if not shape else (start, min(rows, start + step))
        original = bs.read(name, block).float()
        difference = ft.read(name, block).float() - original
        norm_sq += float(torch.linalg.vector_norm(difference)) ** 2
        base_sq += float(torch.linalg.vector_norm(original)) ** 2
    return norm_sq, base_sq


def _full_copies(
    changed: list[str], names: list[str], lora_modules: set[str], tied: str | None
) -> tuple[dict[str, str], list[str]]:
    """Which changed tensors `modules_to_save` can restore in PEFT, and what must be written.

    PEFT wraps every module whose name ends with a saved module's last name component (so
    `norm` wraps `model.norm` and each `input_layernorm`), and loading then needs every tensor
    of every wrapped module. A group is refused if it would wrap a LoRA module, a tied
    embedding, or a tensor that is not a module's weight or bias.

    Returns:
        (changed tensor -> why it is not saved, tensors to write in checkpoint order)
    """
    params: dict[str, list[str]] = {}  # module -> its tensors
    for name in names:
        params.setdefault(name.rsplit(".", 1)[0], []).append(name)
    why: dict[str, str] = {}
    write: set[str] = set()
    for name in changed:
        module = name.rsplit(".", 1)[0]
        short = module.rsplit(".", 1)[-1]
        wrapped = [m for m in params if m.endswith(short)]
        tensors = [t for m in wrapped for t in params[m]]
        clash = next((m for m in wrapped if m in lora_modules), None)
        odd = next((t for t in tensors if not t.endswith((".weight", ".bias"))), None)
        if module in lora_modules:
            why[name] = "a LoRA module's bias stays frozen (bias='none')"
        elif clash is not None:
            why[name] = f"modules_to_save {short!r} would also wrap the LoRA module {clash}"
        elif tied is not None and tied in tensors:
            why[name] = "tied to the output head; a modules_to_save copy would untie it in PEFT"
        elif odd is not None:
            why[name] = f"{odd} is not a module's weight or bias"
        else:
            write.update(tensors)
    return why, [name for name in names if name in write]


def _tokenizer_files(spec: str, result: Extraction) -> dict[str, str]:
    """FINETUNED's tokenizer files (text ones), so the adapter folder carries its chat template."""
    folder = split_spec(spec)[0]
    if not folder.is_dir():
        return {}
    files: dict[str, str] = {}
    for path in side_files(folder, TOKENIZER_FILES):
        try:
            text = path.read_text(encoding="utf-8") if path.parent == folder else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            result.notes.append(f"{path.relative_to(folder)} not copied (take it from FINETUNED)")
        else:
            files[path.name] = text
    return files
