"""Upcycling: dense models of one family -> a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint.

Everything except the MLPs (embeddings, attention, norms, head) comes from the base model; each
layer's MoE block gets one expert per recipe expert (that model's MLP of the same layer, with
optional noise and residual scale), a router initialised by the recipe's gate mode, and for
Qwen2-MoE a shared expert with its sigmoid gate. Every check runs on headers and configs before a
weight is read; the output is written tensor by tensor (memory: one tensor at a time, plus the
base model when routing from hidden states) into a folder that appears only when complete.
A `BASE+ADAPTER` model is read through alloy.adapters, its adapter folded in tensor by tensor;
its config and side files are BASE's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloy.errors import IncompatibleModelsError, ProblemCollector
from alloy.io import CardInput, Checkpoint, CheckpointWriter, TensorSpec, model_card
from alloy.io.atomic import check_output_folder
from alloy.io.format import DTYPES
from alloy.merge.compat import card_parts, check_compatible, open_inputs
from alloy.moe.architectures import (
    ARCHITECTURES,
    PROJECTIONS,
    MoeArchitecture,
    architecture_for,
    dense_mlp,
)
from alloy.moe.recipe import PROMPTED_MODES, Expert, MoeRecipe, load_moe_recipe
from alloy.moe.routers import prompted_routers, random_routers, similar_experts

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NAMED_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
RECIPE_FILE = "alloy_moe.yaml"  # the recipe, written beside the weights (names experts in reports)


@dataclass
class MoePlan:
    """What `upcycle` will write, decided from headers and configs only."""

    recipe: MoeRecipe
    arch: MoeArchitecture
    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    config: dict[str, Any]
    copied: list[str]  # base tensors written unchanged (cast to dtype)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.recipe.experts)

    def specs(self, shapes: Mapping[str, tuple[int, ...]]) -> list[TensorSpec]:
        """Every output tensor, base tensors first then layer by layer."""
        specs = [TensorSpec(name, shapes[name], self.dtype) for name in self.copied]
        h, i = self.hidden_size, self.intermediate_size
        shape = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        for layer in range(self.num_layers):
            specs.append(TensorSpec(self.arch.router(layer), (self.num_experts, h), self.dtype))
            for e in range(self.num_experts):
                for p in PROJECTIONS:
                    specs.append(TensorSpec(self.arch.expert(layer, e, p), shape[p], self.dtype))
            if self.recipe.shared is not None:
                for p in PROJECTIONS:
                    name = self.arch.shared(layer, p)
                    specs.append(TensorSpec(name, shapes[dense_mlp(layer, p)], self.dtype))
                specs.append(TensorSpec(self.arch.shared_gate(layer), (1, h), self.dtype))
        return specs


@dataclass
class UpcycleResult:
    out: Path
    plan: MoePlan
    routers: torch.Tensor  # (L, E, H) fp32, as written (before the cast to the output dtype)


def plan_moe(
    recipe: MoeRecipe, checkpoints: Mapping[Path, Checkpoint], problems: ProblemCollector
) -> MoePlan | None:
    """Check the recipe against the models' headers and configs; None if anything is wrong
    (every problem added to `problems`)."""
    base = checkpoints[recipe.base]
    info = base.model_info()
    config = base.config or {}
    base_type = info.model_type
    name = recipe.architecture or architecture_for(base_type, recipe.shared is not None)
    arch = ARCHITECTURES.get(name or "")
    if arch is None or base_type not in arch.bases:
        takes = "; ".join(f"{a.name} from {'/'.join(a.bases)}" for a in ARCHITECTURES.values())
        what = f"a {base_type} model cannot become {name}" if name else f"no MoE from {base_type}"
        problems.add(str(recipe.base), what, f"alloy upcycles {takes}")
        return None
    if arch.shared_expert and recipe.shared is None:
        hint = "add shared_experts: [{source_model: BASE}] (mergekit's qwen needs one too)"
        problems.add("shared_experts", f"{arch.name} has a shared expert", hint)
    for key in ("attention_bias", "mlp_bias"):
        if arch.name == "mixtral" and config.get(key):
            problems.add(str(recipe.base), f"{key} is true; Mixtral has no biases", None)
    num_layers, hidden = info.num_layers, info.hidden_size
    if not isinstance(num_layers, int) or not isinstance(hidden, int):
        problems.add(str(recipe.base), "config.json lacks num_hidden_layers or hidden_size", None)
        return None

    by_path = {str(path): checkpoint for path, checkpoint in checkpoints.items()}
    warnings: list[str] = []
    check_compatible(by_path, str(recipe.base), problems, warnings)
    for path, checkpoint in checkpoints.items():
        other = checkpoint.model_info()
        if other.model_type != base_type:
            problems.add(str(path), f"a {other.model_type} model, the base is {base_type}", None)
        if (other.num_layers, other.hidden_size) != (num_layers, hidden):
            found = f"{other.num_layers} layers of width {other.hidden_size}"
            problems.add(str(path), f"{found}; the base has {num_layers} of {hidden}", None)

    mlp_names = {dense_mlp(layer, p) for layer in range(num_layers) for p in PROJECTIONS}
    sizes = _expert_sizes(recipe, checkpoints, num_layers, hidden, problems)
    copied = [n for n in base.tensors if n not in mlp_names]
    for n in copied:
        if ".mlp." in n:
            problems.add(f"{recipe.base}: {n}", "an MLP tensor alloy cannot place in an MoE", None)
    if problems or not sizes:
        return None

    dtype = NAMED_DTYPES[recipe.dtype] if recipe.dtype else _dominant_dtype(info.dtypes)
    intermediate = sizes[0]
    try:
        out_config = arch.config(
            config,
            num_experts=len(recipe.experts),
            experts_per_token=recipe.experts_per_token,
            intermediate_size=intermediate,
            dtype=DTYPE_NAMES[dtype],
        )
    except (ValueError, TypeError) as exc:
        problems.add(f"{recipe.base}/config.json", f"transformers rejects the MoE config: {exc}")
        return None
    sources = [e.source for e in recipe.experts]
    if len(set(sources)) == 1 and not any(_noisy(e) for e in recipe.experts):
        warnings.append(
            "every expert is the same model without noise: the MoE computes what the dense model "
            "does at a higher cost until it is trained"
        )
    if recipe.gate_mode == "uniform" and recipe.experts_per_token < len(recipe.experts):
        warnings.append(
            "gate_mode uniform with fewer experts per token than experts: ties send every token "
            f"to experts 0..{recipe.experts_per_token - 1}; train the routers before use"
        )
    return MoePlan(
        recipe=recipe,
        arch=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        dtype=dtype,
        config=out_config,
        copied=copied,
        warnings=warnings,
    )


def check_moe(
    recipe: MoeRecipe | str | os.PathLike[str] | Mapping[str, Any], *, allow_pickle: bool = False
) -> MoePlan:
    """The plan `upcycle` would follow, from the recipe, configs and headers (no tensor data).

    Raises:
        RecipeError, CheckpointError, IncompatibleModelsError: with every problem found.
    """
    if not isinstance(recipe, MoeRecipe):
        recipe = load_moe_recipe(recipe)
    opened = open_inputs(recipe.sources, allow_pickle, recipe.source_keys())
    try:
        return _checked_plan(recipe, dict(zip(recipe.sources, opened, strict=True)))
    finally:
        for checkpoint in opened:
            checkpoint.close()


def _checked_plan(recipe: MoeRecipe, checkpoints: Mapping[Path, Checkpoint]) -> MoePlan:
    problems = ProblemCollector()
    plan = plan_moe(recipe, checkpoints, problems)
    problems.raise_if_any(IncompatibleModelsError, "cannot build this MoE")
    assert plan is not None
    return plan


def upcycle(
    recipe: MoeRecipe | str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    allow_pickle: bool = False,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> UpcycleResult:
    """Build the MoE checkpoint of `recipe` in `out` (see the module docstring).

    Raises:
        RecipeError, CheckpointError, IncompatibleModelsError: before anything is written.
        OutputExistsError: `out` holds files and `force` is False.
    """
    if not isinstance(recipe, MoeRecipe):
        recipe = load_moe_recipe(recipe)
    out = Path(out)
    check_output_folder(out, force=force)
    say = progress or (lambda _message: None)
    opened = open_inputs(recipe.sources, allow_pickle, recipe.source_keys())
    checkpoints = dict(zip(recipe.sources, opened, strict=True))
    try:
        plan = _checked_plan(recipe, checkpoints)
        say(f"routers: {recipe.gate_mode}")
        routers, shared_gate = _routers(plan, device)
        for layer, i, j in similar_experts(routers):
            names = recipe.experts[i].name, recipe.experts[j].name
            plan.warnings.append(
                f"layer {layer}: experts {names[0]!r} and {names[1]!r} have nearly the same "
                "router direction; their prompts may be too alike"
            )
        base = checkpoints[recipe.base]
        shapes = {n: info.shape for n, info in base.tensors.items()}
        specs = plan.specs(shapes)
        card = _card(plan, command, checkpoints)
        say(f"writing {len(specs)} tensors to {out}")
        extra = {"config.json": json.dumps(plan.config, indent=2, sort_keys=True) + "\n"}
        extra[RECIPE_FILE] = recipe.text
        with CheckpointWriter(
            out, specs, force=force, donor=base.path, model_card=card, extra_files=extra
        ) as writer:
            for n in plan.copied:
                writer.write(n, base.read(n).to(plan.dtype))
            _write_layers(plan, checkpoints, routers, shared_gate, writer)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    return UpcycleResult(out, plan, routers)


def _write_layers(
    plan: MoePlan,
    checkpoints: Mapping[Path, Checkpoint],
    routers: torch.Tensor,
    shared_gate: torch.Tensor | None,
    writer: CheckpointWriter,
) -> None:
    recipe, arch = plan.recipe, plan.arch
    for layer in range(plan.num_layers):
        writer.write(arch.router(layer), routers[layer].to(plan.dtype).contiguous())
        for e, expert in enumerate(recipe.experts):
            for p in PROJECTIONS:
                name = arch.expert(layer, e, p)
                weight = checkpoints[expert.source].read(dense_mlp(layer, p))
                writer.write(name, _perturb(weight, expert, p, name, recipe.seed).to(plan.dtype))
        if recipe.shared is not None and shared_gate is not None:
            for p in PROJECTIONS:
                name = arch.shared(layer, p)
                weight = checkpoints[recipe.shared.source].read(dense_mlp(layer, p))
                writer.write(
                    name, _perturb(weight, recipe.shared, p, name, recipe.seed).to(plan.dtype)
                )
            writer.write(arch.shared_gate(layer), shared_gate[layer].to(plan.dtype).contiguous())


def _routers(plan: MoePlan, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L, E, H) router weights and (L, 1, H) shared-expert gates (None without one), fp32."""
    recipe = plan.recipe
    experts = list(recipe.experts) + ([recipe.shared] if recipe.shared is not None else [])
    if recipe.gate_mode in PROMPTED_MODES:
        prompts = [(e.positive, e.negative) for e in experts]
        weights = prompted_routers(
            recipe.base, prompts, recipe.gate_mode, plan.num_layers, device=device
        )
    else:
        shape = (plan.num_layers, len(experts), plan.hidden_size)
        weights = random_routers(shape, recipe.gate_mode, recipe.seed)
    count = len(recipe.experts)
    shared = weights[:, count:] if recipe.shared is not None else None
    return weights[:, :count].contiguous(), shared


