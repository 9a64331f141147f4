"""The least a Python process can do for a linear merge: a bf16 mean in numpy, nothing else.

    python benchmarks/merge/numpy_linear.py OUT.safetensors MODEL_DIR MODEL_DIR ...

A yardstick for benchmarks/merge/bench.py, not a tool: no recipe, no validation, no config or
tokenizer files, no model card, no atomic folder, bf16 inputs of identical layout only. It reads
every input tensor in 64k-element chunks, averages them in float32 (mul, add, divide: the same
operations, in the same order, as alloy's `linear` with unit weights) and rounds to bf16 with
round-to-nearest-even, on two threads, then fsyncs one output file. Its wall time is what the
interpreter, numpy and the unavoidable I/O and arithmetic cost, i.e. how close to the I/O floor
any Python merge tool could get on this machine.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 1 << 16  # elements; the working buffers stay in cache


def tensors(folder: Path) -> dict[str, tuple[int, int, int, list[int]]]:
    """name -> (fd, absolute byte offset, byte length, shape) over every shard of a folder."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        fd = os.open(file, os.O_RDONLY)
        size = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
        header = json.loads(os.pread(fd, size, 8))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] != "BF16":
                sys.exit(f"{file}: {name} is {info['dtype']}; this yardstick handles BF16 only")
            start, stop = info["data_offsets"]
            found[name] = (fd, 8 + size + start, stop - start, info["shape"])
    return found


def main() -> None:
    out, folders = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    inputs = [tensors(f) for f in folders]
    names = sorted(inputs[0], key=lambda n: -inputs[0][n][2])  # largest first: balanced threads
    header: dict[str, dict] = {}
    offset = 0
    for name in sorted(names):
        length = inputs[0][name][2]
        header[name] = {
            "dtype": "BF16",
            "shape": inputs[0][name][3],
            "data_offsets": [offset, offset + length],
        }
        offset += length
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.pwrite(fd, struct.pack("<Q", len(text)) + text, 0)
    data_start = 8 + len(text)
    count = np.float32(len(inputs))

    def average(name: str) -> None:
        raw = np.empty(CHUNK, np.uint16)
        wide = np.zeros(2 * CHUNK, np.uint16)  # bf16 bits in the high half of each float32
        value = wide.view(np.float32)
        total = np.empty(CHUNK, np.float32)
        bits = total.view(np.uint32)
        carry = np.empty(CHUNK, np.uint32)
        rounded = np.empty(CHUNK, np.uint16)
        elements = inputs[0][name][2] // 2
        for start in range(0, elements, CHUNK):
            n = min(CHUNK, elements - start)
            for k, table in enumerate(inputs):
                source, at, _, _ = table[name]
                os.preadv(source, [raw[:n].data], at + 2 * start)
                wide[1 : 2 * n : 2] = raw[:n]
                if k == 0:
                    np.multiply(value[:n], np.float32(1), out=total[:n])
                else:
                    np.add(total[:n], value[:n], out=total[:n])  # x * 1.0 is exact: skipped
            np.divide(total[:n], count, out=total[:n])
            # float32 -> bf16, round to nearest even (finite values; averages of bf16 are)
            np.right_shift(bits[:n], 16, out=carry[:n])
            np.bitwise_and(carry[:n], 1, out=carry[:n])
            np.add(carry[:n], 0x7FFF, out=carry[:n])
            np.add(bits[:n], carry[:n], out=bits[:n])
            np.right_shift(bits[:n], 16, out=bits[:n])
            rounded[:n] = bits[:n]
            os.pwrite(
                fd,
                rounded[:n].data,
                data_start + header[name]["data_offsets"][0] + 2 * start,
            )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(average, names))
    os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    main()
