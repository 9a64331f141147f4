"""A training run resolved from its recipe before any weight is loaded: batches, steps, rows.

`plan_training` checks an adapter or GaLore's targets against the model's modules (adapter.py),
reads the tokenizer and the data (every problem of every file reported at once),
decides the batch split (global batch = micro batch x accumulation x processes), the number of
steps (from max_steps, max_tokens or epochs), the exact row of every step (packing.py) and the
schedule; `TrainPlan.summary()` is what `alloy train --dry-run` prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alloy.errors import InputError, Problem
from alloy.train.adapter import (
    GALORE_OPTIMIZERS,
    AdapterPlan,
    GaLorePlan,
    plan_adapter,
    plan_galore,
)
from alloy.train.data import TokenizedSource, load_sources, resolve_sources
from alloy.train.objectives import OBJECTIVES, ObjectiveSpec
from alloy.train.order_data import order_sources
from alloy.train.packing import (
    BlockRows,
    ExampleRows,
    Rows,
    TrainRows,
    mixture_order,
    row_length,
)
from alloy.train.recipe import Recipe
from alloy.train.schedules import (
    SCHEDULES,
    Infinite,
    Schedule,
    WarmupStableDecay,
    describe,
    key_steps,
)

DEFAULT_MAX_LENGTH = 2048


@dataclass
class TrainPlan:
    recipe: Recipe
    objective: ObjectiveSpec
    tokenizer: Any
    config: Any  # the student's transformers config
    world: int
    micro_batch: int
    accumulation: int
    sequence_length: int
    steps: int
    rows: TrainRows
    sources: list[TokenizedSource]  # new data, then replay
    replay_from: int
    row_kind: str  # blocks or examples
    schedule: Schedule
    row_tokens: np.ndarray  # (N,) tokens of each row of the run
    notes: list[str] = field(default_factory=list)
    adapter: AdapterPlan | None = None  # what an `adapter:` trains
    galore: GaLorePlan | None = None  # the matrices a GaLore optimizer projects

    @property
    def batch_size(self) -> int:
        return self.recipe.spec.batch_size

    @property
    def total_tokens(self) -> int:
        return int(self.row_tokens.sum())

    @property
    def replay_tokens(self) -> int:
        return int(self.row_tokens[self.rows.order >= self.replay_from].sum())

    def tokens_by_source(self) -> dict[str, int]:
        out = {}
        for j, source in enumerate(self.sources):
            out[source.name] = int(self.row_tokens[self.rows.order == j].sum())
        return out

    def memory_estimate(self) -> dict[str, float]:
        """Rough bytes of the training state: fp32 weights, gradients, AdamW moments, the
        activations of one micro batch, and the logits (with their softmax and gradient)."""
        config = self.config
        params = parameter_count(config)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
        layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        tokens = self.micro_batch * self.sequence_length * (2 if self.row_kind == "pairs" else 1)
        trained = self.adapter.trainable if self.adapter is not None else params
        optimizer = 8 if self.recipe.spec.optimizer.name == "adamw" else 4
        estimate = {
            "weights": 4.0 * (params if self.adapter is None else self.adapter.total),
            "gradients": 4.0 * trained,
            "optimizer": float(optimizer * trained)
            if self.galore is None
            else self.galore.optimizer_bytes(params),
            # about 34 bytes per token, layer and hidden unit for a transformer block kept for
            # backward in fp32 (Korthikanti et al. 2022, without recomputation), halved for bf16
            "activations": 34.0 * tokens * hidden * layers / (2 if self.precision_half else 1),
            # a reward model scores one value per position, not the vocabulary
            "logits": 3 * 4.0 * tokens * (1 if self.objective.name == "reward" else vocab),
        }
        if self.row_kind == "pairs":
            from alloy.train.preference import reference_folder, settings

            spec = self.recipe.spec
            live = spec.objective == "dpo" and not settings(spec).precompute_reference
            if live and reference_folder(spec) is not None:
                estimate["reference weights"] = 4.0 * params
        teacher = self.recipe.spec.teacher
        if (teacher is not None and not teacher.cache) or self.objective.name == "context_distill":
            estimate["teacher logits"] = 4.0 * tokens * vocab
        return estimate

    @property
    def precision_half(self) -> bool:
        return self.recipe.spec.precision != "fp32"

    def schedule_points(self) -> list[tuple[int, float]]:
        return [(s, self.schedule(s)) for s in key_steps(self.schedule, self.steps)]

    def summary(self) -> str:
        spec = self.recipe.spec
        lines = [
            f"objective: {spec.objective} ({self.objective.summary})",
            f"model: {spec.model.path or 'new weights from ' + str(spec.model.config)}"
            f" ({parameter_count(self.config) / 1e6:,.1f}M parameters)",
            f"steps: {self.steps:,} of {self.batch_size} rows x {self.sequence_length} tokens "
            f"(micro batch {self.micro_batch} x accumulation {self.accumulation} x "
            f"{self.world} process{'es' if self.world > 1 else ''})",
            f"rows: {self.row_kind}; tokens: {self.total_tokens:,} "
            f"({self.total_tokens / max(1, self.steps):,.0f} per step)",
        ]
        for j, (name, tokens) in enumerate(self.tokens_by_source().items()):
            share = tokens / max(1, self.total_tokens)
            epochs = self.rows.epochs[j]
            lines.append(
                f"  {name}: {tokens:,} tokens ({share:.1%}), "
                f"{epochs} epoch{'s' if epochs != 1 else ''}"
            )
        if spec.replay is not None:
            share = self.replay_tokens / max(1, self.total_tokens)
            lines.append(f"replay: {share:.2%} of tokens (asked {float(spec.replay.fraction):.2%})")
        described = describe(self.schedule)
        params = ", ".join(f"{k}={v}" for k, v in described.items() if k != "name")
        lines.append(f"schedule: {described['name']} ({params})")
        lines.append(
            "  lr at step: " + ", ".join(f"{s}: {lr:.3g}" for s, lr in self.schedule_points())
        )
        memory = self.memory_estimate()
        total = sum(memory.values())
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in memory.items())
        lines.append(f"memory: about {total / 2**30:.2f} GiB per process ({parts} GiB)")
        if self.adapter is not None:
            lines.append(self.adapter.summary())
        if self.galore is not None:
            lines.append(
                f"optimizer: GaLore rank {self.galore.rank} on {len(self.galore.targets)} "
                "weight matrices"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def parameter_count(config: Any) -> int:
    """Parameters of a model built from `config` (on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def world_size() -> int:
    """Processes of this run (accelerate / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_config_and_tokenizer(recipe: Recipe) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from alloy.eval.scorer import load_pretrained

    model = recipe.spec.model
    if model.path is not None:
        folder = Path(model.path)
        return load_pretrained(folder, AutoConfig), load_pretrained(folder, AutoTokenizer)
    assert model.config is not None and model.tokenizer is not None
    if isinstance(model.config, dict):
        settings = dict(model.config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise InputError(
                "cannot build the model", [Problem("model.config", "needs model_type: llama (say)")]
            )
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError("cannot build the model", [Problem("model.config", str(exc))]) from exc
    else:
        config = load_pretrained(Path(model.config), AutoConfig, "model.config")
    tokenizer = load_pretrained(Path(model.tokenizer), AutoTokenizer, "model.tokenizer")
    return config, tokenizer


def plan_training(
    recipe: Recipe, *, world: int | None = None, say: Callable[[str], None] | None = None
) -> TrainPlan:
    """Everything about a run that needs no weights (see the module docstring).

    Raises:
        InputError: bad data, a batch that does not split, a sequence longer than the model's
            context, an objective given data it cannot use.
    """
    spec = recipe.spec
    objective = OBJECTIVES[spec.objective]
    world = world or world_size()
    micro, accumulation = split_batch(spec, world)
    config, tokenizer = load_config_and_tokenizer(recipe)
    reward = spec.objective == "reward"
    adapter = (
        plan_adapter(spec.adapter, config, reward=reward) if spec.adapter is not None else None
    )
    galore = (
        plan_galore(spec.optimizer, config) if spec.optimizer.name in GALORE_OPTIMIZERS else None
    )
    context = int(
        getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0
    )
    length = spec.sequence_length or min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if context and length > context:
        raise InputError(
            "cannot train",
            [Problem("sequence_length", f"{length} is longer than the model's context {context}")],
        )
    new = resolve_sources(spec.data, recipe.lab_root)
    old = resolve_sources(spec.replay.data, recipe.lab_root) if spec.replay else []
    tokenized = load_sources([*new, *old], tokenizer)
    if say is not None:
        cached = sum(t.cached for t in tokenized)
        say(
            f"data: {len(tokenized)} sources, {sum(t.tokens for t in tokenized):,} tokens "
            f"({cached} read from the token cache)"
        )
    kind = _row_kind(objective, tokenized)
    notes: list[str] = []
    tokenized = order_sources([*new, *old], tokenized, kind, spec, tokenizer, notes)
    rows: list[Rows] = []
    for j, source in enumerate(tokenized):
        if kind == "pairs":
            rows.append(_pair_rows(source, length, spec.seed, j, notes))
        elif kind == "blocks":
            own = spec.document_attention  # each document attends to its own tokens only
            rows.append(BlockRows(source, length, seed=spec.seed, index=j, document_attention=own))
        else:
            example = ExampleRows(source, length, seed=spec.seed, index=j, pack=bool(spec.pack))
            if example.truncated:
                notes.append(
                    f"{source.name}: {example.truncated} examples longer than "
                    f"{length} tokens keep their first {length}"
                )
            if example.empty:
                notes.append(
                    f"{source.name}: {len(example.empty)} examples dropped (the "
                    "prompt fills the whole row)"
                )
            rows.append(example)
    short = [r.name for r in rows if r.epoch_size(0) == 0]
    if short:
        raise InputError(
            "cannot train",
            [
                Problem(
                    f"data {name}",
                    f"shorter than one row of {length} tokens",
                    "add data or lower sequence_length",
                )
                for name in short
            ],
        )
    global_batch = spec.batch_size
    count = _row_count(spec, rows, len(new), global_batch, length, kind)
    steps = math.ceil(count / global_batch)
    weights = [float(e.weight) for e in spec.data]
    replay_weights = [float(e.weight) for e in spec.replay.data] if spec.replay else []
    fraction = float(spec.replay.fraction) if spec.replay else 0.0
    order = mixture_order(
        weights, steps * global_batch, replay=replay_weights, replay_fraction=fraction
    )
    train_rows = TrainRows(rows, order, replay_from=len(new))
    row_tokens = np.fromiter(
        (row_length(train_rows[i]) for i in range(len(order)))
        if kind in ("examples", "pairs")
        else (length for _ in order),
        dtype=np.int64,
        count=len(order),
    )
    schedule = build_schedule(spec.schedule, steps)
    _check_schedule_fits(schedule, steps)
    if galore is not None:
        full = [name for name, shape in galore.targets if min(shape) <= galore.rank]
        if full:
            notes.append(
                f"GaLore rank {galore.rank} is not below the smaller side of {len(full)} of its "
                f"{len(galore.targets)} matrices (e.g. {full[0]}): they get full-rank updates"
            )
    return TrainPlan(
        recipe,
        objective,
        tokenizer,
        config,
        world,
        micro,
        accumulation,
        length,
        steps,
        train_rows,
        tokenized,
        len(new),
        kind,
        schedule,
        row_tokens,
        notes,
        adapter,
        galore,
    )


def split_batch(spec: Any, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for the recipe's global batch."""
    batch = spec.batch_size
    if spec.micro_batch_size is not None:
        micro = spec.micro_batch_size
        if batch % (micro * world):
            raise InputError(
                "cannot split the batch",
                [
                    Problem(
                        "micro_batch_size",
                        f"batch_size {batch} is not a multiple of micro_batch_size "
                        f"{micro} x {world} processes",
                        None,
                    )
                ],
            )
        return micro, batch // (micro * world)
    accumulation = spec.gradient_accumulation or 1
    if batch % (accumulation * world):
        raise InputError(
            "cannot split the batch",
            [
                Problem(
                    "batch_size",
                    f"{batch} rows do not split over {accumulation} accumulation steps x "
                    f"{world} processes",
                    "make batch_size a multiple of their product",
                )
            ],
        )
    return batch // (accumulation * world), accumulation


def _pair_rows(source: TokenizedSource, length: int, seed: int, j: int, notes: list[str]) -> Rows:
    from alloy.train.pairs import PairRows

    rows = PairRows(source, length, seed=seed, index=j)
    if rows.truncated:
        notes.append(
            f"{source.name}: {rows.truncated} pairs longer than {length} tokens are cut "
            "(the prompt from its left, then the answers)"
        )
    if rows.identical:
        notes.append(
            f"{source.name}: {rows.identical} pairs whose chosen and rejected answers are the "
            "same tokens (they add log 2 to the loss and nothing to the gradient)"
        )
    return rows


def _row_kind(objective: ObjectiveSpec, sources: list[TokenizedSource]) -> str:
    from alloy.train.pairs import PREFERENCE_KINDS

    pairs = [s.name for s in sources if set(s.kinds) & set(PREFERENCE_KINDS)]
    if objective.rows == "pairs" or pairs:
        other = [s.name for s in sources if set(s.kinds) - set(PREFERENCE_KINDS)]
        if objective.rows == "pairs" and not other:
            return "pairs"
        names = other if objective.rows == "pairs" else pairs
        message = "has records that are not preference pairs"
        hint = "give prompt/chosen/rejected records"
        if objective.rows != "pairs":
            message, hint = "has preference pairs", "train on them with objective: dpo or reward"
        raise InputError(
            f"{objective.name} cannot use this data",
            [Problem(f"data {name}", message, hint) for name in names],
        )
    structured = [s.name for s in sources if set(s.kinds) - {"text"}]
    if objective.rows == "blocks":
        return "blocks"
    if objective.rows == "either":
        return "examples" if structured else "blocks"
    plain = [s.name for s in sources if "text" in s.kinds]
    if plain:
        raise InputError(
            f"{objective.name} needs examples",
            [
                Problem(
                    f"data {name}",
                    "has plain text records",
                    "give prompt/completion or messages records (or use causal_lm)",
                )
                for name in plain
            ],
        )
    return "examples"


def _row_count(spec: Any, rows: list[Rows], new: int, batch: int, length: int, kind: str) -> int:
    fraction = float(spec.replay.fraction) if spec.replay else 0.0
    if spec.max_steps is not None:
        return int(spec.max_steps) * batch
    if spec.epochs is not None:
        per_epoch = sum(r.epoch_size(0) for r in rows[:new])
        return max(1, math.ceil(float(spec.epochs) * per_epoch / (1 - fraction)))
    tokens = int(spec.max_tokens)
    if kind == "blocks":
        return max(1, math.ceil(tokens / length))
    # Examples differ in length: lay the run out a step at a time until the budget is spent.
    weights = [float(e.weight) for e in spec.data]
    replay = [float(e.weight) for e in spec.replay.data] if spec.replay else []
    count = 0
    estimate = max(batch, math.ceil(tokens / length))
    while True:
        order = mixture_order(weights, estimate, replay=replay, replay_fraction=fraction)
        train_rows = TrainRows(rows, order, replay_from=new)
        lengths = np.array([row_length(train_rows[i]) for i in range(len(order))])
        reached = np.flatnonzero(np.cumsum(lengths) >= tokens)
        if len(reached):
            count = int(reached[0]) + 1
            return count
        estimate *= 2


def build_schedule(schedule: dict[str, Any], steps: int) -> Schedule:
    """The recipe's schedule over a run of `steps` steps (`total` defaults to `steps`)."""
    values = {k: v for k, v in schedule.items() if k != "name"}
    cls = SCHEDULES[schedule["name"]]
    if "total" in {f for f in cls.__dataclass_fields__} and "total" not in values:
        values["total"] = steps
    return cls(**values)


def _check_schedule_fits(schedule: Schedule, steps: int) -> None:
    """Phases must fit the run: warm-up, cool-down and decay inside the schedule's total."""
    problems = []
    total = getattr(schedule, "total", None)
    warmup = schedule.warmup
    if total is not None and warmup > total:
        problems.append(
            Problem(
                "schedule.warmup",
                f"{warmup} steps is longer than the run ({total} steps)",
                "shorten the warm-up",
            )
        )
    if isinstance(schedule, WarmupStableDecay) and warmup + schedule.decay > schedule.total:
        problems.append(
            Problem(
                "schedule.decay",
                f"warm-up {warmup} + decay {schedule.decay} exceed the {schedule.total} steps",
                None,
            )
        )
    if isinstance(schedule, Infinite):
        busy = warmup + schedule.cooldown + schedule.anneal
        if busy > schedule.total:
            problems.append(
                Problem(
                    "schedule",
                    f"warm-up + cooldown + anneal = {busy} steps "
                    f"exceed the {schedule.total} steps of the run",
                    None,
                )
            )
    if problems:
        raise InputError("the schedule does not fit the run", problems)
