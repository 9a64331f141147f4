"""`AveragingCallback`: weight averages along a transformers.Trainer run, saved as HF folders.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[AveragingCallback({"ema": {"decay": 0.999},
                                                    "lawa": {"k": 5, "every": 200}})])
    trainer.train()

Each average is updated after every optimizer step (`on_step_end`, so gradient accumulation
counts optimizer steps, not micro-batches) and written as a normal Hugging Face model folder:

    <output_dir>/checkpoint-<step>/                   Trainer's own checkpoint
    <output_dir>/checkpoint-<step>/averaged-<name>/   the average at that step (on_save)
    <output_dir>/averaged-<name>/                     the average at the end (on_train_end)

Why inside the checkpoint folder rather than beside it as `checkpoint-<step>-<name>`: Trainer's
checkpoint rotation (`save_total_limit`) globs `checkpoint-*` and reads the step with the regex
`checkpoint-([0-9]+)`, so sibling folders would count as checkpoints and push real ones out
early. Inside, an average is rotated out together with its checkpoint, and resuming (which looks
for `checkpoint-<N>` exactly) is not affected. Existing average folders are replaced: a run
rewrites its own output folder, as Trainer does.

In a plain PyTorch loop use `WeightAverager` directly:

    averager = WeightAverager(model, method="ema", decay=0.999)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.update(model)
    averager.save_pretrained(model, "out/averaged-ema", tokenizer=tokenizer)

Resuming: each `checkpoint-<step>/averaged-<name>/` also holds `averager-state.safetensors`,
the exact state (fp32 shadow or LaWA snapshots, counters). A run resumed from
`<output_dir>/checkpoint-<step>` reloads it and continues every average as if never stopped;
without it (or with other options) the average restarts at the resume step, with a warning.

Limits: with DDP every rank keeps its own average of the same weights and only the main process
writes. FSDP and DeepSpeed ZeRO-3 shard the parameters, which the averager would see as
shards: not supported.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alloy.average.averager import WeightAverager
from alloy.average.options import METHODS, AveragingOptions
from alloy.errors import CheckpointError, InputError, Problem

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Specs = str | Sequence[str] | Mapping[str, Mapping[str, Any] | WeightAverager]


class AveragingCallback(TrainerCallback):
    """Keep weight averages during `Trainer.train()` and save them beside the checkpoints.

    Args:
        averagers: what to average, by name (the name goes into folder names):
            "ema" or ["ema", "swa"]: methods with their default options;
            {"ema": {"decay": 0.9999}, "ema-fast": {"method": "ema", "decay": 0.99},
            "lawa": {"k": 5, "every": 100}}: options of `WeightAverager` per name (`method`
            defaults to the name); a `WeightAverager` already built is also accepted.
        save_checkpoints: save every average whenever Trainer saves a checkpoint.
        save_final: save every average to <output_dir>/averaged-<name>/ when training ends.
        tokenizer: a tokenizer (or a folder of tokenizer files) to save with the averages;
            by default Trainer's `processing_class`.

    Raises:
        InputError: every invalid name or option, before training starts.
    """

    def __init__(
        self,
        averagers: Specs = "ema",
        *,
        save_checkpoints: bool = True,
        save_final: bool = True,
        tokenizer: Any = None,
    ) -> None:
        self.specs = check_averaging_specs(averagers)
        self.averagers: dict[str, WeightAverager] = {
            name: spec for name, spec in self.specs.items() if isinstance(spec, WeightAverager)
        }
        self.save_checkpoints = save_checkpoints
        self.save_final = save_final
        self.tokenizer = tokenizer

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        for name, spec in self.specs.items():
            if name not in self.averagers and isinstance(spec, Mapping):
                self.averagers[name] = WeightAverager(model, **spec)
        if state.global_step == 0:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for name, averager in self.averagers.items():
            folder = checkpoint / f"averaged-{name}"
            try:
                averager.load_state(folder)
            except CheckpointError as error:
                log.warning(
                    "AveragingCallback: training resumes at step %d but average %r cannot "
                    "continue (%s); it restarts there",
                    state.global_step,
                    name,
                    str(error).replace("\n", " "),
                )
            else:
                log.info("AveragingCallback: %s continues from %s", name, folder)

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        for averager in self.averagers.values():
            averager.update(model, step=state.global_step)

    def on_save(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.save_checkpoints and state.is_world_process_zero and folder.is_dir():
            self._save(model, folder, kwargs.get("processing_class"), with_state=True)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if self.save_final and state.is_world_process_zero:
            self._save(model, Path(args.output_dir), kwargs.get("processing_class"))

    def _save(
        self, model: Any, folder: Path, processing_class: Any, *, with_state: bool = False
    ) -> None:
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        for name, averager in self.averagers.items():
            if averager.count == 0:
                log.info("AveragingCallback: %s has averaged nothing yet; not saved", name)
                continue
            out = averager.save_pretrained(
                model, folder / f"averaged-{name}", force=True, tokenizer=tokenizer
            )
            if with_state:
                averager.save_state(out)


def check_averaging_specs(averagers: Specs) -> dict[str, dict[str, Any] | WeightAverager]:
    """Normalise the `averagers` argument and check every name and option at once."""
    if isinstance(averagers, str):
        averagers = [averagers]
    given: Mapping[str, Mapping[str, Any] | WeightAverager] = (
        averagers if isinstance(averagers, Mapping) else {name: {} for name in averagers}
    )
    problems: list[Problem] = []
    specs: dict[str, dict[str, Any] | WeightAverager] = {}
    if not given:
        problems.append(Problem("averagers", "nothing to average", "e.g. AveragingCallback('ema')"))
    for name, spec in given.items():
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                Problem(
                    repr(name), "not a usable name", "letters, digits, '_', '.', '-' (a folder)"
                )
            )
            continue
        if isinstance(spec, WeightAverager):
            specs[name] = spec
            continue
        if not isinstance(spec, Mapping):
            hint = "give a dict of WeightAverager options or a WeightAverager"
            problems.append(Problem(name, f"{spec!r} is not a set of options", hint))
            continue
        options = dict(spec)
        method = options.pop("method", name if name in METHODS else None)
        if method is None:
            hint = f"add 'method': one of {', '.join(METHODS)}"
            problems.append(Problem(name, "no method", hint))
            continue
        try:
            AveragingOptions.check(method, where=name, **options)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        specs[name] = {"method": method, **options}
    if problems:
        raise InputError("invalid AveragingCallback averagers", problems)
    return specs
