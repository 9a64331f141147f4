"""Model cards: what produced a checkpoint, from which inputs (with content hashes), and how.

The card is deterministic (no timestamps, no absolute temporary paths), so the same inputs and
recipe give a byte-identical output folder. Input hashes are the SHA-256 of each weight file, the
same digest the Hugging Face Hub shows for LFS files, so a reader can match an input to a
published revision; they are cached across runs while a file is unchanged (alloy.io.digest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import alloy
from alloy.io.digest import files_sha256


@dataclass(frozen=True)
class CardInput:
    """One input of the producing job."""

    role: str  # e.g. "base", "model", "checkpoint"
    path: str
    file_hashes: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256

    @classmethod
    def of(cls, role: str, path: Path, weight_files: Sequence[Path]) -> CardInput:
        digests = files_sha256(weight_files)
        return cls(role, str(path), {f.name: d for f, d in zip(weight_files, digests, strict=True)})


def model_card(
    *,
    title: str,
    summary: str,
    command: str | None = None,
    inputs: Sequence[CardInput] = (),
    recipe: str | None = None,
    tags: Sequence[str] = (),
) -> str:
    """Render a README.md model card with a YAML front matter readable by the Hub."""
    front = {"library_name": "transformers", "tags": ["alloy", *tags]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [summary, "", f"Produced by alloy {alloy.__version__}."]
    if command:
        lines += ["", "```sh", command, "```"]
    if inputs:
        lines += [
            "",
            "## Inputs",
            "",
            "| role | path | weight file | sha256 |",
            "|---|---|---|---|",
        ]
        for item in inputs:
            files = item.file_hashes or {"": ""}
            for name, digest in files.items():
                lines.append(f"| {item.role} | `{item.path}` | {name} | `{digest}` |")
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"
