"""Evaluation data: text files and three JSONL shapes, validated before any model runs.

- text: any non-JSONL file (one document), or JSONL records with a "text" field;
- choice: JSONL `{"context": str, "choices": [str, ...], "answer": int | str}`;
- preference: JSONL `{"prompt": str, "chosen": str, "rejected": str}`.

The shape of a JSONL file is read from its first record; every record is then checked and all
problems are reported together with their line numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alloy.errors import InputError, Problem

Kind = Literal["text", "choice", "preference"]
_KEYS: dict[Kind, tuple[str, ...]] = {
    "choice": ("context", "choices", "answer"),
    "preference": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Choice:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: Path
    kind: Kind
    items: tuple[Any, ...]  # str | Choice | Preference, by kind


def dataset_name(path: Path) -> str:
    """`<folder>/<stem>`: corpus files like drama/validation.jsonl stay distinguishable."""
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def load_eval_sets(paths: list[Path]) -> list[EvalSet]:
    """Read every file (folders: their files, recursively, sorted); raise all problems at once."""
    problems: list[Problem] = []
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            files += found
            if not found:
                problems.append(Problem(str(path), "empty folder"))
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), "not found", "check the --data path"))
    sets = []
    for file in files:
        try:
            sets.append(_load(file, problems))
        except _SkipError:
            continue
    names = [s.name for s in sets]
    problems += [
        Problem(str(s.path), f"another file is also named {s.name!r}", "rename one")
        for s in sets
        if names.count(s.name) > 1
    ]
    if problems:
        if len(problems) > MAX_PROBLEMS:
            extra = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], Problem("", f"... and {extra} more problems")]
        raise InputError("evaluation data is not usable", problems)
    return sets


class _SkipError(Exception):
    pass


def jsonl_records(
    text: str, file: Path, problems: list[Problem]
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every JSON-object line of `text`; blank lines are skipped and
    every bad line is added to `problems` as `file:line`."""
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{file}:{number}", f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(f"{file}:{number}", "a record must be a JSON object"))
            continue
        records.append((number, record))
    return records


def _load(file: Path, problems: list[Problem]) -> EvalSet:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(str(file), f"not UTF-8 text ({exc.reason})"))
        raise _SkipError from exc
    if file.suffix != ".jsonl":
        if not text.strip():
            problems.append(Problem(str(file), "empty file"))
            raise _SkipError
        return EvalSet(dataset_name(file), file, "text", (text,))
    records = jsonl_records(text, file, problems)
    if not records:
        problems.append(Problem(str(file), "no records"))
        raise _SkipError
    kind = _kind(records[0][1])
    if kind is None:
        problems.append(
            Problem(
                f"{file}:{records[0][0]}",
                f"unknown record shape (keys {sorted(records[0][1])})",
                "expected 'text', or context/choices/answer, or prompt/chosen/rejected",
            )
        )
        raise _SkipError
    items = []
    for number, record in records:
        item = _item(kind, record, f"{file}:{number}", problems)
        if item is not None:
            items.append(item)
    return EvalSet(dataset_name(file), file, kind, tuple(items))


def _kind(record: dict[str, Any]) -> Kind | None:
    for kind in ("choice", "preference", "text"):
        if all(k in record for k in _KEYS[kind]):
            return kind
    return None


def _item(kind: Kind, record: dict[str, Any], where: str, problems: list[Problem]) -> Any:
    missing = [k for k in _KEYS[kind] if k not in record]
    if missing:
        problems.append(Problem(where, f"missing {', '.join(missing)} (this file is {kind} data)"))
        return None
    strings = [k for k in _KEYS[kind] if k not in ("choices", "answer")]
    bad = [k for k in strings if not isinstance(record[k], str)]
    if bad:
        problems.append(Problem(where, f"{', '.join(bad)} must be strings"))
        return None
    if kind == "text":
        if not record["text"].strip():
            problems.append(Problem(where, "empty text"))
            return None
        return record["text"]
    if kind == "preference":
        return Preference(record["prompt"], record["chosen"], record["rejected"])
    choices = record["choices"]
    if not (
        isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) and c for c in choices)
    ):
        problems.append(Problem(where, "choices must be a list of at least two non-empty strings"))
        return None
    answer = record["answer"]
    if isinstance(answer, str):
        if answer not in choices:
            problems.append(Problem(where, f"answer {answer!r} is not one of the choices"))
            return None
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        problems.append(
            Problem(where, f"answer must be an index in [0, {len(choices)}) or a choice")
        )
        return None
    return Choice(record["context"], tuple(choices), answer)
