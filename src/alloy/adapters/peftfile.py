"""PEFT adapter folders, read and written without importing PEFT.

A folder written by `PeftModel.save_pretrained` holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named after the wrapped model:
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (LoRA, DoRA adds
`.lora_magnitude_vector`), `<module>.lora_embedding_A` / `_B` (embeddings),
`<module>.vera_lambda_b` / `_d` with shared `base_model.vera_A` / `vera_B` (VeRA), and
`<module>.weight` for `modules_to_save` copies. `read_adapter` maps each to the base tensor it
changes (`<module>.weight`), with its scale resolved from `r`, `lora_alpha`, `use_rslora`,
`rank_pattern` and `alpha_pattern` as PEFT resolves them, and reports every problem at once.
`write_lora` writes a LoRA folder that `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloy.adapters.delta import Factors
from alloy.errors import CheckpointError, InputError, ProblemCollector
from alloy.io import Checkpoint, TensorSpec
from alloy.io.writer import CheckpointWriter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "VERA")
# Options whose adapters are not a plain additive update of a weight; refused, never ignored.
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "adapters with a trained bias (lora_bias)",
    "use_qalora": "QA-LoRA adapters",
    "layer_replication": "adapters with layer replication",
    "target_parameters": "adapters of raw parameters (target_parameters)",
    "trainable_token_indices": "adapters with trainable tokens",
}


@dataclass
class Adapter:
    """A PEFT adapter folder, mapped onto the base model's tensor names.

    `modules`: base tensor name -> Factors; `full`: base tensor name -> a replacement tensor
    (`modules_to_save` copies, and embedding base layers saved beside an embedding LoRA).
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, Factors] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA"))

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def names(self) -> list[str]:
        """Every base tensor this adapter changes, in file order."""
        return list(dict.fromkeys([*self.modules, *self.full]))