def _perturb(
    weight: torch.Tensor, expert: Expert, projection: str, name: str, seed: int
) -> torch.Tensor:
    """An expert's weight with its noise (seeded by the output tensor's name, so the result does
    not depend on the order of writing) and residual scale; fp32."""
    result = weight.float()
    if _noisy(expert):
        std = expert.noise_scale + expert.relative_noise * float(result.std())
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        result = result + torch.randn(result.shape, generator=generator) * std
    if projection == "down" and expert.residual_scale != 1.0:
        result = result * expert.residual_scale
    return result


def _noisy(expert: Expert) -> bool:
    return expert.noise_scale > 0 or expert.relative_noise > 0


def _expert_sizes(
    recipe: MoeRecipe,
    checkpoints: Mapping[Path, Checkpoint],
    num_layers: int,
    hidden: int,
    problems: ProblemCollector,
) -> list[int]:
    """The intermediate size of every expert (and then the shared expert); problems for missing
    MLP tensors, wrong shapes and experts of different sizes."""
    sizes: list[int] = []
    experts = [(f"experts.{i}", e) for i, e in enumerate(recipe.experts)]
    if recipe.shared is not None:
        experts.append(("shared_experts.0", recipe.shared))
    for where, expert in experts:
        tensors = checkpoints[expert.source].tensors
        size = None
        for layer in range(num_layers):
            for p in PROJECTIONS:
                name = dense_mlp(layer, p)
                if name not in tensors:
                    problems.add(f"{where}: {expert.source}", f"has no {name}", None)
                    continue
                shape = tensors[name].shape
                inner = shape[0] if p != "down" else shape[-1]
                expected = (inner, hidden) if p != "down" else (hidden, inner)
                if shape != expected or (size is not None and inner != size):
                    problems.add(f"{where}: {name}", f"unexpected shape {list(shape)}", None)
                size = inner if size is None else size
        if size is not None:
            sizes.append(size)
    expert_sizes = sizes[: len(recipe.experts)]
    if len(set(expert_sizes)) > 1:
        problems.add("experts", f"experts have different MLP sizes {sorted(set(expert_sizes))}")
    return sizes


