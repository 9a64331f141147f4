"""`--device`: a device name checked against the devices this machine has."""

from __future__ import annotations

import torch

from alloy.errors import InputError


def available_devices() -> list[str]:
    """The devices a command can run on here: cpu, then cuda:N for each GPU, then mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str, option: str = "--device") -> torch.device:
    """The torch device named `device`.

    Raises:
        InputError: `device` is not a device name, or not one this machine has; the message
            lists the devices that exist here (`option` names where the value came from).
    """
    here = f"devices here: {', '.join(available_devices())}"
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{option} {device}: not a device name; {here}") from None
    if target.type == "cpu":
        return target
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{option} {device}: CUDA is not available here; {here}")
        if target.index is not None and target.index >= count:
            raise InputError(f"{option} {device}: this machine has {count} CUDA device(s); {here}")
        return target
    if target.type == "mps" and torch.backends.mps.is_available():
        return target
    raise InputError(f"{option} {device}: not available here; {here}")
