"""Decode-time ensembles on the lab family: proxy-tuning, linear vs log-linear mixtures, DExperts.

    python experiments/ensembles.py --preset experiment

1. Proxy-tuning (Liu et al., 2024): the large base steered by the small expert / small base pair of
   a domain, log p = log p_large + (log p_small_expert - log p_small_base). Reported on each
   domain's test split: the fraction of the perplexity gap between the large base and the large
   model fine-tuned directly on that domain that the proxy closes.
2. Linear vs log-linear: the four small domain experts combined with uniform weights, scored on
   the test split of every domain (mixed text), against each expert, the small base and the
   uniform weight merge of the four experts.
3. DExperts sentiment steering: the small base steered towards "great" (or "other") food reviews
   by experts fine-tuned on each label (experiments/reviews.py), continuing the first words of
   held-out reviews; judged by a bag-of-words classifier trained on the labelled reviews, and by
   the likelihood of held-out reviews of each label under the steered model.

Writes docs/results.md (section `ensembles`) and experiments/results/ensembles.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section


def perplexities(scorer: Any, sets: list[Any], settings: Any) -> dict[str, float]:
    from alloy.eval import evaluate

    return {k.split("/")[0]: v["perplexity"] for k, v in evaluate(scorer, sets, settings).items()}


def proxy_tuning(family: Path, domains: list[str], corpus: Path, settings: Any) -> dict[str, Any]:
    from alloy.ensemble import Ensemble
    from alloy.eval import load_eval_sets, load_scorer

    rows = {}
    for domain in domains:
        sets = load_eval_sets([corpus / domain / "test.jsonl"])
        proxy = Ensemble.from_models(
            [family / "large/base", family / f"small/experts/{domain}", family / "small/base"],
            rule="proxy_tuning",
            roles=["base", "expert", "anti_expert"],
        )
        models: dict[str, Any] = {
            "large base": load_scorer(family / "large/base"),
            "large expert": load_scorer(family / f"large/experts/{domain}"),
            "small base": load_scorer(family / "small/base"),
            "small expert": load_scorer(family / f"small/experts/{domain}"),
            "proxy-tuned large": proxy,
        }
        ppl = {name: perplexities(s, sets, settings)[domain] for name, s in models.items()}
        gap = ppl["large base"] - ppl["large expert"]
        log_gap = math.log(ppl["large base"]) - math.log(ppl["large expert"])
        ppl["gap closed"] = (ppl["large base"] - ppl["proxy-tuned large"]) / gap
        ppl["log gap closed"] = (
            math.log(ppl["large base"]) - math.log(ppl["proxy-tuned large"])
        ) / log_gap
        rows[domain] = ppl
        print("proxy", domain, {k: round(v, 3) for k, v in ppl.items()}, flush=True)
    return rows


def mixtures(family: Path, domains: list[str], corpus: Path, settings: Any) -> dict[str, Any]:
    from alloy.ensemble import Ensemble
    from alloy.eval import load_eval_sets, load_scorer
    from alloy.merge import merge

    sets = load_eval_sets([corpus / d / "test.jsonl" for d in domains])
    experts = [family / f"small/experts/{d}" for d in domains]
    results = {}
    with tempfile.TemporaryDirectory(dir=family.parent.parent) as tmp:
        merged = Path(tmp) / "merge"
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(p)} for p in experts],
            "parameters": {"weight": 1.0},
        }
        merge(recipe, merged)
        models: dict[str, Any] = {
            f"expert {d}": load_scorer(p) for d, p in zip(domains, experts, strict=True)
        }
        models["small base"] = load_scorer(family / "small/base")
        models["uniform merge"] = load_scorer(merged)
        for rule in ("linear", "log_linear"):
            models[f"{rule} ensemble"] = Ensemble.from_models(experts, rule=rule)
        for name, scorer in models.items():
            results[name] = perplexities(scorer, sets, settings)
            print("mixture", name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    return results


def dexperts(
    family: Path, root: Path, preset: str, prompts_per_label: int, alphas: list[float]
) -> dict[str, Any]:
    from reviews import review_classifier, train_review_experts

    from alloy.ensemble import Ensemble
    from alloy.eval import load_eval_sets
    from alloy.eval.perplexity import score_text
    from alloy.lab.corpus import read_jsonl

    experts = train_review_experts(root, preset)
    classifier, accuracy = review_classifier(root)
    test = list(read_jsonl(root / "corpus" / "tasks" / "reviews" / "test.jsonl"))
    by_label = {
        label: [r["text"] for r in test if r["label"] == label] for label in ("great", "other")
    }
    prompts = [
        " ".join(text.split()[:4])
        for label in by_label
        for text in by_label[label][:prompts_per_label]
    ]
    base = family / "small" / "base"
    great, other = experts["small/great"], experts["small/other"]
    sampling = {"max_new_tokens": 48, "do_sample": True, "top_p": 0.9, "seed": 0}
    systems: dict[str, Any] = {
        "base": Ensemble.from_models([base], rule="linear"),
        "great expert": Ensemble.from_models([great], rule="linear"),
        "other expert": Ensemble.from_models([other], rule="linear"),
    }
    for alpha in alphas:
        for toward, away in (("great", other), ("other", great)):
            pair = great if toward == "great" else other
            systems[f"DExperts to {toward}, alpha {alpha:g}"] = Ensemble.from_models(
                [base, pair, away],
                rule="dexperts",
                roles=["base", "expert", "anti_expert"],
                parameters={"alpha": alpha, "top_p": 0.9},
            )
    results: dict[str, Any] = {
        "classifier test accuracy": accuracy,
        "prompts": len(prompts),
        "alphas": alphas,
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, texts in by_label.items():
            path = Path(tmp) / f"{label}.jsonl"
            path.write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in texts[prompts_per_label:])
            )
        held_out = {label: load_eval_sets([Path(tmp) / f"{label}.jsonl"])[0] for label in by_label}
        for name, system in systems.items():
            t = time.perf_counter()
            out = system.generate(prompts, batch_size=32, **sampling)
            texts = [g.text for g in out]
            probs = classifier.prob_great(texts)
            row: dict[str, Any] = {
                "p(great)": sum(probs) / len(probs),
                "share great": sum(p > 0.5 for p in probs) / len(probs),
                "seconds": time.perf_counter() - t,
                "sample": texts[0],
            }
            # Likelihoods under the untruncated form (proxy-tuning): DExperts' nucleus would give
            # held-out text outside it infinite perplexity.
            scorer = system
            if system.rule.name == "dexperts":
                scorer = Ensemble(
                    system.members, "proxy_tuning", params={"alpha": system.params["alpha"]}
                )
            for label, data in held_out.items():
                score = score_text(scorer, data.items, window=256, stride=128, max_tokens=8192)
                row[f"ppl {label} reviews"] = score.perplexity
            rows[name] = row
            print("dexperts", name, {k: v for k, v in row.items() if k != "sample"}, flush=True)
    results["systems"] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--prompts", type=int, default=50, help="review prompts per label")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0, 3.2])
    parser.add_argument("--parts", nargs="+", default=["proxy", "mixtures", "dexperts"])
    args = parser.parse_args()

    from alloy.eval import EvalSettings
    from alloy.lab.presets import PRESETS

    quiet()
    preset = PRESETS[args.preset]
    family = args.root / "family" / args.preset
    corpus = args.root / "corpus"
    domains = list(json.loads((corpus / "manifest.json").read_text())["domains"])
    settings = EvalSettings(
        window=preset.seq_len, stride=preset.seq_len // 2, batch_size=16, max_tokens=args.max_tokens
    )
    out = ROOT / "experiments" / "results" / "ensembles.json"
    payload: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    parts = {
        "proxy": lambda: proxy_tuning(family, domains, corpus, settings),
        "mixtures": lambda: mixtures(family, domains, corpus, settings),
        "dexperts": lambda: dexperts(family, args.root, args.preset, args.prompts, args.alphas),
    }
    command = "python experiments/ensembles.py " + shlex.join(sys.argv[1:])
    for part in args.parts:  # saved after each part: a failure later keeps what ran
        t = time.perf_counter()
        payload[part] = parts[part]()
        minutes = round((time.perf_counter() - t) / 60, 1)
        payload.setdefault("runs", {})[part] = {"command": command, "minutes": minutes}
        out.write_text(json.dumps(payload, indent=2) + "\n")
    payload.update({"machine": machine(), "preset": args.preset, "max_tokens": args.max_tokens})
    out.write_text(json.dumps(payload, indent=2) + "\n")
    replace_section(ROOT / "docs" / "results.md", "ensembles", report(payload))


def report(p: dict[str, Any]) -> str:
    lines = [
        "## Decode-time ensembles",
        "",
        "Regenerate with `python experiments/ensembles.py --preset experiment` (all parts; "
        "`--parts proxy mixtures dexperts` picks some). Each part's last run: "
        + "; ".join(f"{k}: `{r['command']}`, {r['minutes']} min" for k, r in p["runs"].items())
        + f". {p['machine']}. Perplexities on the test split, at most {p['max_tokens']:,} tokens "
        "per domain, windows of 256 tokens with stride 128.",
    ]
    if "proxy" in p:
        lines += [
            "",
            "### Proxy-tuning the large base with the small expert / base pair",
            "",
            "| domain | large base | large expert (fine-tuned) | proxy-tuned large | small base "
            "| small expert | gap closed | log-ppl gap closed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d, r in p["proxy"].items():
            lines.append(
                f"| {d} | {r['large base']:.1f} | {r['large expert']:.1f} "
                f"| {r['proxy-tuned large']:.1f} | {r['small base']:.1f} | {r['small expert']:.1f} "
                f"| {100 * r['gap closed']:.0f}% | {100 * r['log gap closed']:.0f}% |"
            )
        closed = [r["gap closed"] for r in p["proxy"].values()]
        wins = sum(r["proxy-tuned large"] <= r["large expert"] for r in p["proxy"].values())
        beats_small = sum(r["proxy-tuned large"] < r["small expert"] for r in p["proxy"].values())
        small_better = sum(r["small expert"] < r["large expert"] for r in p["proxy"].values())
        base_better = sum(r["large base"] < r["small base"] for r in p["proxy"].values())
        lines += [
            "",
            f"Gap closed = (large base - proxy) / (large base - large expert), in perplexity: "
            f"{100 * min(closed):.0f}% to {100 * max(closed):.0f}% "
            f"(mean {100 * sum(closed) / len(closed):.0f}%; the paper reports about 88-91% on its "
            f"benchmarks). Above 100% the proxy-tuned large model beats the large model fine-tuned "
            f"directly ({wins} of {len(closed)} domains). The large base beats the small base on "
            f"{base_better} of {len(closed)} domains and the small expert beats the large expert "
            f"on {small_better}. The proxy-tuned large model beats the small expert that "
            f"steers it on {beats_small} of {len(closed)} domains.",
        ]
    if "mixtures" in p:
        mix = p["mixtures"]
        domains = [k for k in next(iter(mix.values())) if k != "overall"]
        lines += [
            "",
            "### Linear vs log-linear mixtures of the four small experts (uniform weights)",
            "",
            "| model | " + " | ".join(domains) + " | overall |",
            "|---|" + "---|" * (len(domains) + 1),
        ]
        for name, r in mix.items():
            cells = " | ".join(f"{r[d]:.1f}" for d in domains)
            lines.append(f"| {name} | {cells} | {r['overall']:.1f} |")
        lin, log = mix["linear ensemble"], mix["log_linear ensemble"]
        better = sum(lin[d] < log[d] for d in domains)
        experts = [k for k in mix if k.startswith("expert ")]
        best_expert = min(experts, key=lambda k: mix[k]["overall"])
        lines += [
            "",
            f"The linear mixture beats the log-linear one on {better} of {len(domains)} domains "
            f"(overall {lin['overall']:.1f} vs {log['overall']:.1f}): on mixed text a mixture "
            "keeps the probability of whichever expert knows the domain, while a product of "
            "experts penalises every token any expert finds unlikely. Overall, the best single "
            f"expert ({best_expert}) scores {mix[best_expert]['overall']:.1f}, the uniform weight "
            f"merge {mix['uniform merge']['overall']:.1f} (one model's decoding cost, against "
            f"{len(experts)} for the ensembles) and the small base "
            f"{mix['small base']['overall']:.1f}: each expert was fine-tuned on one domain and "
            "lost ground on the others.",
        ]
    if "dexperts" in p:
        dx = p["dexperts"]
        lines += [
            "",
            "### DExperts: steering review sentiment",
            "",
            f"{dx['prompts']} prompts (the first four words of held-out reviews, half of each "
            "label), 48 sampled tokens each (top-p 0.9, seed 0). Judge: a bag-of-words classifier "
            f"trained on the 4,000 labelled training reviews (test accuracy "
            f"{dx['classifier test accuracy']:.3f}; majority class 0.658). Perplexity: held-out "
            "reviews of each label under the steered model (for DExperts, the untruncated "
            "proxy-tuning form, since the nucleus gives text outside it infinite perplexity).",
            "",
            "| system | mean p(great) | share judged great | ppl of great reviews "
            "| ppl of other reviews |",
            "|---|---|---|---|---|",
        ]
        for name, r in dx["systems"].items():
            lines.append(
                f"| {name} | {r['p(great)']:.3f} | {r['share great']:.2f} "
                f"| {r['ppl great reviews']:.1f} | {r['ppl other reviews']:.1f} |"
            )
        rows = dx["systems"]
        steered = [k for k in rows if k.startswith("DExperts")]
        up = ", ".join(f"{rows[k]['share great']:.2f}" for k in steered if "to great" in k)
        down = ", ".join(f"{rows[k]['share great']:.2f}" for k in steered if "to other" in k)
        ordered = sum(
            rows[k]["ppl great reviews"] < rows[k]["ppl other reviews"]
            if "to great" in k
            else rows[k]["ppl other reviews"] < rows[k]["ppl great reviews"]
            for k in steered
        )
        lines += [
            "",
            f"Steering works in both directions and grows with alpha: the share judged great goes "
            f"from {rows['base']['share great']:.2f} for the base to {up} towards great and "
            f"{down} towards other (alpha {', '.join(f'{a:g}' for a in dx['alphas'])}), beyond "
            f"what sampling either expert alone gives ({rows['great expert']['share great']:.2f} "
            f"and {rows['other expert']['share great']:.2f}). Held-out reviews of the target "
            f"label are more likely than those of the other label under {ordered} of "
            f"{len(steered)} steered models, but both grow less likely as alpha grows, well "
            f"beyond the base's perplexity ({rows['base']['ppl great reviews']:.0f} on great "
            "reviews): strong steering buys sentiment with fluency, which is why DExperts keeps "
            "the base's nucleus when sampling.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
