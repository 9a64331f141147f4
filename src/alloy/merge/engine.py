"""The streaming merge executor: read, compute and write overlap; memory stays bounded.

Every output tensor is produced by its method's Merger (alloy.merge.blocks). A small tensor is
read whole and merged in memory; a large one is streamed: each of the Merger's reduction passes
reads it block by block from disk (the page cache, in practice), then the output is produced and
written block by block. So memory holds a few blocks, never a whole large tensor, and peak memory
does not grow with the model.

Stages run at once:
    readers (threads)  positioned reads of the upcoming inputs, in their stored dtype, as far
                       ahead as a byte budget allows (at least one read ahead)
    compute            inputs -> compute dtype on the target device, the Merger, cast to the
                       output dtype, back to the CPU, then a positioned write of the result
                       into its planned place in the output. Whole tensors are independent and
                       run on worker threads, several at once; streamed tensors run in order on
                       the calling thread.
File reads and writes and torch kernels release the GIL, so the stages overlap on CPU cores.

A `BASE+ADAPTER` input is an `AdaptedCheckpoint` (alloy.adapters): its reads, whole or by row
block, fold the adapter's update into the base rows on the reader threads, so it streams like a
folded model on disk and memory holds only the adapter's small factors besides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from alloy.adapters import open_model
from alloy.device import resolve_device  # `--device` parsing lives in alloy.device
from alloy.io import Checkpoint, CheckpointWriter, TensorSpec
from alloy.io.writer import DEFAULT_MAX_SHARD_BYTES
from alloy.merge.blocks import Block, Merger, block_seed, partition, run_blocks, wants
from alloy.merge.plan import MergePlan, TensorJob

READ_AHEAD_BYTES = 64 << 20
WHOLE_BYTES = 32 << 20  # jobs whose inputs are at most this large are read and merged whole
COMPUTE_THREADS = 2  # whole tensors merged concurrently (torch ops release the GIL)

Progress = Callable[[TensorJob], None]


def tune_allocator() -> None:
    """Keep freed block buffers in the heap instead of returning them to the kernel.

    Every block read or computed is a few MB; glibc serves such sizes with fresh mmaps by
    default, so each one costs a page fault per 4 KB and the kernel time rivals the merge
    itself (measured: 1B linear merge, 7 s -> 5 s of system time). Raising the mmap and trim
    thresholds lets the same pages be reused. One arena for all threads, too: a block is often
    allocated by a reader thread and freed by a worker, and with an arena per thread each arena
    keeps faulting in fresh pages (measured: 1B linear merge, 220-460k -> 160-210k page faults,
    40k of them torch's import). A no-op where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 256 << 20)
    mallopt(m_trim_threshold, 512 << 20)
    mallopt(m_arena_max, 1)


@dataclass(frozen=True)
class _Read:
    """One step of the schedule: read a job's inputs (whole, or rows [start, stop))."""

    job: int
    rows: tuple[int, int] | None
    step: int  # reduction pass, or `passes` for the output pass
    block: int  # index in the job's partition
    last: bool  # last block of this step
    nbytes: int


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
    copy_tokenizer: bool = True,
    extra_files: Mapping[str, str] | None = None,
    read_ahead_bytes: int = READ_AHEAD_BYTES,
    whole_bytes: int = WHOLE_BYTES,
) -> Path:
    """Run a plan and write the merged checkpoint to `out` atomically (`extra_files`: name ->
    text, written beside it; `copy_tokenizer=False`: no tokenizer files)."""
    target = resolve_device(device)
    tune_allocator()
    specs = [TensorSpec(job.name, job.shape, job.out_dtype) for job in plan.jobs]
    with ExitStack() as stack:
        checkpoints = [
            stack.enter_context(open_model(p, allow_pickle=allow_pickle)) for p in plan.paths
        ]
        writer = stack.enter_context(
            CheckpointWriter(
                out,
                specs,
                max_shard_bytes=max_shard_bytes,
                force=force,
                donor=plan.donor,
                tokenizer_donor=plan.tokenizer_donor,
                copy_tokenizer=copy_tokenizer,
                config_updates=plan.config_updates,
                model_card=model_card,
                extra_files=extra_files,
            )
        )
        # Each reader and worker runs single-threaded torch ops (readers fold the adapters of
        # BASE+ADAPTER inputs): on small blocks, intra-op threads cost more CPU than they save,
        # and the threads already keep the cores busy.
        readers = stack.enter_context(
            ThreadPoolExecutor(2, "alloy-read", initializer=torch.set_num_threads, initargs=(1,))
        )
        workers = stack.enter_context(
            ThreadPoolExecutor(
                COMPUTE_THREADS, "alloy-merge", initializer=torch.set_num_threads, initargs=(1,)
            )
        )
        mergers: dict[int, tuple[Merger, int]] = {}  # streamed jobs: Merger and its passes
        schedule = _schedule(plan, checkpoints, mergers, whole_bytes)
        running: deque[Future[None]] = deque()

        def whole(job: TensorJob, read: _Read, inputs: list[torch.Tensor]) -> None:
            _step(plan, job, read, inputs, mergers, target, writer.write)
            inputs.clear()
            if on_tensor is not None:
                on_tensor(job)

        try:
            reads = _read_ahead(
                schedule,
                plan,
                checkpoints,
                readers,
                read_ahead_bytes,
                lambda read: _needed(read, mergers),
            )
            for read, inputs in reads:
                job = plan.jobs[read.job]
                if read.rows is None:
                    # Whole tensors are independent: merge several at once on the workers.
                    while len(running) >= COMPUTE_THREADS:
                        running.popleft().result()
                    running.append(workers.submit(whole, job, read, list(inputs)))
                    inputs.clear()  # the read-ahead machinery still references this list
                    continue
                done = _step(plan, job, read, inputs, mergers, target, writer.write)
                inputs.clear()
                if done and on_tensor is not None:
                    on_tensor(job)
            while running:
                running.popleft().result()
        except BaseException:
            readers.shutdown(wait=True, cancel_futures=True)
            workers.shutdown(wait=True, cancel_futures=True)
            raise
    return Path(out)


