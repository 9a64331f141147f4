"""Multi-token prediction heads (`alloy train`, objective: mtp) on the lab small base and on
SmolLM2-135M, to docs/results.md (issue #19, part 2).

    OMP_NUM_THREADS=1 python experiments/mtp.py                  # train, score, write the section
    python experiments/mtp.py --render                           # the section from the saved JSON

For each model, 3 heads are trained with the trunk frozen (so the model, the verifier, is
unchanged) on the lab corpus's four domains (train split), for a budget of a few minutes at one
thread. Then, on the validation split: each head's top-1 accuracy on held-out text (head k
predicts token t + k; k = 1 is the model's own head), for the trained heads and for the untrained
ones (copies of the last layer, i.e. the next-token head asked for a later token); and the
acceptance the heads give in self-speculative greedy decoding of validation prompts (drafts
accepted per step, tokens per model forward), with 1, 2 and 3 heads drafting, every output
checked token for token against plain greedy decoding. Trained folders are kept under
--root/experiments/mtp/ and reused while their recipe is unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section, train_once

DOMAINS = ["drama", "scripture", "fiction", "technical"]
MODELS = {
    "lab": ("lab small base", "family/experiment/small/base"),
    "smollm2": ("SmolLM2-135M-Instruct", "models/smollm2-135m"),
}
HEADS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    # per model (lab, smollm2): about 9 minutes of training each at one thread on a shared CPU
    parser.add_argument("--steps", type=int, nargs=2, default=[150, 30])
    parser.add_argument("--windows", type=int, default=48, help="held-out windows per model")
    parser.add_argument("--prompts", type=int, nargs=2, default=[16, 6], help="decoded per model")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[48, 32])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "mtp.json")
    parser.add_argument("--render", action="store_true", help="only rewrite the section")
    args = parser.parse_args()
    if args.render:
        payload = json.loads(args.json.read_text())
    else:
        quiet()
        import torch

        torch.manual_seed(0)
        payload = {"machine": machine(), "threads": torch.get_num_threads(), "models": {}}
        for key in args.models:
            payload["models"][key] = run_model(args, key, list(MODELS).index(key))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, ROOT / "docs" / "img" / "mtp_heads.png")
    replace_section(args.docs, "mtp", section(payload))


def recipe(args: argparse.Namespace, key: str, steps: int) -> dict[str, Any]:
    sequence = 256 if key == "lab" else 128
    return {
        "name": f"mtp heads on the {MODELS[key][0]}",
        "objective": "mtp",
        "model": str(args.root / MODELS[key][1]),
        "data": [{"corpus": d} for d in DOMAINS],
        "lab": str(args.root),
        "mtp": {"heads": HEADS},
        "schedule": {
            "name": "cosine",
            "lr": 2e-3 if key == "lab" else 1e-3,
            "warmup": min(10, steps // 5),
        },
        "max_steps": steps,
        "batch_size": 8,
        "sequence_length": sequence,
        "log_every": 10,
        "device": "cpu",
    }


def validation_windows(tokenizer: Any, root: Path, count: int, width: int) -> list[list[int]]:
    """`count` windows of `width` tokens (BOS first), taken round-robin over the four domains'
    validation documents, each from the start of a document long enough to fill it."""
    from alloy.eval.scorer import start_ids

    per_domain: list[list[list[int]]] = []
    for domain in DOMAINS:
        rows = []
        for line in (root / "corpus" / domain / "validation.jsonl").read_text().splitlines():
            ids = start_ids(tokenizer) + tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= width:
                rows.append(ids[:width])
        per_domain.append(rows)
    out = []
    for i in range(count):
        rows = per_domain[i % len(DOMAINS)]
        out.append(rows[(i // len(DOMAINS)) % len(rows)])
    return out


def heldout_top1(model: Any, heads: Any, windows: list[list[int]]) -> list[float]:
    """Top-1 accuracy of head k = 1 (the model's) .. N + 1 on the windows' own next tokens."""
    import torch

    from alloy.mtp.heads import TrunkCapture, unembed
    from alloy.mtp.losses import shift_labels

    hits = [0] * (len(heads) + 1)
    counts = [0] * (len(heads) + 1)
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            with TrunkCapture(model) as capture:
                logits = [model(input_ids=ids).logits]
            assert capture.hidden is not None
            for i in range(len(heads)):
                hidden = heads.hidden(i, capture.hidden, capture.layer_kwargs)
                logits.append(unembed(model, hidden))
            for k, scores in enumerate(logits, start=1):
                targets = shift_labels(ids, k)
                valid = targets != -100
                hits[k - 1] += int((scores.argmax(-1)[valid] == targets[valid]).sum())
                counts[k - 1] += int(valid.sum())
    return [h / c for h, c in zip(hits, counts, strict=True)]


def run_model(args: argparse.Namespace, key: str, index: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.mtp.cli import eos_ids
    from alloy.mtp.heads import MTPHeads, load_heads
    from alloy.mtp.speculative import acceptance

    out = args.root / "experiments" / "mtp" / key
    spec = recipe(args, key, args.steps[index])
    new_tokens = args.new_tokens[index]
    train_once(spec, out)
    summary = json.loads((out / "training" / "summary.json").read_text())
    rows = (out / "training" / "metrics.csv").read_text().splitlines()
    header, first, last = rows[0].split(","), rows[1].split(","), rows[-1].split(",")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = load_heads(model, out)
    start = MTPHeads.from_model(model, HEADS).eval()
    windows = validation_windows(tokenizer, args.root, args.windows, 128)
    prompts = validation_windows(tokenizer, args.root, args.prompts[index], 32)
    eos = eos_ids(model, tokenizer)
    print(f"{key}: scoring held-out windows and decoding prompts")
    result = {
        "name": MODELS[key][0],
        "model": spec["model"],
        "recipe": spec,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "seconds": summary["seconds"],
        "first_loss": float(first[header.index("loss")]),
        "final_loss": float(last[header.index("loss")]),
        "top1": {
            "trained": heldout_top1(model, trained, windows),
            "untrained": heldout_top1(model, start, windows),
        },
        "windows": len(windows),
        "acceptance": {
            "trained": [
                acceptance(model, trained, prompts, max_new_tokens=new_tokens, eos=eos, draft=d)
                for d in range(1, HEADS + 1)
            ],
            "untrained": [
                acceptance(model, start, prompts, max_new_tokens=new_tokens, eos=eos, draft=HEADS)
            ],
        },
        "prompts": len(prompts),
        "new_tokens": new_tokens,
    }
    print(json.dumps({k: result[k] for k in ("top1", "acceptance")}, indent=1))
    return result


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.4), squeeze=False)
    for ax, result in zip(axes[0], models.values(), strict=True):
        ks = list(range(1, len(result["top1"]["trained"]) + 1))
        for label in ("trained", "untrained"):
            ax.plot(ks, result["top1"][label], marker="o", label=f"{label} heads")
        ax.set_xticks(ks, ["k=1\n(model)"] + [f"k={k}\n(head {k - 1})" for k in ks[1:]])
        ax.set_ylabel("held-out top-1 accuracy of token t+k")
        ax.set_title(result["name"], fontsize=9)
        ax.set_ylim(0, max(0.05, max(result["top1"]["trained"]) * 1.15))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(payload: dict[str, Any]) -> str:
    lines = [
        "## Multi-token prediction heads and self-speculative decoding",
        "",
        "Regenerate: `OMP_NUM_THREADS=1 python experiments/mtp.py` (train, score, write); "
        "`python experiments/mtp.py --render` (this section and the plot from "
        "`experiments/results/mtp.json`).",
        "",
        f"Machine: {payload['machine']}; {payload['threads']} thread(s).",
        "",
        "Three heads (one decoder layer + norm each, the model's unembedding; initialised from "
        "the last layer) trained with `objective: mtp`, trunk frozen, on the lab corpus's four "
        "domains. Held-out top-1: head k predicts token t + k of validation text (k = 1 is the "
        "model's own head). Untrained heads are the copies training starts from (the next-token "
        "head asked for a later token).",
        "",
        "| model | steps | tokens | time | loss (sum over heads / next-token target) |",
        "|---|---:|---:|---:|---|",
    ]
    models = payload["models"]
    for result in models.values():
        lines.append(
            f"| {result['name']} | {result['steps']} | {result['tokens']:,} | "
            f"{result['seconds']:.0f} s | {result['first_loss']:.3f} -> "
            f"{result['final_loss']:.3f} |"
        )
    lines += ["", "| model | heads | " + " | ".join(_k_labels(models)) + " |"]
    lines.append("|---|---|" + "---:|" * len(_k_labels(models)))
    for result in models.values():
        for label in ("untrained", "trained"):
            cells = " | ".join(f"{v:.3f}" for v in result["top1"][label])
            lines.append(f"| {result['name']} | {label} | {cells} |")
    lines += [
        "",
        "Acceptance in self-speculative greedy decoding (`alloy generate --speculative`): "
        "validation prompts of 32 tokens (BOS first; lab: 16 prompts x 48 new tokens, SmolLM2: "
        "6 x 32, fewer for time); drafts accepted per verify step "
        "and new tokens per forward pass of the model (plain greedy: 1.00); exact: outputs equal "
        "to plain greedy token for token.",
        "",
        "| model | heads | drafting | accepted / step | tokens / forward | exact |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in models.values():
        for label in ("untrained", "trained"):
            for row in result["acceptance"][label]:
                lines.append(
                    f"| {result['name']} | {label} | {row['draft']} | "
                    f"{row['accepted_per_step']:.2f} | {row['tokens_per_forward']:.2f} | "
                    f"{row['exact']}/{row['prompts']} |"
                )
    lines += ["", "![held-out top-1 per head](img/mtp_heads.png)", "", *findings(models)]
    return "\n".join(lines)


def _k_labels(models: dict[str, Any]) -> list[str]:
    n = max(len(r["top1"]["trained"]) for r in models.values())
    return ["k=1 (model)"] + [f"k={k} (head {k - 1})" for k in range(2, n + 1)]


def findings(models: dict[str, Any]) -> list[str]:
    """What the numbers say, computed from them (so --render stays true to the JSON)."""
    out = []
    for result in models.values():
        trained, untrained = result["top1"]["trained"], result["top1"]["untrained"]
        best = max(result["acceptance"]["trained"], key=lambda r: r["tokens_per_forward"])
        base = result["acceptance"]["untrained"][0]
        exact = all(r["exact"] == r["prompts"] for v in result["acceptance"].values() for r in v)
        out.append(
            f"- {result['name']}: training moved head 1 (token t+2) from "
            f"{untrained[1]:.3f} to {trained[1]:.3f} top-1 and head {len(trained) - 1} from "
            f"{untrained[-1]:.3f} to {trained[-1]:.3f} (the model's own next token: "
            f"{trained[0]:.3f}); decoding accepted {best['accepted_per_step']:.2f} drafts per "
            f"step with {best['draft']} head(s) drafting ({best['tokens_per_forward']:.2f} "
            f"tokens per forward) against {base['accepted_per_step']:.2f} for the untrained "
            f"heads; outputs {'all' if exact else 'NOT all'} equal to plain greedy."
        )
    out.append(
        "- Wall-time speed-up is measured in docs/benchmarks.md (the mtp section): tokens per "
        "forward is an upper bound on it, before the heads' own cost and the longer verify pass."
    )
    return out


if __name__ == "__main__":
    main()
