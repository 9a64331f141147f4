"""`alloy inspect MODEL`: what a checkpoint holds, from headers and config only."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from alloy.cli.main import ALLOW_PICKLE, app
from alloy.io import Checkpoint


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint (what `alloy inspect --json` prints)."""
    info = checkpoint.model_info()
    shards: dict[str, dict[str, int]] = {
        f.name: {"tensors": 0, "bytes": 0} for f in checkpoint.files
    }
    for tensor in checkpoint.tensors.values():
        entry = shards.setdefault(tensor.file.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.nbytes
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        **asdict(info),
        "shards": [{"file": name, **entry} for name, entry in shards.items()],
    }


@app.command()
def inspect(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model folder (or a .safetensors file).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    allow_pickle: Annotated[bool, ALLOW_PICKLE] = False,
) -> None:
    """Describe a checkpoint: architecture, parameters, dtypes, shards, layers, tied weights."""
    with Checkpoint.open(model, allow_pickle=allow_pickle) as checkpoint:
        data = describe(checkpoint)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console(highlight=False)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("path", data["path"]),
        ("format", data["format"]),
        ("architecture", data["architecture"] or "unknown (no config.json)"),
        ("model type", data["model_type"] or "-"),
        ("parameters", f"{data['num_parameters']:,}"),
        ("layers", str(data["num_layers"] if data["num_layers"] is not None else "-")),
        ("hidden size", str(data["hidden_size"] or "-")),
        ("vocabulary", str(data["vocab_size"] or "-")),
        ("tied embeddings", "yes" if data["tied_embeddings"] else "no"),
        ("dtypes", ", ".join(f"{k} {v:,}" for k, v in data["dtypes"].items())),
        ("tensors", f"{data['num_tensors']:,} ({data['nbytes'] / 1e6:,.1f} MB)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    shards = Table("shard", "tensors", "MB", box=None, pad_edge=False)
    for shard in data["shards"]:
        shards.add_row(shard["file"], str(shard["tensors"]), f"{shard['bytes'] / 1e6:,.2f}")
    console.print(shards)
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
