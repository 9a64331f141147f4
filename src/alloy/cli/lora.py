"""`alloy lora ...`: adapters as files: merge them exactly, extract them from fine-tunes, fold them.

The commands live in `lora_merge.py` and `lora_extract.py` and attach themselves to this group.
"""

from __future__ import annotations

import typer

from alloy.cli.main import app

lora = typer.Typer(
    help="LoRA adapters as files: exact merging, extraction from a fine-tune, folding.",
    no_args_is_help=True,
)
app.add_typer(lora, name="lora")
