"""The report of an improvement loop: every model of the chain scored the same way, as JSON,
Markdown and a plot (see loop.py)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alloy.improve import select as pick
from alloy.improve.judge import AnswerScorer, RewardModels, load_policy
from alloy.improve.loop import (
    _base_key,
    _digest,
    _file_sha,
    _summary,
    _write_json,
    _write_jsonl,
    make_scorer,
    sample_answers,
)
from alloy.improve.recipe import ImprovePlan


def report_of(
    plan: ImprovePlan,
    out: Path,
    iterations: Sequence[dict[str, Any]],
    custom: AnswerScorer | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every model of the chain (start, then each iteration's) scored the same way: judge
    agreement with the labelled pairs, held-out prompts' answers scored by the optimised scorer
    (fixed: the starting policy's judge when the policy judges) and the monitors, eval sets."""
    spec = plan.spec
    chain = [("start", spec.policy)] + [(f"iter-{s['iteration']}", s["model"]) for s in iterations]
    models: list[dict[str, Any]] = []
    fixed_judge = custom or make_scorer(plan, spec.policy, 0)
    settings = {
        "agreement": spec.agreement and _file_sha(Path(spec.agreement)),
        "eval": spec.eval.model_dump() if spec.eval else None,
        "eval_prompts": spec.eval.prompts and _file_sha(Path(spec.eval.prompts))
        if spec.eval
        else None,
        "base": _base_key(plan, custom),
    }
    for n, (name, model) in enumerate(chain):
        cache = out / (f"iter-{n}" if n else "start") / "evaluation.json"
        key = _digest({**settings, "model": model, "index": n})
        entry = _cached(cache, key)
        if entry is None:
            say(f"report: scoring {name}")
            entry = {"name": name, "model": model}
            if spec.agreement:
                judged_by_policy = (
                    custom is None and plan.judge is not None and (plan.judge.model == "policy")
                )
                if judged_by_policy or not models:
                    entry["agreement"] = _agreement(plan, model, custom, n)
                else:  # a fixed scorer agrees with the labels the same for every model
                    entry["agreement"] = models[0]["agreement"]
            if spec.eval is not None:
                entry |= _evaluate(plan, model, fixed_judge, cache.with_name("held_out.jsonl"))
            cache.parent.mkdir(parents=True, exist_ok=True)
            _write_json(cache, {"key": key, **entry})
        models.append({k: v for k, v in entry.items() if k != "key"})
    return {
        "improve": spec.improve,
        "name": spec.name,
        "iterations": [{k: v for k, v in s.items() if k != "key"} for s in iterations],
        "models": models,
    }