def _job_bytes(job: TensorJob, checkpoints: list[Checkpoint]) -> int:
    return sum(checkpoints[s.model].tensors[s.name].nbytes for s in job.sources)


def _schedule(
    plan: MergePlan,
    checkpoints: list[Checkpoint],
    mergers: dict[int, tuple[Merger, int]],
    whole_bytes: int,
) -> list[_Read]:
    """The reads the merge makes: whole jobs once, streamed jobs once per pass.

    Streamed reads (handled in order on the calling thread) are interleaved with whole-job reads
    (handled by the workers) in proportion to their bytes, so both kinds of work overlap.
    """
    whole: list[_Read] = []
    streamed: list[_Read] = []
    for j, job in enumerate(plan.jobs):
        size = _job_bytes(job, checkpoints)
        if job.copy or size <= whole_bytes or not job.shape:
            whole.append(_Read(j, None, 0, 0, True, size))
            continue
        merger = plan.method.make(len(job.models), **job.params)
        passes = merger.start(job.shape, plan.compute_dtype)
        mergers[j] = (merger, passes)
        blocks = partition(job.shape)
        row_bytes = size // job.shape[0]
        for step in range(passes + 1):
            for index, (start, stop) in enumerate(blocks):
                last = index == len(blocks) - 1
                streamed.append(
                    _Read(j, (start, stop), step, index, last, (stop - start) * row_bytes)
                )
    return _interleave(whole, streamed)


