"""EMA and LaWA along one fine-tuning run versus the raw checkpoint at the same steps.

    python experiments/averaging.py --preset experiment

Fine-tunes the lab family's small base on one domain (default fiction) with `alloy train` at a
constant learning rate after a short warm-up (the regime where averaging is meant to help: the raw
weights keep bouncing), the recipe's `averaging:` keeping an EMA and a LaWA average and
`snapshots:` saving the raw weights and both averages every `--save-every` steps. At every
snapshot the raw checkpoint and both averages are scored on the domain's validation
split (perplexity, lower is better). Writes docs/results.md (section `averaging`), a plot under
docs/img/ and the raw numbers under experiments/results/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--domain", default="fiction")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--lawa-k", type=int, default=5)
    parser.add_argument("--lawa-every", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.family import build_family
    from alloy.lab.presets import PRESETS
    from alloy.train import train

    quiet()
    preset = PRESETS[args.preset]
    build_family(args.root, args.preset, on_event=print)
    family = args.root / "family" / args.preset
    sets = load_eval_sets([args.root / "corpus" / args.domain / "validation.jsonl"])
    settings = EvalSettings(
        window=preset.seq_len, stride=preset.seq_len // 2, batch_size=16, max_tokens=args.max_tokens
    )
    recipe = {
        "name": f"averaging along a {args.domain} fine-tune",
        "objective": "causal_lm",
        "model": str(family / "small" / "base"),
        "data": [{"name": args.domain, "corpus": args.domain}],
        "lab": str(args.root),
        "schedule": {"name": "constant", "lr": args.lr, "warmup": 10},
        "optimizer": {
            "name": "adamw",
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "max_grad_norm": 1.0,
        },
        "averaging": {
            "ema": {"decay": args.ema_decay},
            "lawa": {"k": args.lawa_k, "every": args.lawa_every},
        },
        "snapshots": {"every": args.save_every},
        "max_steps": args.steps,
        "batch_size": preset.batch,
        "sequence_length": preset.seq_len,
        "seed": args.seed,
        "log_every": args.save_every,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        train(recipe, out)
        train_s = time.perf_counter() - t0
        for step in range(args.save_every, args.steps + 1, args.save_every):
            snapshot = out / "snapshots" / f"checkpoint-{step}"
            row: dict[str, Any] = {"step": step}
            for name, path in (
                ("raw", snapshot),
                ("ema", snapshot / "averaged-ema"),
                ("lawa", snapshot / "averaged-lawa"),
            ):
                scores = evaluate(load_scorer(path), sets, settings)
                row[name] = next(iter(scores.values()))["perplexity"]
            rows.append(row)
            print(row)

    payload = {
        "command": "python experiments/averaging.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_s": train_s,
        "rows": rows,
    }
    out = ROOT / "experiments" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"averaging_{args.preset}.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(rows, ROOT / "docs" / "img" / f"averaging_{args.preset}.png", args.domain)
    replace_section(ROOT / "docs" / "results.md", f"averaging-{args.preset}", report(payload))
    print(report(payload))


def report(payload: dict[str, Any]) -> str:
    a = payload["args"]
    rows = payload["rows"]
    wins = {name: sum(1 for r in rows if r[name] < r["raw"]) for name in ("ema", "lawa")}
    lines = [
        f"Small base of the `{a['preset']}` family fine-tuned on {a['domain']} for {a['steps']} "
        f"steps at a constant learning rate {a['lr']:g} (10 warm-up steps), EMA decay "
        f"{a['ema_decay']:g} per step, LaWA mean of the latest {a['lawa_k']} weights taken every "
        f"{a['lawa_every']} steps. Perplexity on the {a['domain']} validation split (first "
        f"{a['max_tokens']:,} tokens). {payload['machine']}; training took "
        f"{payload['train_s'] / 60:.1f} min. Regenerate with:",
        "",
        "```sh",
        payload["command"],
        "```",
        "",
        "| step | raw checkpoint | EMA | LaWA |",
        "|---|---|---|---|",
    ]
    for r in rows:
        best = min(r["raw"], r["ema"], r["lawa"])
        cells = [
            f"**{r[k]:.2f}**" if r[k] == best else f"{r[k]:.2f}" for k in ("raw", "ema", "lawa")
        ]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"EMA beats the raw checkpoint at {wins['ema']} of {len(rows)} steps, LaWA at "
        f"{wins['lawa']} of {len(rows)}.",
        "",
        f"![averaging](img/averaging_{a['preset']}.png)",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, domain: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for name, style in (("raw", "o-"), ("ema", "s-"), ("lawa", "^-")):
        ax.plot(steps, [r[name] for r in rows], style, label=name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"{domain} validation perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
