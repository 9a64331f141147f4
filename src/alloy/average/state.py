"""An averager's exact state on disk, so a resumed training run continues its averages.

The averaged model that `save_pretrained` writes is rounded to the model's dtype; resuming from it
would lose the fp32 shadow's precision (and LaWA's window). This file keeps what `update` needs:
the fp32 shadow (EMA/SWA) or the k snapshots (LaWA), and the counters. Safetensors only (no
pickle); counters and options go in the header's metadata. Written atomically.

    <folder>/averager-state.safetensors
        tensors  shadow.<slot>              EMA/SWA, fp32
                 ring.<j>.<slot>            LaWA, j < filled, oldest first, the model's dtype
        metadata {"alloy-averager": JSON of method, options, counters, shapes}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from alloy.errors import CheckpointError, Problem

STATE_FILE = "averager-state.safetensors"
_KEY = "alloy-averager"


def save_state(averager: Any, folder: str | os.PathLike[str]) -> Path:
    """Write `averager`'s state to `folder/averager-state.safetensors` (atomically)."""
    from safetensors.torch import save_file

    options = averager.options
    tensors: dict[str, torch.Tensor] = {}
    if options.method == "lawa":
        k = options.k
        order = [(averager._next - averager._filled + j) % k for j in range(averager._filled)]
        for j, ring_index in enumerate(order):
            for slot, t in enumerate(averager._ring[ring_index]):
                tensors[f"ring.{j}.{slot}"] = t.detach().to("cpu").contiguous()
    else:
        for slot, t in enumerate(averager._shadow):
            tensors[f"shadow.{slot}"] = t.detach().to("cpu").contiguous()
    meta = {
        "method": options.method,
        "options": {k: v for k, v in vars(options).items() if k != "method"},
        "step": averager.step,
        "count": averager.count,
        "product": averager._product,
        "filled": averager._filled,
        "shapes": [list(s) for s in averager._shapes],
    }
    path = Path(folder) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_state(averager: Any, folder: str | os.PathLike[str]) -> None:
    """Restore `averager` from `folder/averager-state.safetensors`.

    Raises:
        CheckpointError: no state file, or one written for another method, options or model.
    """
    from safetensors import safe_open

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no averager state in {folder}", [Problem(str(path), "missing")])
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_KEY, "null") or "null")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: not an alloy averager state")
        options = averager.options
        mine = {k: v for k, v in vars(options).items() if k != "method"}
        problems = []
        if meta["method"] != options.method:
            problems.append(Problem("method", f"saved {meta['method']}, now {options.method}"))
        changed = sorted(k for k in mine if k != "compile" and meta["options"].get(k) != mine[k])
        problems += [
            Problem(k, f"saved {meta['options'].get(k)!r}, now {mine[k]!r}") for k in changed
        ]
        if meta["shapes"] != [list(s) for s in averager._shapes]:
            problems.append(Problem("tensors", "saved for a model with other tensors"))
        if problems:
            raise CheckpointError(f"{path} does not fit this averager", problems)
        targets = averager._shadow if options.method != "lawa" else None
        if targets is not None:
            for slot, target in enumerate(targets):
                target.copy_(f.get_tensor(f"shadow.{slot}"))
        else:
            for j in range(meta["filled"]):
                for slot, target in enumerate(averager._ring[j]):
                    target.copy_(f.get_tensor(f"ring.{j}.{slot}"))
            averager._filled = meta["filled"]
            averager._next = meta["filled"] % options.k
    averager.step = meta["step"]
    averager.count = meta["count"]
    averager._product = meta["product"]
