"""MoE recipes: which dense models become the experts of a sparse MoE, and how its routers start.

mergekit-moe recipes are read as they are (same keys, same meaning):

    base_model: small/base            # attention, norms, embeddings and head come from here
    gate_mode: hidden                 # hidden | cheap_embed | random | uniform_random | uniform
    experts_per_token: 2
    dtype: bfloat16                   # default: the base model's
    architecture: mixtral             # mixtral | qwen | qwen3; default from the base model
    experts:
      - source_model: small/experts/fiction
        positive_prompts: ["Once upon a time"]
        negative_prompts: []          # optional
        noise_scale: 0.0              # optional: std of Gaussian noise added to the MLP weights
        residual_scale: 1.0           # optional: multiplies the expert's down projection
    shared_experts:                   # qwen only: exactly one, always active
      - source_model: small/base

alloy adds `name` per expert (a label for reports; default: the folder name), `relative_noise`
per expert (noise std as a fraction of each weight's own std), `seed` (noise and random routers
are seeded, so the same recipe gives the same bytes), and sparse upcycling: give `num_experts`
and no `experts`, and every expert is a copy of the base MLP (`relative_noise` defaults to 0.01
there, so that the copies can drift apart in training).

Any model may be `BASE+ADAPTER` (mergekit's spelling): a PEFT adapter folded into BASE as each
tensor is read (see alloy.adapters), e.g. one LoRA fine-tune of a shared base per expert.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from alloy.errors import ProblemCollector, RecipeError
from alloy.io.yamlfile import StrictModel, read_recipe, validate_schema

Number = float | int
GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random", "uniform"]
PROMPTED_MODES = ("hidden", "cheap_embed")
UPCYCLE_RELATIVE_NOISE = 0.01


_Strict = StrictModel


class ExpertEntry(_Strict):
    source_model: str
    name: str | None = None
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: Number | None = Field(default=None, ge=0)
    relative_noise: Number | None = Field(default=None, ge=0)
    residual_scale: Number | None = None


class MoeRecipeSchema(_Strict):
    base_model: str
    experts: list[ExpertEntry] | None = None
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    architecture: Literal["mixtral", "qwen", "qwen3"] | None = None
    shared_experts: list[ExpertEntry] | None = None
    num_experts: int | None = Field(default=None, ge=1)
    noise_scale: Number | None = Field(default=None, ge=0)
    relative_noise: Number | None = Field(default=None, ge=0)
    seed: int = 0


_NESTED: dict[str, type[BaseModel]] = {"experts": ExpertEntry, "shared_experts": ExpertEntry}


@dataclass(frozen=True)
class Expert:
    """One expert (or the shared expert) of the output, resolved."""

    source: Path
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    noise_scale: float
    relative_noise: float
    residual_scale: float


@dataclass(frozen=True)
class MoeRecipe:
    """A checked recipe; build it with `load_moe_recipe`."""

    base: Path
    experts: tuple[Expert, ...]
    shared: Expert | None
    gate_mode: str
    experts_per_token: int
    dtype: str | None
    architecture: str | None  # None: chosen from the base model
    seed: int
    text: str  # the recipe as YAML, for the model card

    @property
    def sources(self) -> list[Path]:
        """Every model folder the recipe reads, base first, each once."""
        paths = [self.base, *(e.source for e in self.experts)]
        if self.shared is not None:
            paths.append(self.shared.source)
        return list(dict.fromkeys(paths))

    def source_keys(self) -> dict[str, str]:
        """Each model folder -> the YAML key that names it first (for messages)."""
        keys = {str(self.base): "base_model"}
        for i, expert in enumerate(self.experts):
            keys.setdefault(str(expert.source), f"experts.{i}.source_model")
        if self.shared is not None:
            keys.setdefault(str(self.shared.source), "shared_experts.0.source_model")
        return keys


def load_moe_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], *, base_dir: Path | None = None
) -> MoeRecipe:
    """Read and check an MoE recipe (a YAML path, YAML text or a parsed mapping).

    Relative model paths are taken from the working directory (or `base_dir`).

    Raises:
        RecipeError: with every problem found, each with its YAML path.
    """
    import yaml

    raw, origin = read_recipe(source, "MoE recipe", "base_model:, experts:, gate_mode:, ...")
    problems = ProblemCollector()
    schema = validate_schema(raw, MoeRecipeSchema, _NESTED, problems)
    if schema is not None:
        for where, message, hint in _issues(schema):
            problems.add(where, message, hint)
    problems.raise_if_any(RecipeError, f"invalid MoE recipe ({origin})")
    assert schema is not None
    root = base_dir or Path()
    base = root / schema.base_model
    if schema.experts is None:
        assert schema.num_experts is not None
        relative = schema.relative_noise
        if relative is None and schema.noise_scale is None:
            relative = UPCYCLE_RELATIVE_NOISE
        copy = ExpertEntry(
            source_model=schema.base_model,
            noise_scale=schema.noise_scale,
            relative_noise=relative,
        )
        entries = [copy.model_copy(update={"name": f"copy{i}"}) for i in range(schema.num_experts)]
    else:
        entries = schema.experts
    labels = _labels(entries)
    experts = tuple(_expert(e, root, label) for e, label in zip(entries, labels, strict=True))
    shared = None
    if schema.shared_experts:
        entry = schema.shared_experts[0]
        shared = _expert(entry, root, entry.name or "shared")
    text = yaml.safe_dump(schema.model_dump(exclude_none=True), sort_keys=False)
    return MoeRecipe(
        base=base,
        experts=experts,
        shared=shared,
        gate_mode=schema.gate_mode,
        experts_per_token=schema.experts_per_token,
        dtype=schema.dtype,
        architecture=schema.architecture,
        seed=schema.seed,
        text=text,
    )


def upcycle_recipe(
    model: str | os.PathLike[str],
    num_experts: int,
    *,
    experts_per_token: int = 2,
    gate_mode: str = "random",
    relative_noise: float = UPCYCLE_RELATIVE_NOISE,
    architecture: str | None = None,
    seed: int = 0,
) -> MoeRecipe:
    """The recipe of sparse upcycling: `num_experts` copies of `model`'s MLPs."""
    raw: dict[str, Any] = {
        "base_model": str(model),
        "num_experts": num_experts,
        "experts_per_token": experts_per_token,
        "gate_mode": gate_mode,
        "relative_noise": relative_noise,
        "seed": seed,
    }
    if architecture is not None:
        raw["architecture"] = architecture
    return load_moe_recipe(raw)