def _dominant_dtype(dtypes: Mapping[str, int]) -> torch.dtype:
    floats = Counter({code: n for code, n in dtypes.items() if DTYPES[code] in DTYPE_NAMES})
    return DTYPES[floats.most_common(1)[0][0]] if floats else torch.float32


def _card(
    plan: MoePlan, command: str | None, checkpoints: Mapping[Path, Checkpoint]
) -> Callable[[], str]:
    recipe = plan.recipe

    def render() -> str:
        hashes: dict[Path, dict[str, str]] = {}  # a base of several experts is hashed once
        inputs = []
        for path, checkpoint in checkpoints.items():
            role = "base" if path == recipe.base else "expert"
            for part, folder, files in card_parts(role, path, checkpoint.files):
                if folder not in hashes:
                    hashes[folder] = CardInput.of(part, folder, files).file_hashes
                inputs.append(CardInput(part, str(folder), hashes[folder]))
        experts = ", ".join(f"`{e.name}`" for e in recipe.experts)
        summary = (
            f"A {plan.arch.class_name} with {plan.num_experts} experts ({experts}), "
            f"{recipe.experts_per_token} per token, routers initialised by `{recipe.gate_mode}`."
        )
        return model_card(
            title=f"MoE of {plan.num_experts} experts",
            summary=summary,
            command=command,
            inputs=inputs,
            recipe=recipe.text,
            tags=["moe", plan.arch.model_type],
        )

    return render
