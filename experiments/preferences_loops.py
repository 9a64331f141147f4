"""Self-improvement loops with `alloy improve`: RAFT and ReST on reviews, self-rewarding on quiz.

    python experiments/preferences_loops.py --parts raft          # lab family, fine-food reviews
    python experiments/preferences_loops.py --parts self_reward   # SmolLM2-135M-Instruct, quiz
    python experiments/preferences_loops.py --render              # rewrite sections from JSON

raft (issue #17, evidence 4): the lab's experiment-preset small base, fine-tuned on the review
texts (both labels), is the policy; it continues review openings ("Review: <first words>"). The
optimised reward is a reward model trained from that writer on half the train reviews (a
"great" review preferred over an "other" one); a second reward model, trained on the other half
with another seed, and the bag-of-words sentiment judge of experiments/reviews.py (no shared
weights or tokenizer) are never optimised and show whether the gains are real or the reward model
is being gamed. RAFT (best of 4, 3 iterations) and ReST (2 Grow steps, Improve at the 50% and
80% quantiles) each report, per model, the held-out prompts' answers scored by all three, the
answers' length and distinct bigrams, and the perplexity of real test reviews (fluency).

self_reward (evidence 5): SmolLM2-135M-Instruct under its chat template answers quiz questions,
judges its answers with the 5-point rubric (`expected` mode: the mean score under its digit
distribution), trains DPO on each question's best against worst answer, twice (M0 -> M1 -> M2).
Reported per model: agreement of its judgements with the quiz's labelled test pairs, and its
preference accuracy on them by log-likelihood (`alloy eval`). A small sample of `generate`-mode
judgements (the paper's) shows how often a 135M model writes a readable score at all.

Writes experiments/results/preferences_<part>.json, docs/img/preferences_<part>.png and the
docs/results.md sections preferences-raft / preferences-self_reward.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section, train_once
from preferences import preference_split

from adapters import smollm2
from train import base_recipe, steps

PARTS = ("raft", "self_reward")
PROMPT = "Review:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per iteration")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--render", action="store_true", help="rewrite sections from the JSON")
    args = parser.parse_args()
    quiet()
    for part in args.parts:
        saved = args.json / f"preferences_{part}.json"
        if args.render:
            payload = json.loads(saved.read_text())
        else:
            t = time.perf_counter()
            payload = globals()[f"part_{part}"](args)
            payload["minutes"] = (time.perf_counter() - t) / 60
            payload["machine"] = machine()
            payload["command"] = (
                f"python experiments/preferences_loops.py --parts {part}"
                + (f" --scale {args.scale:g}" if args.scale != 1 else "")
                + (f" --prompts {args.prompts}" if args.prompts != 64 else "")
            )
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(payload, indent=2) + "\n")
        globals()[f"plot_{part}"](payload, args.img / f"preferences_{part}.png")
        replace_section(args.docs, f"preferences-{part}", globals()[f"section_{part}"](payload))
        print(f"{part}: written", flush=True)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _only(scores: dict[str, Any]) -> Any:
    """The scores of the one eval set (whatever its folder/stem name)."""
    (value,) = scores.values()
    return value


def distinct_bigrams(texts: list[str]) -> float:
    """Distinct word bigrams over all bigrams of the answers (1: no repetition)."""
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---- RAFT / ReST on reviews ------------------------------------------------------------------


def _review_files(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Pairs for the two reward models (disjoint halves of train), prompts (train openings for
    the loops, test openings held out), and a perplexity set of test reviews."""
    folder = args.root / "corpus" / "tasks" / "reviews"
    train, test = _read(folder / "train.jsonl"), _read(folder / "test.jsonl")
    rng = random.Random(0)
    rng.shuffle(train)
    half = len(train) // 2

    def clip(text: str) -> str:
        return " " + " ".join(text.split()[:60])

    def pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        great = [r["text"] for r in rows if r["label"] == "great"]
        other = [r["text"] for r in rows if r["label"] == "other"]
        n = min(len(great), len(other))
        return [
            {"prompt": PROMPT, "chosen": clip(g), "rejected": clip(o)}
            for g, o in zip(great[:n], other[:n], strict=True)
        ]

    def opening(text: str) -> str:
        return f"{PROMPT} " + " ".join(text.split()[:3])

    files = {
        "text": _jsonl(work / "reviews-text.jsonl", [{"text": r["text"]} for r in train]),
        "pairs_a": _jsonl(work / "pairs-a.jsonl", pairs(train[:half])),
        "pairs_b": _jsonl(work / "pairs-b.jsonl", pairs(train[half:])),
        "pairs_test": _jsonl(work / "pairs-test.jsonl", pairs(test)),
        "prompts": _jsonl(
            work / "prompts.jsonl",
            [{"prompt": opening(r["text"])} for r in train[: 4 * args.prompts]],
        ),
        "held_out": _jsonl(
            work / "held-out-prompts.jsonl", [{"prompt": opening(r["text"])} for r in test[:64]]
        ),
        "ppl": _jsonl(work / "reviews-test.jsonl", [{"text": r["text"]} for r in test[:200]]),
    }
    return files