def is_adapter(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key whose regex matches a dotted suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(config: dict[str, Any], module: str) -> float:
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else float(rank))


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and check a PEFT adapter folder (LoRA, rsLoRA, DoRA, VeRA); every problem at once.

    Raises:
        InputError: not an adapter folder, an unsupported adapter kind or option, or
            inconsistent tensors (each listed with where and how to fix).
    """
    folder = Path(path)
    problems = ProblemCollector()
    config_file = folder / CONFIG
    if not config_file.is_file():
        hint = (
            "this is a model folder, not an adapter; use it as the base"
            if (folder / "config.json").is_file()
            else "give a folder written by PeftModel.save_pretrained or `alloy train` with adapter:"
        )
        raise InputError(f"{folder}: no {CONFIG} ({hint})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_file}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_file}: not a JSON object")
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in SUPPORTED:
        problems.add(
            str(config_file),
            f"peft_type {peft_type!r} is not supported",
            f"alloy folds {' and '.join(SUPPORTED)} adapters (LoRA includes rsLoRA and DoRA)",
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            problems.add(f"{config_file}: {key}", f"{what} cannot be folded exactly")
    if peft_type == "VERA" and not config.get("save_projection", True):
        problems.add(
            f"{config_file}: save_projection",
            "this VeRA adapter does not store its shared projections",
            "re-save it with VeraConfig(save_projection=True)",
        )
    weights = folder / WEIGHTS
    if not weights.is_file():
        problems.add(str(folder), f"no {WEIGHTS}", "adapters saved as .bin are not read")
    problems.raise_if_any(InputError, f"{folder}: cannot use this adapter")

    try:
        tensors = Checkpoint.open(weights)
    except CheckpointError as exc:
        raise InputError(f"{weights}: unreadable ({exc.message})") from exc
    with tensors:
        adapter = Adapter(folder, config)
        _collect(adapter, tensors, problems)
    problems.raise_if_any(InputError, f"{folder}: inconsistent adapter")
    if not adapter.names:
        raise InputError(f"{weights}: holds no adapter tensors")
    return adapter


def _collect(adapter: Adapter, tensors: Checkpoint, problems: ProblemCollector) -> None:
    config = adapter.config
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    where = str(tensors.path)
    for name in tensors:
        tensor = tensors.read(name)
        if name in ("base_model.vera_A", "base_model.vera_B"):
            shared[name.rsplit(".", 1)[1]] = tensor
            continue
        if not name.startswith(PREFIX):
            problems.add(f"{where}: {name}", f"tensor name does not start with {PREFIX!r}")
            continue
        key = name.removeprefix(PREFIX)
        for suffix in (
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_magnitude_vector",
            ".lora_embedding_A",
            ".lora_embedding_B",
            ".vera_lambda_b",
            ".vera_lambda_d",
        ):
            if key.endswith(suffix):
                parts.setdefault(key.removesuffix(suffix), {})[suffix.split(".")[1]] = tensor
                break
        else:
            if ".lora_" in key or ".vera_" in key:
                problems.add(f"{where}: {name}", "unknown adapter tensor")
            else:  # modules_to_save copies; embedding base layers saved with an embedding LoRA
                adapter.full[key.replace(".base_layer.", ".")] = tensor
    for module, got in parts.items():
        target = f"{module}.weight"
        label = f"{where}: {module}"
        if "lora_embedding_A" in got or "lora_embedding_B" in got:
            A, B = got.get("lora_embedding_A"), got.get("lora_embedding_B")
            transposed = embedding = True
        elif "vera_lambda_b" in got or "vera_lambda_d" in got:
            _vera(adapter, module, got, shared, label, problems)
            continue
        else:
            A, B = got.get("lora_A"), got.get("lora_B")
            transposed, embedding = fan_in_fan_out, False
        if A is None or B is None or A.dim() != 2 or B.dim() != 2:
            problems.add(label, "needs a 2-D A and B factor", f"found {sorted(got)}")
            continue
        if A.shape[0] != B.shape[1]:
            problems.add(label, f"A is {tuple(A.shape)} but B is {tuple(B.shape)}: ranks differ")
            continue
        magnitude = got.get("lora_magnitude_vector")
        if magnitude is not None and magnitude.numel() != B.shape[0]:
            problems.add(label, f"DoRA magnitude has {magnitude.numel()} entries, B {B.shape[0]}")
            continue
        adapter.modules[target] = Factors(
            A.float(),
            B.float(),
            _scale(config, module),
            transposed,
            magnitude=None if magnitude is None else magnitude.float(),
            embedding=embedding,
        )


def _vera(
    adapter: Adapter,
    module: str,
    got: dict[str, torch.Tensor],
    shared: dict[str, torch.Tensor],
    label: str,
    problems: ProblemCollector,
) -> None:
    lambda_b, lambda_d = got.get("vera_lambda_b"), got.get("vera_lambda_d")
    A, B = shared.get("vera_A"), shared.get("vera_B")
    if lambda_b is None or lambda_d is None:
        problems.add(label, "VeRA needs both vera_lambda_b and vera_lambda_d")
        return
    if A is None or B is None:
        problems.add(label, "the shared projections base_model.vera_A / vera_B are missing")
        return
    # The shared projections are as large as the largest adapted matrix; each module uses the
    # top-left block of its own shape. The input size is unknown here, so the caller slices A.
    out, rank = lambda_b.numel(), lambda_d.numel()
    if rank != A.shape[0] or out > B.shape[0]:
        problems.add(label, f"lambdas ({out}, {rank}) do not fit projections {tuple(B.shape)}")
        return
    adapter.modules[f"{module}.weight"] = Factors(
        A.float(),
        B[:out].float(),
        1.0,
        bool(adapter.config.get("fan_in_fan_out")),
        lambda_b=lambda_b.float(),
        lambda_d=lambda_d.float(),
    )


def fit_to(
    adapter: Adapter, shapes: dict[str, tuple[int, ...]], problems: ProblemCollector
) -> None:
    """Check the adapter against a base's tensor shapes; slice VeRA's shared A to each input.

    Every module must change a 2-D tensor of the base with the shape its factors imply; every
    full copy must match its base tensor. Problems name the adapter, tensor and both shapes.
    """
    where = str(adapter.path)
    for target, f in list(adapter.modules.items()):
        shape = shapes.get(target)
        if shape is None:
            problems.add(
                f"{where}: {target}",
                "the base model has no such tensor",
                "is this adapter for another base model?",
            )
            continue
        if len(shape) != 2:
            problems.add(f"{where}: {target}", f"adapts a {len(shape)}-D tensor {shape}")
            continue
        if f.kind == "vera":
            inp = shape[0] if f.transposed else shape[1]
            if inp > f.A.shape[1]:
                problems.add(f"{where}: {target}", f"VeRA projection is narrower than {shape}")
                continue
            f = dataclasses.replace(f, A=f.A[:, :inp])
            adapter.modules[target] = f
        if tuple(shape) != f.shape:
            problems.add(
                f"{where}: {target}",
                f"adapter implies shape {f.shape}, the base has {tuple(shape)}",
                "is this adapter for another base model?",
            )
    for target, tensor in adapter.full.items():
        shape = shapes.get(target)
        if shape is None:
            problems.add(f"{where}: {target}", "the base model has no such tensor")
        elif tuple(shape) != tuple(tensor.shape):
            problems.add(
                f"{where}: {target}",
                f"saved copy is {tuple(tensor.shape)}, the base has {tuple(shape)}",
            )


def lora_config(
    modules: dict[str, int],
    *,
    base_model: str | None,
    modules_to_save: list[str] | None = None,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """An adapter_config.json for LoRA modules (module -> rank) with every scale equal to 1.

    Scales are folded into B, so α = r for every module; modules whose rank differs from the
    most common one get exact (escaped) `rank_pattern` / `alpha_pattern` entries.
    """
    ranks = list(modules.values())
    common = max(set(ranks), key=ranks.count) if ranks else 1
    pattern = {re.escape(m): r for m, r in modules.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(modules),
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def write_lora(
    out: str | os.PathLike[str],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model: str | None,
    full: dict[str, torch.Tensor] | None = None,
    transposed: bool = False,
    embeddings: set[str] | frozenset[str] = frozenset(),
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a LoRA adapter folder atomically: base tensor name -> (B, A) with ΔW = B·A.

    `full` tensors are written as `modules_to_save` copies. Rank-0 modules (a zero update) are
    left out. `transposed` marks Conv1D-style (in × out) weights (`fan_in_fan_out`);
    `embeddings` names the embedding weights, written as `lora_embedding_A` / `_B`.
    """
    full = full or {}
    modules: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    for target, (B, A) in factors.items():
        if A.shape[0] == 0:
            continue
        module = target.removesuffix(".weight")
        modules[module] = int(A.shape[0])
        a_name, b_name = (
            ("lora_embedding_A", "lora_embedding_B")
            if target in embeddings
            else ("lora_A.weight", "lora_B.weight")
        )
        state[f"{PREFIX}{module}.{a_name}"] = A.to(dtype).contiguous()
        state[f"{PREFIX}{module}.{b_name}"] = B.to(dtype).contiguous()
    for target, tensor in full.items():
        state[f"{PREFIX}{target}"] = tensor.contiguous()
    saved = sorted({t.removesuffix(".weight").rsplit(".", 1)[-1] for t in full}) or None
    config = lora_config(
        modules, base_model=base_model, modules_to_save=saved, fan_in_fan_out=transposed
    )
    files = {CONFIG: json.dumps(config, indent=2, sort_keys=True) + "\n", **(extra_files or {})}
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with CheckpointWriter(
        out, specs, force=force, extra_files=files, single_file=WEIGHTS
    ) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
    return Path(out)
