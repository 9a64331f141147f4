"""One error hierarchy for the whole library.

Every error a user can cause derives from `InputError` (CLI exit code 2); failures that are not the
user's fault derive from `AlloyError` directly (exit code 1). An error may carry several
`Problem`s so that validation reports everything wrong at once instead of one thing per run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where it is, what is wrong, and how to fix it."""

    where: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} ({self.hint})" if self.hint else text


class AlloyError(Exception):
    """Base class. `exit_code` is what the CLI returns for it."""

    exit_code = 1

    def __init__(self, message: str, problems: Iterable[Problem] = ()) -> None:
        self.message = message
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        lines = [self.message] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class InputError(AlloyError):
    """The user's input (files, recipe, flags) is wrong; fixable by the user."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint folder or file is missing, truncated, corrupt or not understood."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint was refused because the user did not opt in."""


class IncompatibleModelsError(InputError):
    """Several checkpoints cannot be combined (architecture, shapes, vocabulary...)."""


class RecipeError(InputError):
    """A recipe is invalid; carries every problem found."""


class NonFiniteError(InputError):
    """A result (merged tensor, score, logits) holds NaN or infinity; nothing was kept."""


class OutputExistsError(InputError):
    """The output folder exists and is not empty, and `force` was not given."""


class ProblemCollector:
    """Gathers problems during validation, then raises them together.

    >>> problems = ProblemCollector()
    >>> problems.add("config.json", "missing", "copy it from the base model")
    >>> problems.raise_if_any(CheckpointError, "checkpoint is invalid")
    Traceback (most recent call last):
    ...
    alloy.errors.CheckpointError: checkpoint is invalid
      - config.json: missing (copy it from the base model)
    """

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, where: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(where, message, hint))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self, error: type[AlloyError], message: str) -> None:
        if self.problems:
            raise error(message, self.problems)


def did_you_mean(word: str, options: Iterable[str], what: str) -> str:
    """A hint for a misspelt `word`: the closest of `options` (if any) and all of them."""
    names = sorted(options)
    listing = f"{what}: {', '.join(names) if names else '(none)'}"
    close = difflib.get_close_matches(word, names, n=1)
    return f"did you mean {close[0]!r}? {listing}" if close else listing