def part_raft(args: argparse.Namespace) -> dict[str, Any]:
    from reviews import review_classifier

    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.improve import improve

    work = args.root / "experiments" / "preferences" / "loops"
    files = _review_files(args, work)
    base = args.root / "family" / "experiment" / "small" / "base"
    n = steps(args, 150)
    writer = train_once(
        base_recipe(
            args,
            model=str(base),
            data=[{"name": "reviews", "path": str(files["text"]), "kind": "text"}],
            schedule={"name": "cosine", "lr": 6e-4, "warmup": 10},
            max_steps=n,
            sequence_length=128,
        ),
        work / "writer",
    )
    rms = {}
    for name, data, seed in (("rm", files["pairs_a"], 1), ("rm_held", files["pairs_b"], 2)):
        rms[name] = train_once(
            base_recipe(
                args,
                objective="reward",
                model=str(writer),
                data=[{"name": "pairs", "path": str(data), "kind": "preference"}],
                schedule={"name": "cosine", "lr": 3e-4, "warmup": 10},
                optimizer={"name": "adamw", "weight_decay": 0.0},
                max_steps=steps(args, 150),
                sequence_length=96,
                seed=seed,
            ),
            work / name,
        )
    sets = load_eval_sets([files["pairs_test"]])
    rm_accuracy = {
        name: _only(evaluate(load_scorer(path), sets, EvalSettings()))["accuracy"]
        for name, path in rms.items()
    }
    print(f"reward models on test pairs: {rm_accuracy}", flush=True)
    classifier, judge_accuracy = review_classifier(args.root)
    loop = {
        "policy": str(writer),
        "prompts": {"path": str(files["prompts"]), "per_iteration": args.prompts},
        "sample": {
            "k": 4,
            "max_new_tokens": 40,
            "temperature": 1.0,
            "top_p": 0.95,
            "batch_size": 32,
        },
        "score": {"reward": [str(rms["rm"])]},
        "monitor": {"reward": [str(rms["rm_held"])]},
        "train": {
            "schedule": {"name": "constant", "lr": 2e-4},
            "optimizer": {"name": "adamw", "weight_decay": 0.0},
            "max_steps": steps(args, 24),
            "batch_size": 8,
            "sequence_length": 64,
            "log_every": 50,
        },
        "eval": {"prompts": str(files["held_out"]), "data": [{"path": str(files["ppl"])}]},
        "lab": str(args.root),
    }
    cells = {
        "raft": {**loop, "improve": "raft", "iterations": 3, "select": {"top_k": 1}},
        "rest": {**loop, "improve": "rest", "iterations": 2, "select": {"quantiles": [0.5, 0.8]}},
    }
    results: dict[str, Any] = {}
    for name, recipe in cells.items():
        t = time.perf_counter()
        report = improve(recipe, work / name, say=lambda m: print(f"  {m}", flush=True))
        rows = []
        for m in report["models"]:
            answers = _read(Path(m["held_out"]["answers"]))
            texts = [a["answer"] for a in answers]
            judged = classifier.prob_great([a["prompt"] + a["answer"] for a in answers])
            rows.append(
                {
                    "model": m["name"],
                    "reward": m["held_out"]["score"]["mean"],
                    "held_out_reward": m["held_out"]["monitor"]["mean"],
                    "judge_great": sum(judged) / len(judged),
                    "tokens": m["held_out"]["tokens"],
                    "distinct_2": distinct_bigrams(texts),
                    "perplexity": _only(m["eval"])["perplexity"],
                    "example": answers[0]["prompt"] + answers[0]["answer"],
                }
            )
        iterations = [
            {
                "iteration": s["iteration"],
                "reward": s["score"]["mean"],
                "held_out_reward": s["monitor"]["mean"],
                "kept": [r["kept"] for r in s["runs"]],
                "kept_reward": [r["kept_score"] for r in s["runs"]],
                "kept_held_out": [r["kept_monitor"] for r in s["runs"]],
                "tokens_per_second": s["sampling"]["tokens_per_second"],
            }
            for s in report["iterations"]
        ]
        results[name] = {
            "models": rows,
            "iterations": iterations,
            "minutes": (time.perf_counter() - t) / 60,
        }
        print(f"{name}: {json.dumps(rows, indent=1)[:1500]}", flush=True)
    return {
        "rm_accuracy": rm_accuracy,
        "judge_accuracy": judge_accuracy,
        "writer_steps": n,
        "prompts_per_iteration": args.prompts,
        "cells": results,
    }