def _cached(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return dict(data) if data.get("key") == key else None


def _agreement(
    plan: ImprovePlan, model: str, custom: AnswerScorer | None, n: int
) -> dict[str, float]:
    """How often the scorer (the policy `model` itself when the judge is the policy) prefers
    the labelled-better answer of the agreement pairs."""
    from alloy.eval.data import load_eval_sets

    assert plan.spec.agreement is not None
    (pairs,) = load_eval_sets([Path(plan.spec.agreement)])
    prompts = [p.prompt for p in pairs.items]
    scorer = custom or make_scorer(plan, model, n)
    chosen = scorer.score(prompts, [p.chosen for p in pairs.items])
    rejected = scorer.score(prompts, [p.rejected for p in pairs.items])
    return pick.agreement(chosen, rejected)


def _evaluate(
    plan: ImprovePlan, model: str, judge: AnswerScorer, answers_file: Path
) -> dict[str, Any]:
    """Held-out prompts answered by `model` (written to `answers_file`) and scored, and the
    eval sets."""
    spec = plan.spec
    assert spec.eval is not None
    entry: dict[str, Any] = {}
    if plan.eval_prompts:
        sampler = load_policy(model, spec.sample.template, spec.device)
        groups, sampling = sample_answers(
            sampler, plan.eval_prompts, plan, k=spec.eval.samples, seed=spec.seed + 999_983
        )
        del sampler
        prompts = [p for p, g in zip(plan.eval_prompts, groups, strict=True) for _ in g]
        answers = [a.text for g in groups for a in g]
        scores = judge.score(prompts, answers)
        monitor_scores = (
            RewardModels(spec.monitor.reward, device=spec.device).score(prompts, answers)
            if spec.monitor
            else None
        )
        rows = [
            {"prompt": p, "answer": a, "score": s}
            | ({} if monitor_scores is None else {"monitor": monitor_scores[i]})
            for i, (p, a, s) in enumerate(zip(prompts, answers, scores, strict=True))
        ]
        answers_file.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(answers_file, rows)
        entry["held_out"] = {
            "answers": str(answers_file),
            "score": _summary(scores),
            "tokens": statistics.fmean(len(a.token_ids) for g in groups for a in g),
            "tokens_per_second": sampling["tokens_per_second"],
        }
        if monitor_scores is not None:
            entry["held_out"]["monitor"] = _summary(monitor_scores)
    if spec.eval.data:
        from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer
        from alloy.train.recipe import source_path

        sets = load_eval_sets([source_path(d, plan.lab) for d in spec.eval.data])
        settings = EvalSettings(batch_size=spec.eval.batch_size, max_items=spec.eval.max_items)
        entry["eval"] = evaluate(load_scorer(model, device=spec.device), sets, settings)
    return entry


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per iteration, then one per model."""
    lines = [f"# {report['name'] or report['improve']}", ""]
    pairs = report["improve"] == "self_reward"
    kept = "pairs | score gap" if pairs else "kept | kept score"
    lines += [
        f"| iteration | answers | mean score | monitor | {kept} | loss | tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["iterations"]:
        monitor = s["monitor"]["mean"] if s.get("monitor") else None
        for run in s["runs"]:
            value = run.get("mean_gap") if pairs else run.get("kept_score")
            lines.append(
                f"| {s['iteration']}.{run['step']} | {s['samples']} | {_cell(s['score']['mean'])} "
                f"| {_cell(monitor)} | {run['kept']} | {_cell(value)} | {run['loss']:.4f} | "
                f"{s['sampling']['tokens_per_second']:.0f} |"
            )
    columns = _model_columns(report["models"])
    if columns:
        lines += ["", "| model | " + " | ".join(columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for m in report["models"]:
            values = _model_values(m)
            cells = [_cell(values.get(c)) for c in columns]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _model_values(entry: dict[str, Any]) -> dict[str, float]:
    """The report's numbers of one model, by column name."""
    values: dict[str, float] = {}
    if "agreement" in entry:
        values["judge agreement"] = entry["agreement"]["accuracy"]
    held = entry.get("held_out")
    if held:
        values["held-out score"] = held["score"]["mean"]
        if "monitor" in held:
            values["held-out monitor"] = held["monitor"]["mean"]
        values["answer tokens"] = held["tokens"]
    for set_name, metrics in (entry.get("eval") or {}).items():
        for metric in ("accuracy", "perplexity", "accuracy_norm"):
            if metric in metrics:
                values[f"{set_name} {metric}"] = float(metrics[metric])
    return values


def _model_columns(models: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for m in models:
        columns += [c for c in _model_values(m) if c not in columns]
    return columns


def plot(report: dict[str, Any], path: Path) -> None:
    """Each model column against the iteration (nothing drawn without matplotlib)."""
    columns = _model_columns(report["models"])
    if not columns:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3), squeeze=False)
    xs = list(range(len(report["models"])))
    for ax, column in zip(axes[0], columns, strict=True):
        ys = [_model_values(m).get(column, math.nan) for m in report["models"]]
        ax.plot(xs, ys, marker="o")
        ax.set_title(column, fontsize=9)
        ax.set_xticks(xs, [m["name"] for m in report["models"]], fontsize=7)
    fig.suptitle(report["name"] or report["improve"], fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
