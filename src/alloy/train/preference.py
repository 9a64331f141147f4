"""Preference optimisation settings: the recipe's `preference:` section and its checks.

    objective: dpo
    preference:
      beta: 0.1                 # strength of the pull towards the reference
      loss: sigmoid             # sigmoid (DPO) | ipo
      label_smoothing: 0.0      # sigmoid: conservative DPO's ε, in [0, 0.5)
      length_normalize: false   # mean instead of sum of the answer's token log-probs
      reference: null           # a model folder; none: the policy's own starting weights
      precompute_reference: false   # reference log-probs once, before training (cached)

    objective: reward           # a Bradley-Terry reward model on the same pairs
    preference:
      center_rewards: 0.0       # η of the auxiliary η (r_c + r_r)² (TRL's coefficient)

What the reference is: `reference:` when given; otherwise, with an `adapter:`, the base model
with the adapter switched off (PEFT's `disable_adapter()`, no second model in memory); otherwise
one frozen copy of the starting model. Everything here is checked before any weight is loaded
(the reference's tokenizer against the policy's in `check_reference_tokenizer`). The losses are
in losses.py, the data in pairs.py, the objectives in objectives/dpo.py and objectives/reward.py.
Each objective refuses the keys that only the other uses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from alloy.errors import IncompatibleModelsError, did_you_mean
from alloy.io.yamlfile import StrictModel

Number = float | int
Issue = tuple[str, str, str | None]  # (YAML path, problem, hint)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
LOSSES = ("sigmoid", "ipo")  # = losses.PREFERENCE_LOSSES (this module imports no torch)


class PreferenceEntry(StrictModel):
    beta: Number = Field(default=0.1, gt=0)
    loss: str = "sigmoid"  # checked in preference_issues, with a did-you-mean
    label_smoothing: Number = Field(default=0.0, ge=0, lt=0.5)
    length_normalize: bool = False
    reference: str | None = None  # a model folder
    precompute_reference: bool = False
    center_rewards: Number = Field(default=0.0, ge=0)  # reward only


PAIR_OBJECTIVES = ("dpo", "reward")
REWARD_KEYS = ("center_rewards",)
DPO_KEYS = tuple(k for k in PreferenceEntry.model_fields if k not in REWARD_KEYS)


def settings(spec: Any) -> PreferenceEntry:
    """The recipe's `preference:` section, or its defaults (`spec` is the TrainRecipe)."""
    return spec.preference if spec.preference is not None else PreferenceEntry()


def averages_logprobs(entry: PreferenceEntry) -> bool:
    """Whether answers are scored by their mean token log-probability (IPO always is)."""
    return entry.length_normalize or entry.loss == "ipo"


def reference_folder(spec: Any) -> Path | None:
    """The folder the reference's weights are read from, or None when the reference is the
    adapter-disabled policy itself (a live reference with an adapter)."""
    entry = settings(spec)
    if entry.reference is not None:
        return Path(entry.reference)
    if spec.adapter is not None and not entry.precompute_reference:
        return None
    return Path(spec.model.path) if spec.model.path is not None else None


def preference_issues(spec: Any, *, check_paths: bool = True) -> list[Issue]:
    """Problems of `objective: dpo` and `preference:` checkable without weights."""
    entry = spec.preference
    if spec.objective not in PAIR_OBJECTIVES:
        if entry is not None:
            return [("preference", f"{spec.objective} does not use preference settings", None)]
        return []
    issues = _pair_data_issues(spec)
    if spec.objective == "reward":
        return issues + _reward_issues(spec, check_paths=check_paths)
    entry = settings(spec)
    for key in REWARD_KEYS:
        if key in entry.model_fields_set:
            issues.append((f"preference.{key}", "applies to objective: reward only", "remove it"))
    if entry.loss not in LOSSES:
        hint = did_you_mean(entry.loss, LOSSES, "losses")
        issues.append(("preference.loss", f"unknown preference loss {entry.loss!r}", hint))
    if entry.label_smoothing and entry.loss == "ipo":
        issues.append(("preference.label_smoothing", "applies to loss: sigmoid only", None))
    if entry.reference is None and spec.model.path is None:
        issues.append(
            (
                "preference.reference",
                "a model trained from new weights has no starting model to be the reference",
                "give reference: PATH",
            )
        )
    if check_paths and entry.reference is not None:
        issues += _reference_folder_issues(Path(entry.reference))
    return issues