def plot_raft(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("reward", "optimised reward"),
        ("held_out_reward", "held-out reward model"),
        ("judge_great", "sentiment judge P(great)"),
        ("perplexity", "test-review perplexity"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 3.2))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for name, cell in payload["cells"].items():
            ys = [m[key] for m in cell["models"]]
            ax.plot(range(len(ys)), ys, marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("model (0 = start)", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_raft(payload: dict[str, Any]) -> str:
    acc = payload["rm_accuracy"]
    lines = [
        "## Self-improvement: RAFT and ReST against a held-out reward model",
        "",
        f"`{payload['command']}` ({payload['minutes']:.0f} min; {payload['machine']}).",
        "",
        "Policy: the lab's small base fine-tuned on the fine-food review texts "
        f"({payload['writer_steps']} steps), continuing 64 held-out review openings "
        '("Review: <three words>"). Optimised: a reward model trained from the writer on half '
        'the train pairs (a "great" review over an "other" one); never optimised: a second '
        "reward model from the other half and another seed, and the bag-of-words sentiment "
        "judge of experiments/reviews.py. Test-pair accuracy of the reward models: "
        f"{acc['rm']:.3f} (optimised) and {acc['rm_held']:.3f} (held out); the judge's accuracy "
        f"on test reviews: {payload['judge_accuracy']:.3f}. Each iteration samples 4 answers for "
        f"each of {payload['prompts_per_iteration']} fresh prompts; RAFT keeps the best, ReST "
        "those above the 50% then the 80% quantile.",
        "",
        "| loop | model | optimised reward | held-out reward | judge P(great) | tokens "
        "| distinct bigrams | test perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in payload["cells"].items():
        for m in cell["models"]:
            lines.append(
                f"| {name} | {m['model']} | {m['reward']:.3f} | {m['held_out_reward']:.3f} | "
                f"{m['judge_great']:.3f} | {m['tokens']:.1f} | {m['distinct_2']:.3f} | "
                f"{m['perplexity']:.2f} |"
            )
    lines += ["", "![RAFT and ReST per iteration](img/preferences_raft.png)", ""]
    lines += _raft_reading(payload)
    return "\n".join(lines)


def _raft_reading(payload: dict[str, Any]) -> list[str]:
    out = []
    for name, cell in payload["cells"].items():
        first, last = cell["models"][0], cell["models"][-1]
        gained = last["reward"] - first["reward"]
        held = last["held_out_reward"] - first["held_out_reward"]
        judge = last["judge_great"] - first["judge_great"]
        if gained > 0 and held > 0 and judge > 0:
            verdict = "all three rose: the gain carried over to the scorers it never saw"
        elif gained > 0 and (held <= 0 or judge <= 0):
            verdict = (
                "the optimised reward rose but an unseen scorer did not follow: a sign of "
                "optimising the reward model's quirks"
            )
        else:
            verdict = "the optimised reward itself did not rise"
        out.append(
            f"- {name}: optimised reward {first['reward']:+.3f} → {last['reward']:+.3f}, held-out "
            f"reward {first['held_out_reward']:+.3f} → {last['held_out_reward']:+.3f}, judge "
            f"{first['judge_great']:.3f} → {last['judge_great']:.3f}, perplexity "
            f"{first['perplexity']:.2f} → {last['perplexity']:.2f}; {verdict}."
        )
    for name, cell in payload["cells"].items():
        first, last = cell["models"][0], cell["models"][-1]
        ppl = last["perplexity"] / first["perplexity"] - 1
        if ppl > 0.05:
            out.append(
                f"- The cost ({name}): test-review perplexity {ppl:+.0%}, distinct bigrams "
                f"{first['distinct_2']:.3f} → {last['distinct_2']:.3f}, answers "
                f"{first['tokens']:.1f} → {last['tokens']:.1f} tokens. The policy narrows onto "
                "what the rewards like and models real reviews worse; no scorer here measures "
                "fluency, so this is the signal to stop on."
            )
    out.append(
        "- Minutes above count the loops only; the writer and the two reward models (trained "
        "once, reused) took about 4 minutes more."
    )
    return out


# ---- self-rewarding on the quiz ----------------------------------------------------------------


def part_self_reward(args: argparse.Namespace) -> dict[str, Any]:
    from alloy.improve import improve
    from alloy.improve.judge import Judge, judge_prompt_text

    model = smollm2(args.root)
    work = args.root / "experiments" / "preferences" / "self_reward"
    work.mkdir(parents=True, exist_ok=True)
    files = preference_split(args, work)
    train_pairs = _read(files["pairs_train"])
    rng = random.Random(0)
    rng.shuffle(train_pairs)
    per = args.prompts // 2
    prompts = _jsonl(work / "prompts.jsonl", [{"prompt": p["prompt"]} for p in train_pairs])
    test_pairs = _read(files["pairs_test"])
    agreement = _jsonl(work / "agreement.jsonl", test_pairs[:100])
    recipe = {
        "improve": "self_reward",
        "policy": str(model),
        "prompts": {"path": str(prompts), "per_iteration": per},
        "iterations": 2,
        "sample": {
            "k": 4,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "top_p": 0.95,
            "template": "chat",
            "batch_size": 16,
        },
        "score": {"judge": {"model": "policy", "mode": "expected", "batch_size": 8}},
        "train": {
            "schedule": {"name": "constant", "lr": 1e-5},
            "optimizer": {"name": "adamw", "weight_decay": 0.0},
            "preference": {"beta": 0.1, "precompute_reference": True},
            "max_steps": steps(args, 16),
            "batch_size": 4,
            "sequence_length": 96,
            "log_every": 50,
        },
        "agreement": str(agreement),
        "eval": {"data": [{"path": str(files["pairs_test"])}]},
        "seed": 0,
    }
    report = improve(recipe, work / "loop", say=lambda m: print(f"  {m}", flush=True))
    models = []
    for m in report["models"]:
        metrics = _only(m["eval"])
        models.append(
            {
                "model": m["name"],
                "agreement": m["agreement"]["accuracy"],
                "preference_accuracy": metrics["accuracy"],
            }
        )
    iterations = [
        {
            "iteration": s["iteration"],
            "mean_score": s["score"]["mean"],
            "pairs": s["runs"][0]["kept"],
            "mean_gap": s["runs"][0]["mean_gap"],
            "loss": s["runs"][0]["loss"],
            "tokens_per_second": s["sampling"]["tokens_per_second"],
        }
        for s in report["iterations"]
    ]
    # The paper's generate mode, on a sample: does a 135M model write a readable score at all?
    samples = _read(work / "loop" / "iter-1" / "samples.jsonl")[:16]
    judge = Judge(
        str(model),
        judge_prompt_text(None),
        mode="generate",
        samples=1,
        max_new_tokens=96,
        template="chat",
        batch_size=8,
    )
    written = judge.score([s["prompt"] for s in samples], [s["answer"] for s in samples])
    readable = sum(w is not None for w in written)
    return {
        "models": models,
        "iterations": iterations,
        "prompts_per_iteration": per,
        "agreement_pairs": 100,
        "generate_readable": readable,
        "generate_checked": len(samples),
        "example": {k: samples[0][k] for k in ("prompt", "answer", "score")},
    }


def plot_self_reward(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = [m["model"] for m in payload["models"]]
    for key, label in (
        ("agreement", "judge agreement"),
        ("preference_accuracy", "preference accuracy"),
    ):
        ax.plot(names, [m[key] for m in payload["models"]], marker="o", label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("on the quiz test pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_self_reward(payload: dict[str, Any]) -> str:
    lines = [
        "## Self-rewarding: SmolLM2-135M-Instruct judging its own quiz answers",
        "",
        f"`{payload['command']}` ({payload['minutes']:.0f} min; {payload['machine']}).",
        "",
        f"Each iteration: {payload['prompts_per_iteration']} fresh quiz train questions, 4 sampled "
        "answers each under the chat template, judged by the model itself with alloy's 5-point "
        "additive rubric in `expected` mode; DPO (β 0.1, reference precomputed) on each "
        "question's best against worst answer. Judge agreement: how often the model's judgement "
        f"prefers the labelled answer of {payload['agreement_pairs']} quiz test pairs (ties "
        "half); preference accuracy: `alloy eval` on all test pairs by log-likelihood.",
        "",
        "| model | judge agreement | preference accuracy |",
        "|---|---|---|",
    ]
    lines += [
        f"| {m['model']} | {m['agreement']:.3f} | {m['preference_accuracy']:.3f} |"
        for m in payload["models"]
    ]
    lines += [
        "",
        "| iteration | mean self-score | pairs | mean score gap | DPO loss | tok/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['iteration']} | {s['mean_score']:.3f} | {s['pairs']} | {s['mean_gap']:.3f} | "
        f"{s['loss']:.4f} | {s['tokens_per_second']:.0f} |"
        for s in payload["iterations"]
    ]
    first, last = payload["models"][0], payload["models"][-1]
    lines += [
        "",
        "![self-rewarding per iteration](img/preferences_self_reward.png)",
        "",
        f"- Judge agreement {first['agreement']:.3f} → {last['agreement']:.3f}, preference "
        f"accuracy {first['preference_accuracy']:.3f} → {last['preference_accuracy']:.3f}. "
        + (
            "The judge is near chance, so its pairs carry little signal: at 135M the method "
            "has nothing to bootstrap from, as the paper's premise (a capable judge) predicts."
            if max(m["agreement"] for m in payload["models"]) < 0.55
            else "The judge agrees with the labels above chance."
        ),
        f"- DPO fitted its self-judged pairs (final loss {payload['iterations'][-1]['loss']:.3f} "
        "against log 2 = 0.693 at the start): the model learned its own preferences, and they "
        "did not carry over to the labelled ones. The run is small (16 pairs per iteration), "
        "sized to the CPU.",
        f'- In the paper\'s `generate` mode the model wrote a readable "Score: N" for '
        f"{payload['generate_readable']} of {payload['generate_checked']} judgements of its "
        "own answers, which is why this run uses `expected` mode.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
