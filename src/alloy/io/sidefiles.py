"""The files beside the weights: config, generation config, tokenizer, chat template.

An output model takes all of them from exactly one donor folder, chosen by a fixed rule by the
caller (for merges: the base model, else the first model listed), so the same inputs always give
the same output files. Weights, indexes, model cards and anything unknown are not copied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alloy.errors import CheckpointError

CONFIG = "config.json"
MODEL_FILES = (
    CONFIG,
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = MODEL_FILES + TOKENIZER_FILES
# transformers 5 writes the weights' dtype as "dtype"; older configs say "torch_dtype".
DTYPE_KEYS = ("dtype", "torch_dtype")

T = TypeVar("T")


def choose_donor(base: T | None, models: Sequence[T]) -> T:
    """The deterministic donor of side files: the base model if any, else the first model."""
    if base is not None:
        return base
    if not models:
        raise ValueError("no model to take side files from")
    return models[0]


def side_files(folder: Path, names: tuple[str, ...] = SIDE_FILES) -> list[Path]:
    """The side files among `names` present in `folder`, in a fixed order (tokenizer files bring
    the `additional_chat_templates/` folder along)."""
    present = [folder / name for name in names if (folder / name).is_file()]
    templates = folder / "additional_chat_templates"
    if "tokenizer_config.json" in names and templates.is_dir():
        present.extend(sorted(p for p in templates.iterdir() if p.is_file()))
    return present


def updated_config(config: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `updates` applied; a `dtype` update also replaces a legacy `torch_dtype`."""
    result = dict(config)
    for key, value in updates.items():
        if key in DTYPE_KEYS:
            for legacy in DTYPE_KEYS:
                result.pop(legacy, None)
            result["dtype"] = value
        else:
            result[key] = value
    return result


def copy_side_files(
    donor: Path,
    dest: Path,
    config_updates: Mapping[str, Any],
    tokenizer_donor: Path | None = None,
    tokenizer: bool = True,
) -> list[str]:
    """Copy the donor's side files into `dest`, applying `config_updates` to config.json.

    Tokenizer files (and chat templates) come from `tokenizer_donor` when given (none with
    `tokenizer=False`), the model files (config, generation config) always from `donor`. Returns
    the names copied. Raises CheckpointError if updates are asked for and the donor has no
    readable config.json.
    """
    copied = []
    tokenizer_folder = tokenizer_donor or donor
    sources = [(donor, p) for p in side_files(donor, MODEL_FILES)]
    names = TOKENIZER_FILES if tokenizer else ()
    sources += [(tokenizer_folder, p) for p in side_files(tokenizer_folder, names)]
    for folder, source in sources:
        relative = source.relative_to(folder)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.name == CONFIG and relative.parent == Path():
            try:
                config = json.loads(source.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{source}: cannot read config: {exc}") from exc
            text = json.dumps(updated_config(config, config_updates), indent=2, sort_keys=True)
            target.write_text(text + "\n", encoding="utf-8")
        else:
            shutil.copyfile(source, target)
        copied.append(str(relative))
    if config_updates and CONFIG not in copied:
        raise CheckpointError(f"{donor}: no {CONFIG} to apply {sorted(config_updates)} to")
    return copied