def _pair_data_issues(spec: Any) -> list[Issue]:
    """What neither pair objective can train on."""
    name = spec.objective
    issues: list[Issue] = []
    if spec.replay is not None:
        issues.append(("replay", f"{name} trains on preference pairs only", "remove replay:"))
    for i, data in enumerate(spec.data):
        if data.bootstrap is not None:  # it resamples items, and a pair is two of them
            issues.append((f"data.{i}.bootstrap", f"not supported by {name}", "remove it"))
    return issues


def _reward_issues(spec: Any, *, check_paths: bool) -> list[Issue]:
    """`objective: reward`: no dpo keys; a start model that is already a reward model gives
    one score."""
    issues: list[Issue] = []
    entry = spec.preference
    for key in DPO_KEYS:
        if entry is not None and key in entry.model_fields_set:
            message = "applies to objective: dpo only (a reward model has no reference or β)"
            issues.append((f"preference.{key}", message, "remove it"))
    config = Path(spec.model.path or "") / "config.json"
    if check_paths and spec.model.path is not None and config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            return issues  # the model checks report an unreadable config
        architecture = str((values.get("architectures") or [""])[0])
        labels = len(values.get("id2label") or {}) or int(values.get("num_labels", 1) or 1)
        if architecture.endswith("ForSequenceClassification") and labels != 1:
            issues.append(
                (
                    "model",
                    f"{config}: a classifier of {labels} labels, not a reward model (one score)",
                    "start from a causal LM or a reward model",
                )
            )
    return issues


def _reference_folder_issues(folder: Path) -> list[Issue]:
    config = folder / "config.json"
    if not config.is_file():
        return [
            ("preference.reference", f"{folder}: no config.json", "a Hugging Face model folder")
        ]
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return [("preference.reference", f"{config}: not a JSON config ({exc})", None)]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return [("preference.reference", f"{folder}: no weights (*.safetensors)", None)]
    return []


def check_reference_tokenizer(recipe: Any, tokenizer: Any) -> None:
    """Raise unless an explicit `reference:` shares the policy's tokenizer id for id (when its
    folder has tokenizer files; a bare `save_pretrained` model folder has none) and its config
    scores every id of the policy's tokenizer.

    Raises:
        IncompatibleModelsError: the reference scores other tokens (with the first that differ).
    """
    from transformers import AutoConfig, AutoTokenizer

    from alloy.errors import Problem
    from alloy.eval.scorer import load_pretrained
    from alloy.train.teacher import check_same_tokenizer

    entry = settings(recipe.spec)
    if recipe.spec.objective != "dpo" or entry.reference is None:
        return
    folder = Path(entry.reference)
    try:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            other = load_pretrained(folder, AutoTokenizer, f"reference {folder}")
            check_same_tokenizer(tokenizer, other, str(folder))
    except IncompatibleModelsError as error:
        raise IncompatibleModelsError(
            "the reference does not share the policy's tokenizer",
            [
                dataclasses.replace(
                    p, where="preference.reference", hint="use a reference of the policy's family"
                )
                for p in error.problems
            ],
        ) from None
    vocab = int(getattr(load_pretrained(folder, AutoConfig), "vocab_size", 0) or 0)
    if vocab < len(tokenizer):
        raise IncompatibleModelsError(
            "the reference does not fit the policy's tokenizer",
            [
                Problem(
                    "preference.reference",
                    f"{folder} scores {vocab} tokens, the tokenizer has {len(tokenizer)}",
                )
            ],
        )
