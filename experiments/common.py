"""Helpers shared by the experiment scripts: machine description and docs sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Experiments never reach a model hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    """No per-file progress bars or info logs from transformers: the scripts print their own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def machine() -> str:
    """One line naming the CPU, cores, memory and Python/torch versions of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = names[0].strip() if names else cpu
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- name:begin -->` and `<!-- name:end -->` in `path` (appended
    at the end, with the markers, when the file or the section does not exist yet)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)


def train_once(recipe: dict, out: Path, say=print) -> Path:  # type: ignore[no-untyped-def, type-arg]
    """`alloy.train(recipe, out)` unless `out` already holds a run of exactly this recipe."""
    from alloy.train import load_train_recipe, train

    loaded = load_train_recipe(recipe)
    done = out / "training" / "recipe.yaml"
    if done.is_file() and done.read_text() == loaded.text:
        say(f"reusing {out}")
        return out
    say(f"training {out}")
    result = train(loaded, out, force=True, say=lambda message: None)
    say(
        f"  {result.steps} steps, {result.tokens:,} tokens, loss {result.final_loss:.4f}, "
        f"{result.seconds:.0f}s"
    )
    return out


def pooled_perplexity(scores: dict, names: list) -> float:  # type: ignore[type-arg]
    """Perplexity of several text sets taken together (total NLL over total tokens)."""
    import math

    nll = sum(scores[n]["nll"] for n in names)
    tokens = sum(scores[n]["tokens"] for n in names)
    return math.exp(nll / tokens)
