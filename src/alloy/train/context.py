"""Context distillation settings: the recipe's `context:` section and its checks.

    objective: context_distill
    model: runs/lab/models/smollm2-135m    # the student, and (frozen) the teacher
    context:
      path: prompts/quiz-8shot.txt          # or text: "..."; taken verbatim, newlines included
      loss: forward_kl                      # the KD settings of `teacher:` (forward_kl |
      temperature: 1.0                      #   reverse_kl | jsd, temperature, beta, top_k);
      alpha: 1.0                            #   alpha defaults to 1 here: pure distillation

The teacher is the start model reading `context + prompt + answer`; the student reads `prompt +
answer`, and learns the teacher's distributions on the answer tokens (Snell et al. 2022,
https://arxiv.org/abs/2209.15189). The objective is in objectives/context_distill.py.

`DistillSettings` are the fields every distillation shares (a `teacher:` entry has them too, with
its model and cache), checked once by `distill_issues`. Everything here is checked before any
weight is loaded; with `check_paths`, the context file is read and its tokens counted with the
model's tokenizer, so a context that leaves no room for the rows in the model's positions is
reported with the rest of the recipe's problems. This module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alloy.io.yamlfile import StrictModel

Number = float | int
Issue = tuple[str, str, str | None]  # (YAML path, problem, hint)
DEFAULT_MAX_LENGTH = 2048  # = plan.DEFAULT_MAX_LENGTH (rows when sequence_length is not given)


class DistillSettings(StrictModel):
    """How a student is pulled towards a teacher (losses.distillation_loss)."""

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: Number = Field(default=1.0, gt=0)
    alpha: Number = Field(default=0.5, ge=0, le=1)  # weight of the distillation term
    beta: Number = Field(default=0.5, gt=0, lt=1)  # jsd only
    top_k: int = Field(default=0, ge=0)  # 0: the full distribution


class ContextEntry(DistillSettings):
    path: str | None = None  # a UTF-8 text file holding the context
    text: str | None = None  # or the context itself
    alpha: Number = Field(default=1.0, ge=0, le=1)  # 1: the teacher's distributions only


def distill_issues(settings: DistillSettings, where: str, *, instead: str) -> list[Issue]:
    """Problems of a section's KD settings (`where`: its YAML path; `instead`: what to use
    when the teacher is not wanted at all)."""
    issues: list[Issue] = []
    if settings.loss == "reverse_kl" and settings.top_k:
        issues.append(
            (
                f"{where}.top_k",
                "reverse_kl needs the teacher's full distribution",
                "set top_k: 0, or use forward_kl or jsd",
            )
        )
    if settings.alpha == 0:
        issues.append((f"{where}.alpha", "alpha 0 ignores the teacher", f"use {instead}"))
    return issues


def context_issues(spec: Any, *, check_paths: bool = True) -> list[Issue]:
    """Problems of `objective: context_distill` and `context:` (`spec` is the TrainRecipe)."""
    entry: ContextEntry | None = spec.context
    if spec.objective != "context_distill":
        if entry is not None:
            hint = "remove it, or use objective: context_distill"
            return [("context", f"{spec.objective} does not use a context", hint)]
        return []
    if entry is None:
        hint = "add context: {path: FILE} (or {text: ...}): what the teacher reads first"
        return [("context", "context_distill needs a context", hint)]
    issues = distill_issues(entry, "context", instead="objective: sft")
    if spec.model.path is None:
        issues.append(
            (
                "model",
                "context_distill's teacher is the start model, and new weights have none",
                "give model: PATH (a checkpoint)",
            )
        )
    if (entry.path is None) == (entry.text is None):
        issues.append(("context", "give path or text (exactly one)", None))
        return issues
    text = entry.text
    if entry.path is not None:
        if not check_paths:
            return issues
        text, problem = read_context(Path(entry.path))
        if problem is not None:
            issues.append(("context.path", *problem))
            return issues
    assert text is not None
    if not text.strip():
        where = "context.path" if entry.path is not None else "context.text"
        hint = "write the instruction or few-shot examples the teacher should read"
        issues.append((where, f"{entry.path or 'the text'} is empty", hint))
    elif check_paths and spec.model.path is not None:
        issues += _length_issues(spec, text)
    return issues


def read_context(path: Path) -> tuple[str, tuple[str, str | None] | None]:
    """(text, None), or ("", (problem, hint)) when the file cannot be used."""
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        return "", (f"{path}: {what}", "a text file, relative to the working directory")
    try:
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError as exc:
        return "", (f"{path}: not UTF-8 text ({exc.reason})", None)
    except OSError as exc:
        return "", (f"{path}: cannot read ({exc.strerror})", None)


def context_text(entry: ContextEntry) -> str:
    """The context as the teacher reads it (the recipe was checked: the file is readable)."""
    if entry.text is not None:
        return entry.text
    return Path(str(entry.path)).read_text(encoding="utf-8")


def _length_issues(spec: Any, text: str) -> list[Issue]:
    """The teacher reads context + row: both must fit in the model's positions."""
    import json

    folder = Path(spec.model.path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return []  # the model's own checks report it
    positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
    if not positions:
        return []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return []  # the plan reports a missing tokenizer
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = spec.sequence_length or min(positions, DEFAULT_MAX_LENGTH)
    if tokens + rows <= positions:
        return []
    room = positions - tokens
    hint = (
        f"set sequence_length: {room} or less" if room > 1 else "shorten the context"
    ) + " (the teacher reads the context, then the row)"
    return [
        (
            "context",
            f"{tokens} context tokens + rows of {rows} exceed the model's {positions} positions",
            hint,
        )
    ]
