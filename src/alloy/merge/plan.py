"""Recipe -> plan: every output tensor as a job, with every check done before any data is read.

The planner opens each input checkpoint (headers and configs only), checks that the models can be
merged (architecture, layer counts, tensor names and shapes, vocabulary), lays out the output
tensors (embeddings, layers in order, then the rest; layer slices renumbered), resolves every
parameter for every tensor (filters and gradients over depth), and reports all problems at once.
The engine then only reads, computes and writes.

Gradient position t follows mergekit: a layer's t is its index inside its slice over
(slice length - 1) (1 for one-layer slices); tensors outside the layers take t = 0, so embeddings,
the final norm and the LM head all use a gradient's first value.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloy.adapters import AdaptedCheckpoint
from alloy.errors import IncompatibleModelsError, InputError, ProblemCollector, RecipeError
from alloy.io import Checkpoint, choose_donor
from alloy.io.modelinfo import (
    INPUT_EMBEDDINGS,
    LAYER_KEYS,
    OUTPUT_HEADS,
    split_layer_name,
    text_config,
)
from alloy.merge.compat import check_compatible, choose_tokenizer_donor, open_inputs
from alloy.merge.recipe import Recipe
from alloy.merge.registry import REQUIRED, MethodSpec

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Source:
    """One input tensor of a job: which checkpoint (index into MergePlan.paths) and which name."""

    model: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    models: tuple[Source, ...]  # the non-base inputs, in recipe order
    base: Source | None
    params: dict[str, Any]  # recipe-named; per-model parameters are lists aligned with `models`
    t: float  # gradient position
    seed: int  # seeds the generator of random methods; depends only on recipe seed and name
    copy: bool = False  # a plain copy of models[0] (no maths needed)

    @property
    def sources(self) -> tuple[Source, ...]:
        return (*self.models, *((self.base,) if self.base is not None else ()))


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    paths: list[Path]  # every input checkpoint; Source.model indexes this
    jobs: list[TensorJob]
    donor: Path  # config and generation config come from here
    tokenizer_donor: Path  # tokenizer files and chat templates come from here
    input_dtype: torch.dtype | None  # inputs are rounded to this first (recipe `dtype`)
    compute_dtype: torch.dtype
    config_updates: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # inputs given as BASE+ADAPTER (index into `paths`) -> what is folded in on read
    adapters: dict[int, str] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(int(torch.Size(j.shape).numel()) * j.out_dtype.itemsize for j in self.jobs)

    def summary(self, *, full: bool = False) -> str:
        """A human-readable description of the plan (what `--dry-run` prints): one line per
        layer pattern (`model.layers.{0..39}.mlp.up_proj.weight`), or per tensor with `full`."""
        lines = [
            f"method     {self.method.name}",
            f"inputs     {len(self.paths)}",
            *(
                f"  [{k}] {p}" + (f"  ({self.adapters[k]})" if k in self.adapters else "")
                for k, p in enumerate(self.paths)
            ),
            f"donor      {self.donor}"
            + (
                f" (tokenizer: {self.tokenizer_donor})"
                if self.tokenizer_donor != self.donor
                else ""
            ),
            f"tensors    {len(self.jobs)} ({self.output_bytes / 1e6:,.1f} MB out)",
            f"compute    {DTYPE_NAMES[self.compute_dtype]}"
            + (f" (inputs rounded to {DTYPE_NAMES[self.input_dtype]})" if self.input_dtype else ""),
        ]
        groups: dict[tuple[str, str], list[tuple[int | None, TensorJob]]] = {}
        for job in self.jobs:
            inputs = ", ".join(f"[{s.model}]" for s in job.models)
            base = f" base [{job.base.model}]" if job.base else ""
            how = f"{'copy' if job.copy else self.method.name} {inputs}{base}"
            pattern, layer = (job.name, None) if full else _layer_pattern(job.name)
            groups.setdefault((pattern, how), []).append((layer, job))
        for (pattern, how), members in groups.items():
            jobs = [job for _, job in members]
            layers = sorted({layer for layer, _ in members if layer is not None})
            name = pattern.replace("{}", "{" + _runs(layers) + "}") if layers else pattern
            t = _span([round(j.t, 3) for j in jobs])
            params = {k: _span([_short(j.params[k]) for j in jobs]) for k in jobs[0].params}
            count = f"  ({len(jobs)} tensors)" if len(jobs) > 1 else ""
            lines.append(f"  {name}  {how}  t={t}  {params}{count}")
        if not full and len(groups) < len(self.jobs):
            lines.append(f"({len(groups)} lines for {len(self.jobs)} tensors; -v lists each)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


_LAYER = re.compile(r"\.(\d+)\.")


def _layer_pattern(name: str) -> tuple[str, int | None]:
    """'model.layers.12.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 12)."""
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return f"{name[: match.start()]}.{{}}.{name[match.end() :]}", int(match.group(1))


