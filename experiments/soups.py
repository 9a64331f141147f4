"""Greedy soup versus the best single ingredient versus the uniform soup, in and out of domain.

    python experiments/soups.py --preset experiment

Ingredients: every fine-tune of the soup domain (default fiction) from the lab family's small base
(the `soup/` models, which differ in learning rate and seed, plus the domain expert). Greedy and
uniform soups are made with `alloy.soup.make_soup`, selected on the domain's validation split,
then every ingredient and both soups are scored on the test split of every domain: the soup
domain is in distribution, the others out of distribution. The seed claims: the greedy soup is at
least as good as the best ingredient in distribution; the uniform soup is more robust out of
distribution. Writes docs/results.md (section `soups`) and experiments/results/.
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
    parser.add_argument("--max-tokens", type=int, default=32768)
    args = parser.parse_args()

    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.family import build_family
    from alloy.lab.presets import PRESETS
    from alloy.soup import make_soup

    quiet()
    preset = PRESETS[args.preset]
    domain = preset.soup_domain
    build_family(args.root, args.preset, on_event=print)
    family = args.root / "family" / args.preset
    corpus = args.root / "corpus"
    domains = list(json.loads((corpus / "manifest.json").read_text())["domains"])
    expert = family / "small" / "experts" / domain
    ingredients = [*sorted((family / "small" / "soup").iterdir()), expert]
    ingredients = [p for p in ingredients if (p / "config.json").is_file()]
    settings = EvalSettings(
        window=preset.seq_len, stride=preset.seq_len // 2, batch_size=16, max_tokens=args.max_tokens
    )
    t0 = time.perf_counter()
    test_sets = load_eval_sets([corpus / d / "test.jsonl" for d in domains])
    results: dict[str, dict[str, Any]] = {}
    chosen: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        models = {f"ingredient {p.name}": p for p in ingredients}
        for method in ("greedy", "uniform"):
            out = Path(tmp) / method
            report = make_soup(
                ingredients,
                [corpus / domain / "validation.jsonl"],
                out,
                method=method,
                settings=settings,
                hash_inputs=False,
            )
            chosen[method] = [p.name for p in report.chosen_paths]
            models[f"{method} soup"] = out
        for name, path in models.items():
            scores = evaluate(load_scorer(path, name=name), test_sets, settings)
            results[name] = {k.split("/")[0]: v["perplexity"] for k, v in scores.items()}
            print(name, results[name])
    payload = {
        "command": "python experiments/soups.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "preset": args.preset,
        "domain": domain,
        "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - t0,
        "chosen": chosen,
        "results": results,
    }
    out_dir = ROOT / "experiments" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"soups_{args.preset}.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, domains, ROOT / "docs" / "img" / f"soups_{args.preset}.png")
    text = report_markdown(payload, domains)
    replace_section(ROOT / "docs" / "results.md", f"soups-{args.preset}", text)
    print(text)


def report_markdown(payload: dict[str, Any], domains: list[str]) -> str:
    results, domain = payload["results"], payload["domain"]
    others = [d for d in domains if d != domain]
    for row in results.values():
        row["out of domain"] = sum(row[d] for d in others) / len(others)
    columns = [domain, *others, "out of domain"]
    ingredient_rows = {k: v for k, v in results.items() if k.startswith("ingredient")}
    best_name = min(ingredient_rows, key=lambda k: ingredient_rows[k][domain])
    lines = [
        f"Ingredients: the {len(ingredient_rows)} fine-tunes of {domain} from the "
        f"`{payload['preset']}` family's small base. Soups selected on {domain} validation; "
        f"scores are perplexity on each domain's test split (first {payload['max_tokens']:,} "
        f'tokens; lower is better). "out of domain" is the mean over the other domains. '
        f"Greedy soup kept: {', '.join(payload['chosen']['greedy'])}. {payload['machine']}. "
        "Regenerate with:",
        "",
        "```sh",
        payload["command"],
        "```",
        "",
        "| model | " + " | ".join(f"{c} (test)" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in results.items():
        label = f"{name} (best ingredient)" if name == best_name else name
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    best, greedy, uniform = results[best_name], results["greedy soup"], results["uniform soup"]
    lines += [
        "",
        f"In domain: greedy soup {greedy[domain]:.2f} vs best ingredient {best[domain]:.2f} "
        f"({'at least as good' if greedy[domain] <= best[domain] else 'worse'}); uniform soup "
        f"{uniform[domain]:.2f}. Out of domain: uniform {uniform['out of domain']:.2f}, greedy "
        f"{greedy['out of domain']:.2f}, best ingredient {best['out of domain']:.2f}.",
        "",
        f"![soups](img/soups_{payload['preset']}.png)",
    ]
    return "\n".join(lines)


def plot(payload: dict[str, Any], domains: list[str], path: Path) -> None:
    """In-domain vs mean out-of-domain perplexity of every ingredient and both soups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domain = payload["domain"]
    others = [d for d in domains if d != domain]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in payload["results"].items():
        out = sum(row[d] for d in others) / len(others)
        marker = "o" if name.startswith("ingredient") else "*"
        ax.scatter(row[domain], out, marker=marker, s=60 if marker == "o" else 180)
        ax.annotate(
            name.replace("ingredient ", ""),
            (row[domain], out),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"{domain} test perplexity (in domain)")
    ax.set_ylabel("mean perplexity on the other domains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
