"""DoLa (decoding by contrasting layers) on the quiz: multiple choice and open answers.

    python experiments/dola.py            # about 25 min at 1 thread (SmolLM2's DoLa scoring)
    python experiments/dola.py --render   # rewrite the docs section from the saved JSON

Models: the lab's experiment-preset small base (4 layers) and SmolLM2-135M-Instruct (30 layers).
Items: every `--every`-th question of the quiz's test split (experiments/train.py's `quiz_split`:
a hash of the question, 20%; the file is in topic order, so a stride keeps the topics' mix). A
question alone ("Question: Ghana\nAnswer:") does not say what is asked, so every question is
preceded by `--shots` training questions of its topic with their answers (the paper also prompts
with question-answer pairs). For each decoder:

- multiple choice by log-likelihood under the decoder's distribution (`alloy.eval`'s
  choice_accuracy, raw and per-byte normalised). DoLa's plausibility head gives -inf to every
  token outside it, so a choice whose tokens leave it can never win; the scoring rows use
  alpha 0 (no head) as well as the default 0.1.
- open answers: greedy decoding of up to 12 tokens after the prompt, stopped at a newline;
  correct when the text starts with the right choice (case, accents and surrounding space
  ignored).
  DoLa decodes with the paper's repetition penalty 1.2; plain decoding is given with and without
  it so that the penalty's share is visible.

Writes experiments/results/dola.json and the `dola` section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet, replace_section

from train import quiz_split

RESULTS = ROOT / "experiments" / "results" / "dola.json"
MODELS = {
    "lab small": Path("family") / "experiment" / "small" / "base",
    "SmolLM2-135M-Instruct": Path("models") / "smollm2-135m",
}
# label -> (rule settings or None for the plain model, repetition penalty of the open answers)
DECODERS: dict[str, tuple[dict[str, Any] | None, float | None]] = {
    "plain": (None, None),
    "plain + penalty 1.2": (None, 1.2),
    "dola high": ({"layers": "high"}, 1.2),
    "dola low": ({"layers": "low"}, 1.2),
}


def prompted_items(args: argparse.Namespace) -> list[Any]:
    """The test questions (every `args.every`-th), each preceded by `args.shots` training
    questions of its own topic with their answers (drawn with a fixed seed)."""
    from alloy.eval.data import load_eval_sets

    work = args.root / "experiments" / "dola"
    _, mc_test, mc_train = quiz_split(args, work)
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for line in mc_train.read_text().splitlines():
        item = json.loads(line)
        by_topic.setdefault(item["topic"], []).append(item)
    draw = random.Random(0)
    rows = []
    for item in [json.loads(line) for line in mc_test.read_text().splitlines()][:: args.every]:
        shots = draw.sample(by_topic[item["topic"]], args.shots)
        prefix = "".join(f"{i['context']}{i['choices'][i['answer']]}\n\n" for i in shots)
        rows.append(json.dumps({**item, "context": prefix + item["context"]}) + "\n")
    path = work / f"quiz-test-every{args.every}-{args.shots}shot.jsonl"
    path.write_text("".join(rows))
    return list(load_eval_sets([path])[0].items)


def load(path: Path, settings: dict[str, Any] | None, alpha: float | None = None) -> Any:
    from alloy import Ensemble

    if settings is None:
        return Ensemble.from_models([path], rule="linear")
    recipe: dict[str, Any] = {"rule": "dola", "members": [{"model": str(path)}], **settings}
    if alpha is not None:
        recipe["parameters"] = {"alpha": alpha}
    return Ensemble.from_recipe(recipe)


def fold(text: str) -> str:
    """Lower case, no surrounding space, accents dropped ("Brasília" matches "Brasilia")."""
    decomposed = unicodedata.normalize("NFKD", text.strip().lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def open_answers(ensemble: Any, items: list[Any], penalty: float | None) -> dict[str, Any]:
    out = ensemble.generate(
        [i.context for i in items],
        batch_size=16,
        max_new_tokens=12,
        stop=["\n"],
        repetition_penalty=penalty,
    )
    right = [
        fold(g.text).startswith(fold(i.choices[i.answer])) for g, i in zip(out, items, strict=True)
    ]
    samples = [
        {"q": i.context.rsplit("\n\n", 1)[-1], "a": g.text}
        for g, i in list(zip(out, items, strict=True))[:3]
    ]
    return {"exact": sum(right) / len(right), "samples": samples}


def run_model(name: str, path: Path, items: list[Any]) -> dict[str, Any]:
    from alloy.eval.choice import choice_accuracy

    rows: dict[str, Any] = {}
    for label, (settings, penalty) in DECODERS.items():
        start = time.perf_counter()
        ensemble = load(path, settings)
        row: dict[str, Any] = {"layers": list(ensemble.layers)}
        if label != "plain + penalty 1.2":  # scoring ignores the penalty: same as plain
            row["choice"] = choice_accuracy(ensemble, items)
            if settings is not None:
                row["choice_alpha0"] = choice_accuracy(load(path, settings, alpha=0.0), items)
        row["open"] = open_answers(ensemble, items, penalty)
        row["seconds"] = time.perf_counter() - start
        rows[label] = row
        print(name, label, json.dumps({k: v for k, v in row.items() if k != "open"}), flush=True)
    return rows


def section(payload: dict[str, Any]) -> str:
    lines = [
        "## DoLa: contrasting layers on the quiz",
        "",
        f"`{payload['command']}`; {payload['machine']}. {payload['items']} test questions of the "
        "quiz (experiments/train.py's split, every third), each preceded by "
        f"{payload.get('shots', 0)} training questions of its topic with their answers. "
        "Multiple choice by log-likelihood under each "
        "decoder (accuracy / per-byte normalised accuracy; chance "
        f"{payload['chance']:.3f}); DoLa's scores are given with its plausibility head "
        "(alpha 0.1) and without it (alpha 0). Open answers: greedy, up to 12 tokens, stopped "
        "at a newline, correct when the answer starts with the right choice (case and accents "
        "ignored); DoLa decodes with repetition penalty 1.2, as in the paper.",
        "",
        "| model | decoder | layers | MC acc | MC acc norm | MC acc, alpha 0 | open exact | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in payload["models"].items():
        for label, r in rows.items():
            choice = r.get("choice")
            zero = r.get("choice_alpha0")
            mc = f"{choice['accuracy']:.3f} | {choice['accuracy_norm']:.3f}" if choice else "- | -"
            mc0 = f"{zero['accuracy']:.3f} / {zero['accuracy_norm']:.3f}" if zero else "-"
            layers = ",".join(map(str, r["layers"])) or "-"
            lines.append(
                f"| {model} | {label} | {layers} | {mc} | {mc0} | {r['open']['exact']:.3f} | "
                f"{r['seconds']:.0f} |"
            )
    lines += ["", payload.get("prose", "").strip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--every", type=int, default=3, help="every N-th test question")
    parser.add_argument("--shots", type=int, default=5, help="question-answer pairs before each")
    parser.add_argument("--render", action="store_true", help="rewrite docs from the JSON")
    parser.add_argument("--prose", type=Path, help="a file of prose to put under the table")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads(RESULTS.read_text())
        if args.prose:
            payload["prose"] = args.prose.read_text()
            RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
        replace_section(ROOT / "docs" / "results.md", "dola", section(payload))
        return 0
    quiet()
    items = prompted_items(args)
    models = {
        n: args.root / p for n, p in MODELS.items() if (args.root / p / "config.json").is_file()
    }
    if not models:
        print("no models: run `alloy lab build --preset experiment` first", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {
        "command": "python experiments/dola.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "items": len(items),
        "shots": args.shots,
        "chance": sum(1 / len(i.choices) for i in items) / len(items),
        "models": {n: run_model(n, p, items) for n, p in models.items()},
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    replace_section(ROOT / "docs" / "results.md", "dola", section(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
