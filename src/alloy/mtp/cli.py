"""`alloy generate MODEL --speculative`: greedy decoding drafted by the folder's own MTP heads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from alloy.errors import Problem


def speculative_problems(
    target: Path, *, sample: bool | None, warpers: dict[str, Any], stop: list[str] | None
) -> list[Problem]:
    """Why `--speculative` cannot run on `target` with these flags (nothing when it can)."""
    from alloy.ensemble.recipe import is_recipe_path
    from alloy.mtp.heads import HEADS_FILE, has_heads

    problems: list[Problem] = []
    if is_recipe_path(target):
        problems.append(
            Problem(
                str(target),
                "--speculative verifies with one model, not an ensemble recipe's members",
                "give the model folder that holds mtp_heads.safetensors",
            )
        )
    elif (target / "config.json").is_file() and not has_heads(target):
        problems.append(
            Problem(
                str(target),
                f"no multi-token heads ({HEADS_FILE})",
                "train them with `alloy train` and objective: mtp (docs/mtp.md), or drop "
                "--speculative",
            )
        )
    if sample:
        problems.append(
            Problem("--sample", "speculative decoding here is exact greedy", "use --greedy")
        )
    for key in warpers:
        flag = "--" + key.replace("_", "-")
        problems.append(Problem(flag, "greedy decoding takes no warpers", f"drop {flag}"))
    if stop:
        problems.append(Problem("--stop", "not supported with --speculative", "drop --stop"))
    return problems


def run_speculative(
    target: Path,
    prompts: list[str],
    *,
    max_new_tokens: int | None,
    device: str | None,
    out: Path | None,
    draft: int | None = None,
) -> list[dict[str, Any]]:
    """Decode every prompt (one at a time) with the heads in `target`; print and return one
    record per prompt (the text, its tokens, model forwards and accepted drafts per step)."""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.device import resolve_device
    from alloy.eval.scorer import load_pretrained, start_ids
    from alloy.io.writable import write_file
    from alloy.mtp.heads import load_heads
    from alloy.mtp.speculative import speculative_greedy

    where = resolve_device(device) if device else torch.device("cpu")
    tokenizer = load_pretrained(target, AutoTokenizer, "model")
    model = load_pretrained(target, AutoModelForCausalLM, "model").to(where).eval()
    heads = load_heads(model, target)
    eos = eos_ids(model, tokenizer)
    console = Console(highlight=False)
    records = []
    for prompt in prompts:
        ids = start_ids(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        started = time.perf_counter()
        decoded = speculative_greedy(
            model, heads, ids, max_new_tokens=max_new_tokens or 64, eos=eos, draft=draft
        )
        seconds = time.perf_counter() - started
        text = tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        steps = decoded.accepted
        record = {
            "prompt": prompt,
            "text": text,
            "tokens": len(decoded.tokens),
            "finish_reason": decoded.finish_reason,
            "forwards": decoded.forwards,
            "accepted_per_step": sum(steps) / len(steps) if steps else 0.0,
            "seconds": seconds,
        }
        records.append(record)
        console.print(
            f"[dim]{escape(prompt)}[/]{escape(text)}  [dim]({decoded.finish_reason}; "
            f"{len(decoded.tokens)} tokens in {decoded.forwards} forwards, "
            f"{record['accepted_per_step']:.2f} drafts accepted per step)[/]"
        )
    if out is not None:
        write_file(out, "".join(json.dumps(r) + "\n" for r in records), "--out")
    return records


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The generation config's EOS ids, else the config's, else the tokenizer's (as Ensemble)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}