def _runs(numbers: list[int]) -> str:
    """[0, 1, 2, 3, 8, 9] -> '0..3,8..9'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _span(values: list[Any]) -> Any:
    """One value if all agree, else 'first..last' (layers: '0..39'; a gradient: '0..1')."""
    distinct = list(dict.fromkeys(repr(v) for v in values))
    if len(distinct) == 1:
        return values[0]
    if all(isinstance(v, list) and len(v) == len(values[0]) for v in values):
        return [_span(list(column)) for column in zip(*values, strict=True)]  # per model
    return f"{values[0]}..{values[-1]}"


def _short(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _Group:
    """Inputs of a run of output layers: which models, which base, which source layers."""

    models: tuple[str, ...]  # non-base model paths
    base: str | None
    ranges: dict[str, tuple[int, int]]  # path -> [start, end) source layers
    slice_index: int | None


def plan_merge(recipe: Recipe, *, allow_pickle: bool = False) -> MergePlan:
    """Check the recipe against the checkpoints' headers and configs and lay out every tensor.

    Raises:
        CheckpointError: an input is missing or unreadable (all inputs are checked).
        IncompatibleModelsError: the inputs cannot be merged (every reason is listed).
        RecipeError: a parameter cannot be resolved for some tensor.
    """
    method = recipe.method
    paths = [Path(p) for p in recipe.model_paths()]
    keys = {str(Path(model)): key for model, key in recipe.model_keys().items()}
    checkpoints = open_inputs(paths, allow_pickle, keys)
    index = {str(p): k for k, p in enumerate(paths)}
    try:
        by_path = {str(p): c for p, c in zip(paths, checkpoints, strict=True)}
        donor_key = str(choose_donor(recipe.base_model, [str(p) for p in paths]))
        donor = by_path[donor_key]
        problems = ProblemCollector()
        warnings: list[str] = recipe.warnings  # keys mergekit ignores, ignored too
        check_compatible(by_path, donor_key, problems, warnings)
        tokenizer_donor = choose_tokenizer_donor(recipe, donor.path, problems)
        problems.raise_if_any(IncompatibleModelsError, "these models cannot be merged")

        groups = _groups(recipe, by_path)
        input_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
        compute_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
        out_dtype_override = DTYPES.get(recipe.out_dtype or recipe.dtype or "")

        jobs: list[TensorJob] = []
        layer_map: list[int] = []  # output layer -> donor-layout source layer (for config lists)

        # Parameter values that are valid alone can be invalid together (weights summing to
        # zero, DELLA's density +- epsilon): building the method's Merger checks them, here,
        # before any tensor data is read. Each distinct message is reported once.
        checked: dict[str, str | None] = {}
        failures: dict[str, list[str]] = {}

        def check_values(name: str, params: dict[str, Any], n_models: int) -> None:
            values = [
                v
                for value in params.values()
                for v in (value if isinstance(value, list) else [value])
            ]
            if any(v is REQUIRED for v in values):
                return  # reported as missing
            key = repr(sorted(params.items()))
            if key not in checked:
                try:
                    method.make(n_models, **params)
                    checked[key] = None
                except InputError as exc:
                    checked[key] = str(exc)
            message = checked[key]
            if message is not None:
                failures.setdefault(message, []).append(name)

        def add(name: str, sources: dict[str, str], group: _Group, t: float) -> None:
            first = by_path[group.models[0] if group.models else str(group.base)]
            info = first.tensors[sources[group.models[0] if group.models else str(group.base)]]
            out_dtype = out_dtype_override or info.dtype
            params: dict[str, Any] = {}
            for param in method.params.values():
                if param.per_model:
                    values = [
                        recipe.parameter(
                            param.name,
                            model=m,
                            tensor_name=sources[m],
                            t=t,
                            slice_index=group.slice_index,
                        )
                        for m in group.models
                    ]
                    missing = [
                        m for m, v in zip(group.models, values, strict=True) if v is REQUIRED
                    ]
                    for m in missing:
                        problems.add(name, f"no value of {param.name!r} for model {m}")
                    params[param.name] = values
                else:
                    value = recipe.parameter(
                        param.name, model=None, tensor_name=name, t=t, slice_index=group.slice_index
                    )
                    if value is REQUIRED:
                        problems.add(name, f"no value of {param.name!r}")
                    elif param.choices and value not in param.choices:
                        problems.add(
                            name,
                            f"{param.name}={value!r} is not one of {', '.join(param.choices)}",
                        )
                    params[param.name] = value
            if not info.dtype.is_floating_point:
                copy_from = group.base or group.models[0]
                jobs.append(
                    TensorJob(
                        name,
                        info.shape,
                        info.dtype,
                        (Source(index[copy_from], sources[copy_from]),),
                        None,
                        {},
                        t,
                        0,
                        copy=True,
                    )
                )
                warnings.append(f"{name}: {info.dtype} tensor copied from {copy_from}, not merged")
                return
            check_values(name, params, len(group.models))
            base = Source(index[group.base], sources[group.base]) if group.base else None
            models = tuple(Source(index[m], sources[m]) for m in group.models)
            copy = (
                method.name == "passthrough"
                and params.get("scale") == [1.0]
                and input_dtype is None
                and out_dtype == info.dtype
            )
            jobs.append(
                TensorJob(
                    name,
                    info.shape,
                    out_dtype,
                    models,
                    base,
                    params,
                    t,
                    tensor_seed(recipe.seed or 0, name),
                    copy,
                )
            )

        pre, post = _outside_layers(donor)
        first, last = groups[0], groups[-1]
        for name in pre:
            add(name, _same_name(name, first, by_path, problems), first, 0.0)
        out_layer = 0
        for group in groups:
            length = _length(group)
            template = _layer_template(by_path, group)
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                for prefix, suffix in template:
                    out_name = f"{prefix}{out_layer}.{suffix}"
                    sources = {
                        m: f"{prefix}{group.ranges[m][0] + offset}.{suffix}" for m in group.ranges
                    }
                    for m, src in sources.items():
                        if src not in by_path[m].tensors:
                            problems.add(m, f"has no tensor {src!r} (needed for {out_name})")
                    if all(src in by_path[m].tensors for m, src in sources.items()):
                        _check_shapes(out_name, sources, by_path, problems)
                        add(out_name, sources, group, t)
                layer_map.append(group.ranges[next(iter(group.ranges))][0] + offset)
                out_layer += 1
        for name in post:
            add(name, _same_name(name, last, by_path, problems), last, 0.0)
        for message, names in failures.items():
            more = f" (and {len(names) - 1} more tensors)" if len(names) > 1 else ""
            problems.add(f"{names[0]}{more}", message)
        problems.raise_if_any(RecipeError, "the recipe cannot be applied to these models")

        config_updates = _config_updates(donor, layer_map, jobs, out_dtype_override)
        return MergePlan(
            recipe=recipe,
            method=method,
            paths=paths,
            jobs=jobs,
            donor=donor.path,
            tokenizer_donor=tokenizer_donor,
            input_dtype=input_dtype,
            compute_dtype=compute_dtype,
            config_updates=config_updates,
            warnings=warnings,
            adapters={
                k: _folded(c) for k, c in enumerate(checkpoints) if isinstance(c, AdaptedCheckpoint)
            },
        )
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()


def _folded(checkpoint: AdaptedCheckpoint) -> str:
    """'LORA adapter folded into 14 tensors on read' (for the plan's summary)."""
    adapter = checkpoint.adapter
    return f"{adapter.peft_type} adapter folded into {len(adapter.names)} tensors on read"


def _groups(recipe: Recipe, by_path: dict[str, Checkpoint]) -> list[_Group]:
    """Runs of output layers with their inputs: one for `models:`, one per slice for `slices:`."""
    base = recipe.base_model
    if recipe.slices is None:
        ranges = {}
        for path, checkpoint in by_path.items():
            layers = checkpoint.model_info().num_layers or 0
            ranges[path] = (0, layers)
        lengths = {r[1] for r in ranges.values()}
        if len(lengths) > 1:
            detail = ", ".join(f"{p}: {r[1]}" for p, r in ranges.items())
            raise IncompatibleModelsError(
                f"the models have different numbers of layers ({detail}); use `slices:` to "
                "choose layer ranges of equal length"
            )
        uses_base = recipe.method.base != "none" and base is not None
        models = tuple(p for p in by_path if not (uses_base and p == base))
        return [_Group(models, base if uses_base else None, ranges, None)]
    groups = []
    for k, slice_ in enumerate(recipe.slices):
        slice_base = slice_.base_model or base
        uses_base = recipe.method.base != "none" and slice_base is not None
        ranges = {str(s.model): (s.layer_range[0], s.layer_range[1]) for s in slice_.sources}
        if uses_base and slice_base not in ranges:
            raise RecipeError(
                f"slices[{k}]: the base model {slice_base} is not among the slice's sources",
            )
        models = tuple(p for p in ranges if not (uses_base and p == slice_base))
        for path, (start, end) in ranges.items():
            layers = by_path[path].model_info().num_layers or 0
            if end > layers:
                raise IncompatibleModelsError(
                    f"slices[{k}]: layer_range [{start}, {end}] of {path} goes past its "
                    f"{layers} layers"
                )
        groups.append(_Group(models, slice_base if uses_base else None, ranges, k))
    return groups


def _length(group: _Group) -> int:
    start, end = next(iter(group.ranges.values()))
    return end - start


def _layer_template(by_path: dict[str, Checkpoint], group: _Group) -> list[tuple[str, str]]:
    """(prefix, suffix) of every tensor of one layer, in file order, from the first input."""
    first = group.base or group.models[0]
    start = group.ranges[first][0]
    template = []
    for name in by_path[first].tensors:
        parts = split_layer_name(name)
        if parts is not None and parts[1] == start:
            template.append((parts[0], parts[2]))
    return template


def _outside_layers(donor: Checkpoint) -> tuple[list[str], list[str]]:
    """Tensors outside the layers: embeddings (before the layers) and the rest (after)."""
    pre: list[str] = []
    post: list[str] = []
    for name in donor.tensors:
        if split_layer_name(name) is not None:
            continue
        is_embedding = not name.endswith(OUTPUT_HEADS) and (
            "embed" in name or name.endswith((*INPUT_EMBEDDINGS, "wpe.weight"))
        )
        (pre if is_embedding else post).append(name)
    return pre, post


def _same_name(
    name: str,
    group: _Group,
    by_path: dict[str, Checkpoint],
    problems: ProblemCollector,
) -> dict[str, str]:
    """Each input's source for a non-layer tensor (a tied model's embedding serves as head)."""
    sources = {}
    for path in group.ranges:
        checkpoint = by_path[path]
        if name in checkpoint.tensors:
            sources[path] = name
        elif name.endswith("lm_head.weight") and checkpoint.model_info().input_embedding:
            sources[path] = str(checkpoint.model_info().input_embedding)
        else:
            problems.add(path, f"has no tensor {name!r}")
            sources[path] = name
    if all(src in by_path[p].tensors for p, src in sources.items()):
        _check_shapes(name, sources, by_path, problems)
    return sources


def _check_shapes(
    out_name: str,
    sources: dict[str, str],
    by_path: dict[str, Checkpoint],
    problems: ProblemCollector,
) -> None:
    shapes = {p: by_path[p].tensors[s].shape for p, s in sources.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{p}: {list(s)}" for p, s in shapes.items())
        problems.add(out_name, f"shapes differ ({detail})")


def _config_updates(
    donor: Checkpoint,
    layer_map: list[int],
    jobs: list[TensorJob],
    out_dtype: torch.dtype | None,
) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    config = donor.config or {}
    cfg = text_config(config)
    if out_dtype is not None:
        updates["dtype"] = DTYPE_NAMES[out_dtype]
    layers = next((cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int)), None)
    if layers is not None and len(layer_map) != layers:
        key = next(k for k in LAYER_KEYS if isinstance(cfg.get(k), int))
        updates[key] = len(layer_map)
        # Per-layer lists (e.g. layer_types) follow the layers they describe.
        for name, value in config.items():
            if isinstance(value, list) and len(value) == layers:
                updates[name] = [value[i] for i in layer_map]
    return updates
