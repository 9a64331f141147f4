"""The Python entry points of merging: `merge` (files in, files out) and `merge_state_dicts`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from alloy.adapters import split_spec
from alloy.errors import IncompatibleModelsError, InputError
from alloy.io import CardInput, Checkpoint, model_card
from alloy.io.atomic import check_output_folder
from alloy.io.writer import DEFAULT_MAX_SHARD_BYTES
from alloy.merge.compat import card_parts
from alloy.merge.engine import Progress, execute
from alloy.merge.plan import MergePlan, plan_merge, tensor_seed
from alloy.merge.recipe import Recipe, load_recipe
from alloy.merge.registry import get_method

# mergekit writes the recipe it ran under this name in the output folder; so does alloy.
MERGEKIT_CONFIG = "mergekit_config.yml"


def plan(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe, *, allow_pickle: bool = False
) -> MergePlan:
    """Validate a recipe against its models (headers and configs only) and return the plan."""
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return plan_merge(parsed, allow_pickle=allow_pickle)


def merge(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe | MergePlan,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    hash_inputs: bool = True,
    command: str | None = None,
    on_tensor: Progress | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
) -> Path:
    """Merge the models of a recipe (a YAML path, YAML text, a mapping, a Recipe, or the
    MergePlan that `plan` returned) into `out`.

    Everything is validated before any tensor data is read. The output folder appears only when
    complete (see alloy.io.CheckpointWriter); `force` replaces a non-empty one.

    Args:
        hash_inputs: record the SHA-256 of every input weight file in the model card (read in a
            background thread while the merge runs).
        command: the command line to record in the model card.
        copy_tokenizer: False writes no tokenizer files (mergekit's --no-copy-tokenizer).
        write_model_card: False writes no README.md (mergekit's --no-write-model-card).

    Beside the weights, `mergekit_config.yml` holds the recipe as mergekit writes it there.
    """
    merge_plan = (
        recipe if isinstance(recipe, MergePlan) else plan(recipe, allow_pickle=allow_pickle)
    )
    check_output_folder(Path(out), force=force)  # before any input is hashed or read
    with ThreadPoolExecutor(1, thread_name_prefix="alloy-hash") as hasher:
        card = (
            _card_later(merge_plan, command, hasher if hash_inputs else None, allow_pickle)
            if write_model_card
            else None
        )
        return execute(
            merge_plan,
            out,
            force=force,
            device=device,
            max_shard_bytes=max_shard_bytes,
            model_card=card,
            allow_pickle=allow_pickle,
            on_tensor=on_tensor,
            copy_tokenizer=copy_tokenizer,
            extra_files={MERGEKIT_CONFIG: merge_plan.recipe.source_yaml()},
        )


def _card_later(
    merge_plan: MergePlan,
    command: str | None,
    hasher: ThreadPoolExecutor | None,
    allow_pickle: bool,
) -> Callable[[], str]:
    recipe = merge_plan.recipe
    roles = {str(recipe.base_model): "base"} if recipe.base_model else {}
    # One row per input; a BASE+ADAPTER input gives two, the base and the adapter, both hashed.
    # A folder that is several inputs' base (or an input too) is hashed once.
    parts: list[tuple[str, Path, list[Path]]] = []
    for path in merge_plan.paths:
        with Checkpoint.open(split_spec(path)[0], allow_pickle=allow_pickle) as checkpoint:
            parts += card_parts(roles.get(str(path), "model"), path, checkpoint.files)
    digests: dict[Path, Future[CardInput]] = {}
    for role, path, files in parts:
        if hasher is not None and path not in digests:
            digests[path] = hasher.submit(CardInput.of, role, path, files)

    def render() -> str:
        inputs = [
            CardInput(role, str(path), digests[path].result().file_hashes if digests else {})
            for role, path, _ in parts
        ]
        return model_card(
            title=recipe.name
            or f"{merge_plan.method.name} merge of {len(merge_plan.paths)} models",
            summary=(
                f"Merged with the `{merge_plan.method.name}` method "
                f"([reference]({merge_plan.method.reference}))."
            ),
            command=command,
            inputs=inputs,
            recipe=recipe.to_yaml(),
            tags=["merge", merge_plan.method.name],
        )

    return render


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **parameters: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with one method, tensor by tensor (fp32 maths, dtypes kept).

    Per-model parameters are given as lists with one value per model (or one scalar for all);
    shared parameters as scalars. Random methods are seeded per tensor from `seed` and the
    tensor's name, exactly as `merge` does, so both give the same result.

    Raises:
        IncompatibleModelsError: the state dicts do not hold the same tensors with the same shapes.
        InputError: unknown method or parameter.
    """
    try:
        spec = get_method(method)
    except KeyError:
        raise InputError(f"unknown merge method {method!r}; see `alloy methods`") from None
    unknown = set(parameters) - set(spec.params)
    if unknown:
        raise InputError(
            f"{method} has no parameters {sorted(unknown)}; see `alloy methods {method}`"
        )
    if not models:
        raise InputError("merge_state_dicts needs at least one model")
    names = list(models[0])
    for k, state in enumerate([*models[1:], *([base] if base is not None else [])]):
        if list(state) != names and set(state) != set(names):
            raise IncompatibleModelsError(f"state dict {k + 1} holds different tensor names")
    params: dict[str, Any] = {}
    for name, value in parameters.items():
        per_model = spec.params[name].per_model
        params[name] = (
            list(value)
            if per_model and isinstance(value, (list, tuple))
            else ([value] * len(models) if per_model else value)
        )
    result = {}
    for name in names:
        inputs = [state[name] for state in models]
        if len({tuple(t.shape) for t in inputs}) > 1:
            raise IncompatibleModelsError(f"{name}: shapes differ across models")
        dtype = inputs[0].dtype
        if not dtype.is_floating_point:
            result[name] = (base[name] if base is not None else inputs[0]).clone()
            continue
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        generator = torch.Generator().manual_seed(tensor_seed(seed, name)) if spec.random else None
        merged = spec(
            [t.to(compute) for t in inputs],
            base=base[name].to(compute) if base is not None else None,
            generator=generator,
            **params,
        )
        result[name] = merged.to(dtype)
    return result
