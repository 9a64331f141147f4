"""The streaming merge executor: read, compute and write overlap; memory stays bounded.

Three stages run at once:
    readers (threads)  positioned reads of the next jobs' input tensors, in their stored dtype,
                       as far ahead as a byte budget allows (at least one job ahead)
    compute (caller)   inputs -> compute dtype on the target device, the method, cast to the
                       output dtype, back to the CPU
    writer (thread)    positioned write of each result into its pre-planned place in the output
File reads and writes and torch kernels release the GIL, so the stages overlap on CPU cores.

Peak memory is the read-ahead budget plus one job's working set plus the pending writes (at most
two results); it does not grow with the number of tensors or the size of the model beyond the
largest single tensor.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch

from alloy.errors import InputError
from alloy.io import Checkpoint, CheckpointWriter, TensorSpec
from alloy.io.writer import DEFAULT_MAX_SHARD_BYTES
from alloy.merge.plan import MergePlan, TensorJob

READ_AHEAD_BYTES = 256 << 20
MAX_PENDING_WRITES = 2

Progress = Callable[[TensorJob], None]


def resolve_device(device: str) -> torch.device:
    """The torch device for `--device`, with a clear error when it is not available."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available here; use --device cpu")
    return target


def execute(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    model_card: str | Callable[[], str] | None = None,
    allow_pickle: bool = False,
    on_tensor: Progress | None = None,
    read_ahead_bytes: int = READ_AHEAD_BYTES,
) -> Path:
    """Run a plan and write the merged checkpoint to `out` atomically."""
    target = resolve_device(device)
    specs = [TensorSpec(job.name, job.shape, job.out_dtype) for job in plan.jobs]
    with ExitStack() as stack:
        checkpoints = [
            stack.enter_context(Checkpoint.open(p, allow_pickle=allow_pickle)) for p in plan.paths
        ]
        writer = stack.enter_context(
            CheckpointWriter(
                out,
                specs,
                max_shard_bytes=max_shard_bytes,
                force=force,
                donor=plan.donor,
                config_updates=plan.config_updates,
                model_card=model_card,
            )
        )
        readers = stack.enter_context(ThreadPoolExecutor(2, thread_name_prefix="alloy-read"))
        writes = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="alloy-write"))
        pending: deque[Future[None]] = deque()
        try:
            for job, inputs in _read_ahead(plan.jobs, checkpoints, readers, read_ahead_bytes):
                result = _compute(plan, job, inputs, target)
                inputs.clear()  # the read-ahead machinery still references this list
                while len(pending) >= MAX_PENDING_WRITES:
                    pending.popleft().result()
                pending.append(writes.submit(writer.write, job.name, result))
                del result
                if on_tensor is not None:
                    on_tensor(job)
            while pending:
                pending.popleft().result()
        except BaseException:
            readers.shutdown(wait=True, cancel_futures=True)
            writes.shutdown(wait=True, cancel_futures=True)
            raise
    return Path(out)


def _read_job(job: TensorJob, checkpoints: list[Checkpoint]) -> list[torch.Tensor]:
    return [checkpoints[s.model].read(s.name) for s in job.sources]


def _job_bytes(job: TensorJob, checkpoints: list[Checkpoint]) -> int:
    return sum(checkpoints[s.model].tensors[s.name].nbytes for s in job.sources)


def _read_ahead(
    jobs: list[TensorJob],
    checkpoints: list[Checkpoint],
    pool: ThreadPoolExecutor,
    budget: int,
) -> Iterator[tuple[TensorJob, list[torch.Tensor]]]:
    """Yield (job, inputs) in order while reading later jobs' inputs in the background."""
    queue: deque[tuple[TensorJob, int, Future[list[torch.Tensor]]]] = deque()
    in_flight = 0
    upcoming = iter(jobs)
    exhausted = False
    while True:
        while not exhausted and (not queue or in_flight < budget):
            job = next(upcoming, None)
            if job is None:
                exhausted = True
                break
            size = _job_bytes(job, checkpoints)
            queue.append((job, size, pool.submit(_read_job, job, checkpoints)))
            in_flight += size
        if not queue:
            return
        job, size, future = queue.popleft()
        inputs = future.result()
        in_flight -= size
        yield job, inputs


def _compute(
    plan: MergePlan, job: TensorJob, inputs: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    if job.copy:
        return inputs[0].to(job.out_dtype)

    def prepare(tensor: torch.Tensor) -> torch.Tensor:
        if plan.input_dtype is not None:
            tensor = tensor.to(plan.input_dtype)  # mergekit's `dtype`: inputs rounded first
        return tensor.to(device=device, dtype=plan.compute_dtype)

    models = [prepare(t) for t in inputs[: len(job.models)]]
    base = prepare(inputs[len(job.models)]) if job.base is not None else None
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=device).manual_seed(job.seed)
    result = plan.method(models, base=base, generator=generator, **job.params)
    return result.to(dtype=job.out_dtype).cpu()