def _interleave(first: list[_Read], second: list[_Read]) -> list[_Read]:
    """Merge two read sequences, keeping each one's order, balancing bytes as they go."""
    merged: list[_Read] = []
    i = j = 0
    done_first = done_second = 0
    total_first = sum(r.nbytes for r in first) or 1
    total_second = sum(r.nbytes for r in second) or 1
    while i < len(first) or j < len(second):
        take_first = j >= len(second) or (
            i < len(first) and done_first / total_first <= done_second / total_second
        )
        if take_first:
            merged.append(first[i])
            done_first += first[i].nbytes
            i += 1
        else:
            merged.append(second[j])
            done_second += second[j].nbytes
            j += 1
    return merged


def _read(read: _Read, job: TensorJob, checkpoints: list[Checkpoint]) -> list[torch.Tensor]:
    return [checkpoints[s.model].read(s.name, rows=read.rows) for s in job.sources]


def _read_ahead(
    schedule: list[_Read],
    plan: MergePlan,
    checkpoints: list[Checkpoint],
    pool: ThreadPoolExecutor,
    budget: int,
    needed: Callable[[_Read], bool],
) -> Iterator[tuple[_Read, list[torch.Tensor]]]:
    """Yield (read, tensors) in order while later reads proceed in the background.

    A read that is no longer `needed` when its turn to be submitted comes yields no tensors.
    """
    queue: deque[tuple[_Read, Future[list[torch.Tensor]]]] = deque()
    in_flight = 0
    upcoming = iter(schedule)
    exhausted = False
    while True:
        while not exhausted and (not queue or in_flight < budget):
            read = next(upcoming, None)
            if read is None:
                exhausted = True
                break
            if not needed(read):
                skipped: Future[list[torch.Tensor]] = Future()
                skipped.set_result([])
                queue.append((read, skipped))
                continue
            job = plan.jobs[read.job]
            queue.append((read, pool.submit(_read, read, job, checkpoints)))
            in_flight += read.nbytes
        if not queue:
            return
        read, future = queue.popleft()
        tensors = future.result()
        if tensors:
            in_flight -= read.nbytes
        yield read, tensors


def _needed(read: _Read, mergers: dict[int, tuple[Merger, int]]) -> bool:
    """False for a block of a reduction pass its Merger no longer wants (no need to read it)."""
    if read.rows is None or read.job not in mergers:
        return True
    merger, passes = mergers[read.job]
    return read.step >= passes or wants(merger, read.step)


def _step(
    plan: MergePlan,
    job: TensorJob,
    read: _Read,
    inputs: list[torch.Tensor],
    mergers: dict[int, tuple[Merger, int]],
    device: torch.device,
    write: Callable[..., None],
) -> bool:
    """Consume one read: merge a whole job, or feed one block to a streamed job's Merger.

    Returns whether the job's output is now complete.
    """
    if job.copy:
        write(job.name, inputs[0].to(job.out_dtype))
        return True
    if not _needed(read, mergers):
        return False  # a pass the Merger no longer needs (its block was not read)

    def prepare(tensor: torch.Tensor) -> torch.Tensor:
        if plan.input_dtype is not None:
            tensor = tensor.to(plan.input_dtype)  # mergekit's `dtype`: inputs rounded first
        return tensor.to(device=device, dtype=plan.compute_dtype)

    tensors = [prepare(t) for t in inputs]
    models = tensors[: len(job.models)]
    base = tensors[len(job.models)] if job.base is not None else None
    if read.rows is None:
        whole = plan.method.make(len(models), **job.params)
        for row, part in run_blocks(whole, models, base, seed=job.seed):
            write(job.name, part.to(dtype=job.out_dtype).cpu(), row=row)
        return True
    merger, passes = mergers[read.job]
    block = Block(models, base, read.block, read.rows[0], block_seed(job.seed, read.block))
    if read.step < passes:
        merger.reduce(read.step, block)
        if read.last:
            merger.end(read.step)
        return False
    result = merger.apply(block)
    write(job.name, result.to(dtype=job.out_dtype).cpu(), row=read.rows[0])
    if read.last:
        del mergers[read.job]
    return read.last