def _labels(entries: list[ExpertEntry]) -> list[str]:
    """Each expert's name: its `name`, else its folder's name, else (when two experts would share
    one) its last two path parts, else its position."""
    taken = {e.name for e in entries if e.name is not None}
    labels = []
    for i, entry in enumerate(entries):
        if entry.name is not None:
            labels.append(entry.name)
            continue
        parts = Path(entry.source_model).parts
        others = [
            Path(e.source_model).parts for j, e in enumerate(entries) if j != i and e.name is None
        ]
        label = f"expert{i}"
        for depth in (1, 2):
            candidate = "/".join(parts[-depth:])
            if candidate not in taken and all("/".join(o[-depth:]) != candidate for o in others):
                label = candidate
                break
        labels.append(label)
    return labels


def _expert(entry: ExpertEntry, root: Path, name: str) -> Expert:
    return Expert(
        source=root / entry.source_model,
        name=name,
        positive=tuple(entry.positive_prompts or ()),
        negative=tuple(entry.negative_prompts or ()),
        noise_scale=float(entry.noise_scale or 0.0),
        relative_noise=float(entry.relative_noise or 0.0),
        residual_scale=float(1.0 if entry.residual_scale is None else entry.residual_scale),
    )


def _issues(recipe: MoeRecipeSchema) -> list[tuple[str, str, str | None]]:
    issues: list[tuple[str, str, str | None]] = []
    experts = recipe.experts
    if experts is None and recipe.num_experts is None:
        hint = "list the experts, or give num_experts to upcycle copies of base_model"
        issues.append(("experts", "missing", hint))
        return issues
    if experts is not None and recipe.num_experts not in (None, len(experts)):
        message = f"num_experts is {recipe.num_experts} but {len(experts)} experts are listed"
        issues.append(("num_experts", message, "drop num_experts"))
    if experts is None:
        if recipe.gate_mode in PROMPTED_MODES:
            hint = "copies have no prompts; use gate_mode: random (or uniform_random)"
            issues.append(("gate_mode", f"{recipe.gate_mode} needs prompts per expert", hint))
    elif recipe.noise_scale is not None or recipe.relative_noise is not None:
        hint = "set noise per expert when experts are listed"
        issues.append(("noise_scale", "applies to num_experts copies only", hint))
    count = len(experts) if experts is not None else recipe.num_experts or 0
    if count < 2 and experts is not None:
        issues.append(("experts", "an MoE needs at least 2 experts", None))
    if recipe.experts_per_token > count:
        message = f"{recipe.experts_per_token} experts per token but only {count} experts"
        issues.append(("experts_per_token", message, None))
    names: dict[str, int] = {}
    for i, expert in enumerate(experts or []):
        if expert.name is not None and expert.name in names:
            message = f"{expert.name!r} is also the name of expert {names[expert.name]}"
            issues.append((f"experts.{i}.name", message, "names label experts in reports"))
        if expert.name is not None:
            names.setdefault(expert.name, i)
        if recipe.gate_mode in PROMPTED_MODES and not expert.positive_prompts:
            hint = "a few texts this expert should receive, or gate_mode: random"
            issues.append((f"experts.{i}.positive_prompts", f"{recipe.gate_mode} needs them", hint))
        for key in ("positive_prompts", "negative_prompts"):
            prompts = getattr(expert, key) or []
            if any(not p.strip() for p in prompts):
                issues.append((f"experts.{i}.{key}", "has an empty prompt", None))
    if experts is not None and recipe.gate_mode in PROMPTED_MODES:
        prompt_sets = {
            (tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in experts
        }
        if len(prompt_sets) == 1 and len(experts) > 1:
            hint = "the routers would be identical: give each expert its own prompts"
            issues.append(("experts", "every expert has the same prompts", hint))
    shared = recipe.shared_experts
    if shared is not None and len(shared) != 1:
        issues.append(("shared_experts", f"takes exactly one expert, got {len(shared)}", None))
    if shared and recipe.architecture not in (None, "qwen"):
        hint = "architecture: qwen (Qwen2-MoE) has a shared expert"
        issues.append(("shared_experts", f"{recipe.architecture} has no shared expert", hint))
    return issues
