"""Offline averaging of saved training checkpoints, streamed through the merge engine.

Over a finished run the online rules become fixed weights: ordered oldest first, checkpoint i of
n gets w_i with sum_i w_i = 1 (alloy.average.rules):

    uniform   w_i = 1 / n
    ema       w_1 = decay^(n-1), w_i = (1 - decay) * decay^(n-i): the EMA recursion over the
              checkpoints (the first one initialises it), unrolled exactly; `decay` is per
              checkpoint, not per optimizer step (a per-step decay beta with checkpoints every
              S steps is decay = beta^S)
    lawa      w_i = 1 / k for the latest k checkpoints, 0 for the others

The weighted sum is then a `linear` merge with `normalize: true` (alloy.merge.methods.linear),
so it streams tensor by tensor like any merge: peak memory does not grow with the model, the
output appears atomically, and inputs are validated (headers, shapes, architecture) before any
tensor data is read. Checkpoints with weight 0 are not read at all.

Order comes from each folder's trainer_state.json `global_step`, else from a `checkpoint-<N>`
folder name; anything that leaves the order ambiguous (no step, two checkpoints at one step,
the two sources disagreeing) is an error for the methods where order matters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from alloy.average import rules
from alloy.average.options import DEFAULT_K, RANGES
from alloy.errors import InputError, Problem, ProblemCollector
from alloy.merge.engine import Progress

if TYPE_CHECKING:
    from alloy.merge.plan import MergePlan

OfflineMethod = Literal["uniform", "ema", "lawa"]
OFFLINE_METHODS: tuple[str, ...] = get_args(OfflineMethod)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class TrainingCheckpoint:
    """One saved model and the optimizer step it was saved at (None if unknown)."""

    path: Path
    step: int | None


@dataclass(frozen=True)
class AveragePlan:
    """Checkpoints ordered oldest first, each with its weight in the average."""

    method: OfflineMethod
    checkpoints: list[TrainingCheckpoint]
    weights: list[float]
    decay: float | None = None
    k: int | None = None

    def recipe(self) -> dict[str, Any]:
        """The `linear` merge recipe that computes the average (newest checkpoint first, so its
        config and tokenizer files are the ones copied; weight-0 checkpoints left out)."""
        entries = [
            {"model": str(c.path), "parameters": {"weight": w}}
            for c, w in zip(self.checkpoints, self.weights, strict=True)
            if w > 0.0
        ]
        detail = {"uniform": "", "ema": f", decay {self.decay}", "lawa": f", k {self.k}"}
        return {
            "name": f"{self.method} average of {len(entries)} checkpoints{detail[self.method]}",
            "merge_method": "linear",
            "models": entries[::-1],
            "parameters": {"normalize": True},
        }

    def merge_plan(self, *, allow_pickle: bool = False) -> MergePlan:
        """The merge plan of `recipe()`; the planner's errors are worded for checkpoints (no
        recipe, no `slices:`)."""
        from alloy.merge.api import plan

        try:
            return plan(self.recipe(), allow_pickle=allow_pickle)
        except InputError as exc:
            raise reworded(exc, "checkpoints") from exc

    def summary(self) -> str:
        lines = [f"{self.method} average of {len(self.checkpoints)} checkpoints"]
        width = max(len(str(c.path)) for c in self.checkpoints)
        for c, w in zip(self.checkpoints, self.weights, strict=True):
            step = "?" if c.step is None else str(c.step)
            lines.append(f"  {c.path!s:<{width}}  step {step:>8}  weight {w:.6g}")
        return "\n".join(lines)


# The merge planner's words for what a recipe can change, and what they mean for a command
# that averages models it was given (`alloy average`, `alloy soup`) and has no recipe.
_REWORDINGS = (
    ("; use `slices:` to choose layer ranges of equal length", "; average {what} of one model"),
    ("the recipe cannot be applied to these models", "these {what} cannot be averaged"),
    ("these models cannot be merged", "these {what} cannot be averaged"),
    ("the models have", "the {what} have"),
    ("merge models", "average {what}"),
)


def reworded(exc: InputError, what: str) -> InputError:
    """An error of the merge planner reworded for averaging `what` ("checkpoints",
    "candidates"): the user wrote no recipe, so neither "the recipe" nor `slices:` is named."""

    def reword(text: str) -> str:
        for old, new in _REWORDINGS:
            text = text.replace(old, new.format(what=what))
        return text

    problems = [
        Problem(p.where, reword(p.message), reword(p.hint) if p.hint else None)
        for p in exc.problems
    ]
    return type(exc)(reword(exc.message), problems)


def find_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[TrainingCheckpoint]:
    """Expand trajectory folders (holding checkpoint-<N> folders) and read every step.

    Raises:
        InputError: every problem at once: missing paths, folders that are neither a model nor
            a trajectory (or both), a checkpoint listed twice, unreadable trainer_state.json,
            a step there that contradicts the folder name.
    """
    problems = ProblemCollector()
    found: list[TrainingCheckpoint] = []
    seen: dict[Path, str] = {}
    for given in paths:
        path = Path(given)
        for folder in _expand(path, problems):
            key = folder.resolve()
            if key in seen:
                problems.add(str(folder), f"listed twice (also as {seen[key]})")
                continue
            seen[key] = str(folder)
            found.append(TrainingCheckpoint(folder, _step(folder, problems)))
    if not found and not problems:
        problems.add("", "no checkpoints given")
    problems.raise_if_any(InputError, "cannot average these checkpoints")
    return found


def plan_average(
    paths: Sequence[str | os.PathLike[str]],
    *,
    method: str = "uniform",
    decay: float | None = None,
    k: int | None = None,
) -> AveragePlan:
    """Order the checkpoints and compute each one's weight (no tensor data is read).

    Raises:
        InputError: unknown method, options that do not apply or are out of range, order that
            cannot be decided, fewer checkpoints than `k`.
    """
    problems = ProblemCollector()
    if method not in OFFLINE_METHODS:
        choices = ", ".join(OFFLINE_METHODS)
        problems.add("--method", f"unknown method {method!r}", f"choose {choices}")
    if decay is not None and method != "ema":
        problems.add("--decay", f"applies to --method ema only, not {method!r}")
    if k is not None and method != "lawa":
        problems.add("--k", f"applies to --method lawa only, not {method!r}")
    if method == "ema" and decay is None:
        problems.add(
            "--decay",
            "ema needs a decay per checkpoint",
            "e.g. --decay 0.5; a per-step decay b with checkpoints every S steps is b**S",
        )
    for name, value in (("decay", decay), ("k", k)):
        problem = None if value is None else RANGES[name].problem(value)
        if problem:
            problems.add(f"--{name}", problem)
    problems.raise_if_any(InputError, "invalid averaging options")

    checkpoints = find_checkpoints(paths)
    ordered = _ordered(checkpoints, strict=method != "uniform")
    n = len(ordered)
    if method == "uniform":
        weights = rules.uniform_weights(n)
    elif method == "ema":
        assert decay is not None
        weights = rules.ema_weights(n, decay=decay)
    else:
        k = DEFAULT_K if k is None else k
        if k > n:
            raise InputError(
                f"--k {k}: only {n} checkpoint{'s' * (n != 1)} given; pass at least {k}, a "
                "smaller --k, or --method uniform to average them all"
            )
        weights = rules.lawa_weights(n, k=k)
    return AveragePlan(cast(OfflineMethod, method), ordered, weights, decay, k)


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "uniform",
    decay: float | None = None,
    k: int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    hash_inputs: bool = True,
    command: str | None = None,
    on_tensor: Progress | None = None,
) -> Path:
    """Average saved checkpoints into `out` (see the module docstring for the weights).

    `paths` are checkpoint folders or trajectory folders holding checkpoint-<N> folders. The
    output is a Hugging Face folder with the newest checkpoint's config and tokenizer, written
    atomically; a non-empty `out` is replaced only with `force`.

    Raises:
        InputError: bad options or inputs (see `plan_average`, `alloy.merge.api.merge`).
        OutputExistsError: `out` is not empty and `force` is not given.
    """
    from alloy.io.atomic import check_output_folder
    from alloy.io.writable import check_writable
    from alloy.merge.api import merge

    check_output_folder(Path(out), force=force)
    check_writable(out, "OUT")
    average = plan_average(paths, method=method, decay=decay, k=k)
    return merge(
        average.merge_plan(allow_pickle=allow_pickle),
        out,
        force=force,
        allow_pickle=allow_pickle,
        hash_inputs=hash_inputs,
        command=command,
        on_tensor=on_tensor,
    )


def _expand(path: Path, problems: ProblemCollector) -> list[Path]:
    """`path` itself if it is a model folder, its checkpoint-<N> folders if a trajectory."""
    if not path.exists():
        problems.add(str(path), "no such folder")
        return []
    if not path.is_dir():
        problems.add(str(path), "is a file", "pass a checkpoint folder or a folder of them")
        return []
    is_model = any((path / name).is_file() for name in _MODEL_FILES)
    children = sorted(
        (c for c in path.iterdir() if c.is_dir() and _CHECKPOINT.match(c.name)),
        key=lambda c: int(c.name.split("-")[1]),
    )
    if is_model and children:
        problems.add(
            str(path),
            f"holds both a model and {len(children)} checkpoint-<N> folders",
            f"pass the checkpoints ({path}/checkpoint-*) or the model's files explicitly",
        )
        return []
    if not is_model and not children:
        problems.add(
            str(path),
            "neither a model folder (config.json, model.safetensors) nor a training run "
            "(checkpoint-<N> folders)",
        )
        return []
    return children or [path]


def _step(folder: Path, problems: ProblemCollector) -> int | None:
    """The step from trainer_state.json, checked against a checkpoint-<N> name, else the name."""
    match = _CHECKPOINT.match(folder.name)
    from_name = int(match.group(1)) if match else None
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return from_name
    try:
        step = json.loads(state_file.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.add(str(state_file), f"cannot read global_step: {exc}")
        return from_name
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.add(str(state_file), f"global_step must be a non-negative integer, got {step!r}")
        return from_name
    if from_name is not None and from_name != step:
        problems.add(
            str(folder),
            f"ambiguous step: trainer_state.json says global_step {step}, the name says "
            f"{from_name}",
            "rename the folder or fix trainer_state.json",
        )
    return step


def _ordered(checkpoints: list[TrainingCheckpoint], *, strict: bool) -> list[TrainingCheckpoint]:
    """Oldest first. `strict`: the order matters, so every step must be known and distinct."""
    unknown = [c for c in checkpoints if c.step is None]
    if unknown and not strict:
        return list(checkpoints)  # order is irrelevant for a uniform mean; keep the given one
    problems = ProblemCollector()
    for c in unknown:
        problems.add(
            str(c.path),
            "no training step: no trainer_state.json and not named checkpoint-<N>",
            "the order of checkpoints matters for this method; name the folder checkpoint-<N>",
        )
    by_step: dict[int, Path] = {}
    for c in checkpoints:
        if c.step is not None and c.step in by_step:
            problems.add(str(c.path), f"ambiguous order: step {c.step} is also {by_step[c.step]}")
        elif c.step is not None:
            by_step[c.step] = c.path
    if strict:
        problems.raise_if_any(InputError, "cannot order the checkpoints")
    elif problems:  # uniform: duplicates do not matter either
        return list(checkpoints)
    return sorted(checkpoints, key=lambda c: c.step if c.step is not None else -1)
