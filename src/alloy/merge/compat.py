"""Checks that the inputs of a merge can be combined, from headers, configs and tokenizers.

Every problem is collected (nothing is raised half-way) so the user sees them all at once:
missing or unreadable models, different architectures or vocabularies, a tokenizer source that
maps tokens differently.

An input may be `BASE+ADAPTER` (mergekit's spelling): it opens as an `AdaptedCheckpoint` that
folds the PEFT adapter into each tensor as it is read, with BASE's path, config and side files.
A missing base, a missing adapter and an adapter made for another base each get their own
message, under the YAML key that names the input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from alloy.adapters import open_model, split_spec
from alloy.adapters.peftfile import WEIGHTS
from alloy.errors import AlloyError, CheckpointError, InputError, Problem, ProblemCollector
from alloy.io import Checkpoint
from alloy.merge.recipe import Recipe


def open_inputs(
    paths: Sequence[Path], allow_pickle: bool, keys: Mapping[str, str] | None = None
) -> list[Checkpoint]:
    """Open every input (headers only; a `BASE+ADAPTER` input also reads its adapter's small
    tensors); raise one CheckpointError listing every unreadable one.

    Args:
        keys: input path -> the YAML key that names it (e.g. `models[1].model`), for messages.
    """
    problems = ProblemCollector()
    opened: list[Checkpoint] = []
    for path in paths:
        base, adapter = split_spec(path)
        if adapter is not None:
            label = f"{keys[str(path)]}: {path}" if keys and str(path) in keys else str(path)
            checkpoint = _open_adapted(path, base, adapter, label, allow_pickle, problems)
            if checkpoint is not None:
                opened.append(checkpoint)
            continue
        if not path.exists():
            hint = (
                "alloy never downloads; fetch it first (e.g. `hf download "
                f"{path} --local-dir DIR`) and give the folder"
                if not path.is_absolute() and str(path).count("/") == 1
                else "check the path"
            )
            problems.add(str(path), "no such model folder", hint)
            continue
        try:
            opened.append(Checkpoint.open(path, allow_pickle=allow_pickle))
        except CheckpointError as exc:
            problems.extend(exc.problems or [Problem("", exc.message)])
    if problems:
        for checkpoint in opened:
            checkpoint.close()
    problems.raise_if_any(CheckpointError, "cannot read the input models")
    return opened


def _open_adapted(
    spec: Path,
    base: Path,
    adapter: Path,
    label: str,
    allow_pickle: bool,
    problems: ProblemCollector,
) -> Checkpoint | None:
    """Open `BASE+ADAPTER`, or add why not to `problems` (each part checked on its own)."""
    found = True
    if not base.exists():
        hint = "BASE+ADAPTER folds ADAPTER into the model folder BASE; check the part before '+'"
        problems.add(label, f"no such base model folder {base}", hint)
        found = False
    if not adapter.exists():
        hint = "give a folder written by PeftModel.save_pretrained after the '+'"
        problems.add(label, f"no such adapter folder {adapter}", hint)
        found = False
    if not found:
        return None
    try:
        return open_model(spec, allow_pickle=allow_pickle)
    except InputError as exc:  # the base is unreadable, or the adapter (or its fit to the base)
        problems.extend(_failure(label, exc))
    return None


def _failure(label: str, exc: AlloyError) -> list[Problem]:
    """An error's problems under the input's label (the first line says which input it was)."""
    return [Problem(label, exc.message), *exc.problems]


def card_parts(role: str, spec: Path, files: Sequence[Path]) -> list[tuple[str, Path, list[Path]]]:
    """(role, path, weight files) of one input for its model card, given the weight files of
    its model (of BASE, for `BASE+ADAPTER`): the input itself, or the base and then the adapter,
    so that both are named and hashed."""
    base, adapter = split_spec(spec)
    if adapter is None:
        return [(role, spec, list(files))]
    return [(role, base, list(files)), (f"{role} adapter", adapter, [adapter / WEIGHTS])]


def check_compatible(
    by_path: dict[str, Checkpoint], donor: str, problems: ProblemCollector, warnings: list[str]
) -> None:
    """Compare every input with the donor: architecture, vocabulary size and token ids (errors),
    tied embeddings (a warning: the output follows the donor)."""
    ref = by_path[donor]
    ref_info = ref.model_info()
    ref_vocab = vocabulary_digest(ref.path)
    for path, checkpoint in by_path.items():
        if path == donor:
            continue
        info = checkpoint.model_info()
        if info.architecture != ref_info.architecture:
            problems.add(
                path,
                f"architecture {info.architecture} differs from {ref_info.architecture} ({donor})",
                "merge models of one architecture",
            )
        if info.vocab_size != ref_info.vocab_size:
            problems.add(
                path,
                f"vocabulary of {info.vocab_size} tokens, but {donor} has {ref_info.vocab_size}",
                "alloy does not merge different vocabularies (rows of the embeddings would not "
                "mean the same tokens); merge models that share a tokenizer, or resize the "
                "embeddings of one to match first",
            )
        elif ref_vocab is not None:
            vocab = vocabulary_digest(checkpoint.path)
            if vocab is not None and vocab != ref_vocab:
                problems.add(
                    path,
                    f"tokenizer maps tokens to different ids than {donor}'s",
                    "embedding rows would be merged across different tokens; merge models that "
                    "share a tokenizer",
                )
        if info.tied_embeddings != ref_info.tied_embeddings:
            side = "ties" if ref_info.tied_embeddings else "unties"
            warnings.append(
                f"{path}: tied_embeddings={info.tied_embeddings}, but the output {side} its "
                f"embeddings as {donor} does"
            )


def choose_tokenizer_donor(recipe: Recipe, donor: Path, problems: ProblemCollector) -> Path:
    """Where tokenizer files come from: `tokenizer_source` (base or a model), else the donor.

    The source must exist and map tokens to the same ids as the donor's tokenizer: alloy merges
    embeddings row by row and does not remap vocabularies.
    """
    source = recipe.tokenizer_source
    if source is None:
        return donor
    if source == "base":
        if recipe.base_model is None:
            problems.add("tokenizer_source", "'base' but the recipe has no base_model")
            return donor
        return split_spec(recipe.base_model)[0]  # BASE+ADAPTER: side files come from BASE
    path, adapter = split_spec(source)
    if adapter is not None and not adapter.exists():
        problems.add("tokenizer_source", f"{source}: no such adapter folder {adapter}")
    if not path.is_dir():
        what = (
            f"no such base model folder {path}" if adapter is not None else "no such model folder"
        )
        problems.add("tokenizer_source", f"{source}: {what}")
        return donor
    ours, theirs = vocabulary_digest(donor), vocabulary_digest(path)
    if ours is not None and theirs is not None and ours != theirs:
        problems.add(
            "tokenizer_source",
            f"{source}'s tokenizer maps tokens to different ids than {donor}'s",
            "alloy does not remap vocabularies; use a tokenizer of the merged models",
        )
    return path


def vocabulary_digest(folder: Path) -> str | None:
    """A digest of the token -> id map of tokenizer.json (None if there is none)."""
    file = folder / "tokenizer.json" if folder.is_dir() else None
    if file is None or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    added = sorted((t.get("content"), t.get("id")) for t in data.get("added_tokens") or [])
    text = json.dumps([vocab, added], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
