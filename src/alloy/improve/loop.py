"""`alloy improve RECIPE OUT`: RAFT, ReST and self-rewarding loops over `alloy train` runs.

Every iteration t samples `k` answers per prompt from the current policy (`alloy.Ensemble`,
batched and KV-cached), scores them, keeps some, and fine-tunes with an ordinary `alloy train`
run:

- raft: each prompt's best `top_k` answers, one SFT run (Dong et al. 2023).
- rest: one Grow step (the samples), then one Improve step per rising threshold, each an SFT
  run from the previous step's model on the samples at or above it (Gulcehre et al. 2023);
  `restart: true` fine-tunes the starting policy every iteration instead (ReST-EM).
- self_reward: the policy judges its own answers with the rubric, each prompt's best and worst
  answers make a pair, one DPO run whose reference is the iteration's starting model: M1 -> M2
  -> M3 (Yuan et al. 2024).

Everything is kept under OUT:

    OUT/iter-<t>/samples.jsonl      every answer: prompt, answer, score, monitor scores
    OUT/iter-<t>/train[-<s>].jsonl  what the run(s) trained on (SFT examples or pairs)
    OUT/iter-<t>/model/             the iteration's model (rest: OUT/iter-<t>/step-<s>/model/)
    OUT/iter-<t>/iteration.json     the iteration's statistics and its key
    OUT/{start,iter-<t>}/held_out.jsonl     each model's answers to eval.prompts, scored
    OUT/report.json, report.md, report.png   every model of the chain, iteration by iteration
    OUT/improve.json                the recipe and every run

Running the recipe again reuses each finished iteration whose settings are unchanged (so a
stopped loop continues, and a loop given more iterations extends); an iteration that is redone
redoes every later one. Reuse is decided by the recipe, not by the weights: after changing a
model in place, pass --force.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alloy.errors import InputError, OutputExistsError, Problem
from alloy.improve import select as pick
from alloy.improve.judge import (
    AnswerScorer,
    Judge,
    RewardModels,
    finite_mean,
    judge_prompt_text,
    load_policy,
)
from alloy.improve.recipe import ImprovePlan, load_improve_recipe

RECORD = "improve.json"
ITERATION = "iteration.json"
KEY_VERSION = 1


def improve(
    source: str | os.PathLike[str] | Mapping[str, Any] | ImprovePlan,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    scorer: AnswerScorer | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run an improvement loop (see the module docstring); returns the report.

    Args:
        scorer: replaces the recipe's scorer (any object with `score(prompts, answers)`; the
            library's way to optimise a programmatic reward). The recipe must still name one,
            which then only documents the run.
    """
    plan = source if isinstance(source, ImprovePlan) else load_improve_recipe(source, out)
    out = Path(out)
    _prepare(out, force)
    record: dict[str, Any] = {"recipe": plan.text, "iterations": []}
    base_key = _base_key(plan, scorer)
    current = plan.spec.policy
    redo = False
    iterations = []
    for t in range(1, plan.spec.iterations + 1):
        folder = out / f"iter-{t}"
        key = _digest({"base": base_key, "iteration": t})
        stats = None if redo else _finished(folder, key)
        if stats is not None:
            say(f"iteration {t}: reused (same settings)")
        else:
            redo = True
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            stats = _iteration(plan, t, current, folder, scorer, say)
            stats["key"] = key
            _write_json(folder / ITERATION, stats)
        iterations.append(stats)
        current = stats["model"]
        record["iterations"].append({k: v for k, v in stats.items() if k != "key"})
        _write_json(out / RECORD, record)
    from alloy.improve.report import markdown, plot, report_of

    report = report_of(plan, out, iterations, scorer, say)
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    return report


def _prepare(out: Path, force: bool) -> None:
    if out.is_dir() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not (out / RECORD).is_file():
            raise OutputExistsError(
                f"{out}: folder exists and is not an improve loop; pass --force to replace it, "
                "or choose another output path"
            )
    elif out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base_key(plan: ImprovePlan, scorer: AnswerScorer | None) -> str:
    """What every iteration's result depends on (not `iterations`, `eval` or `agreement`)."""
    spec = plan.spec
    judge = plan.judge
    return _digest(
        {
            "version": KEY_VERSION,
            "improve": spec.improve,
            "policy": spec.policy,
            "prompts": _file_sha(Path(spec.prompts.path)),
            "prompt_settings": spec.prompts.model_dump(exclude={"path"}),
            "sample": spec.sample.model_dump(),
            "score": plan.score.model_dump(),
            "judge_prompt": judge_prompt_text(judge.prompt) if judge else None,
            "custom_scorer": getattr(scorer, "name", "custom") if scorer else None,
            "select": spec.select.model_dump(),
            "train": plan.train,
            "restart": spec.restart,
            "monitor": spec.monitor.model_dump() if spec.monitor else None,
            "seed": spec.seed,
            "device": spec.device,
        }
    )


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / ITERATION
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stats.get("key") != key or not (Path(stats["model"]) / "config.json").exists():
        return None
    return dict(stats)


def make_scorer(plan: ImprovePlan, policy: str, t: int) -> AnswerScorer:
    """The recipe's scorer for iteration t: its reward models, or its judge (the policy of the
    iteration when the judge is `policy`)."""
    spec = plan.spec
    if plan.score.reward:
        return RewardModels(plan.score.reward, device=spec.device, batch_size=plan.score.batch_size)
    judge = plan.judge
    assert judge is not None
    return Judge(
        policy if judge.model == "policy" else judge.model,
        judge_prompt_text(judge.prompt),
        mode=judge.mode,
        samples=judge.samples,
        max_new_tokens=judge.max_new_tokens,
        temperature=float(judge.temperature),
        template=judge.template if judge.template is not None else spec.sample.template,
        batch_size=judge.batch_size,
        seed=spec.seed + 7919 * t,
        device=spec.device,
    )


def sample_answers(
    sampler: Any, prompts: Sequence[str], plan: ImprovePlan, *, k: int, seed: int
) -> tuple[list[list[Any]], dict[str, float]]:
    """k sampled answers per prompt, grouped by prompt, and the sampling throughput."""
    s = plan.spec.sample
    repeated = [p for p in prompts for _ in range(k)]
    started = time.perf_counter()
    generations = sampler.generate(
        repeated,
        batch_size=s.batch_size,
        max_new_tokens=s.max_new_tokens,
        do_sample=True,
        temperature=float(s.temperature),
        top_k=s.top_k,
        top_p=None if s.top_p is None else float(s.top_p),
        min_p=None if s.min_p is None else float(s.min_p),
        stop=tuple(s.stop),
        seed=seed,
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(g.token_ids) for g in generations)
    grouped = [generations[i * k : (i + 1) * k] for i in range(len(prompts))]
    rate = tokens / seconds if seconds > 0 else math.nan
    return grouped, {"tokens": tokens, "seconds": seconds, "tokens_per_second": rate}


def _score(
    scorer: AnswerScorer, prompts: Sequence[str], answers: Sequence[str], sampler: Any
) -> list[float | None]:
    if isinstance(scorer, Judge) and sampler is not None:
        return scorer.score(prompts, answers, ensemble=sampler)
    return scorer.score(prompts, answers)


def _iteration(
    plan: ImprovePlan,
    t: int,
    policy: str,
    folder: Path,
    custom: AnswerScorer | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    spec = plan.spec
    prompts = plan.iteration_prompts(t)
    say(f"iteration {t}: sampling {spec.sample.k} answers for each of {len(prompts)} prompts")
    sampler = load_policy(policy, spec.sample.template, spec.device)
    groups, sampling = sample_answers(
        sampler, prompts, plan, k=spec.sample.k, seed=spec.seed + 1000 * t
    )
    flat_prompts = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    answers = [a.text for g in groups for a in g]
    scorer = custom or make_scorer(plan, policy, t)
    say(f"iteration {t}: scoring {len(answers)} answers ({scorer.name})")
    judge_shares = (
        isinstance(scorer, Judge)
        and scorer.model == policy
        and (scorer.template == spec.sample.template)
    )
    flat = _score(scorer, flat_prompts, answers, sampler if judge_shares else None)
    del sampler
    monitor = (
        RewardModels(spec.monitor.reward, device=spec.device).score(flat_prompts, answers)
        if spec.monitor
        else None
    )
    k = spec.sample.k
    scores = [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
    # An empty answer (EOS at once) cannot be a training target: it is never kept or paired.
    selectable = [
        [None if not a.text.strip() else v for a, v in zip(g, row, strict=True)]
        for g, row in zip(groups, scores, strict=True)
    ]
    rows = []
    for n, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        for j, answer in enumerate(group):
            row = {
                "prompt": prompt,
                "sample": j,
                "answer": answer.text,
                "score": scores[n][j],
                "tokens": len(answer.token_ids),
                "finish_reason": answer.finish_reason,
            }
            if monitor is not None:
                row["monitor"] = monitor[n * k + j]
            rows.append(row)
    _write_jsonl(folder / "samples.jsonl", rows)
    stats: dict[str, Any] = {
        "iteration": t,
        "policy": policy,
        "prompts": len(prompts),
        "samples": len(answers),
        "sampling": sampling,
        "score": _summary(flat),
        "monitor": _summary(monitor) if monitor is not None else None,
        "empty": sum(not a.text.strip() for a in answers_of(groups)),
    }
    if isinstance(scorer, Judge) and scorer.judgements:
        stats["unreadable"] = scorer.unreadable / scorer.judgements
    if spec.improve == "self_reward":
        stats |= _train_pairs(plan, t, policy, folder, prompts, groups, selectable, monitor, say)
    else:
        stats |= _train_best(plan, t, policy, folder, prompts, groups, selectable, monitor, say)
    return stats


def answers_of(groups: Sequence[Sequence[Any]]) -> list[Any]:
    return [a for g in groups for a in g]


def _summary(values: Sequence[float | None] | None) -> dict[str, float]:
    kept = [float(v) for v in values or [] if v is not None and math.isfinite(v)]
    if not kept:
        return {"mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(kept),
        "median": statistics.median(kept),
        "min": min(kept),
        "max": max(kept),
        "n": len(kept),
    }


def _train_best(
    plan: ImprovePlan,
    t: int,
    policy: str,
    folder: Path,
    prompts: Sequence[str],
    groups: Sequence[Sequence[Any]],
    scores: pick.Scores,
    monitor: Sequence[float | None] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """raft: one SFT run on each prompt's best; rest: one per rising threshold."""
    spec = plan.spec
    select = spec.select
    if spec.improve == "raft":
        steps: list[tuple[float | None, list[pick.Index]]] = [
            (select.floor, pick.best_of(scores, select.top_k or 1, select.floor))
        ]
    else:
        if select.thresholds is not None:
            levels = [float(x) for x in select.thresholds]
        else:
            levels = [pick.quantile(scores, float(q)) for q in select.quantiles or []]
        steps = [(level, pick.above(scores, level)) for level in levels]
    start = spec.policy if spec.restart else policy
    runs = []
    k = spec.sample.k
    for s, (level, kept) in enumerate(steps, 1):
        where = f"iteration {t}" + (f", Improve step {s}" if len(steps) > 1 else "")
        if not kept:
            raise InputError(
                f"{where}: no answer was kept",
                [
                    Problem(
                        "select",
                        f"scores of this iteration: {_range_text(scores)}; the bar was {level}",
                        "lower the floor or thresholds (or use quantiles)",
                    )
                ],
            )
        records = [
            pick.sft_record(prompts[p], groups[p][j].text, spec.sample.template) for p, j in kept
        ]
        name = "train.jsonl" if len(steps) == 1 else f"train-{s}.jsonl"
        data = folder / name
        _write_jsonl(data, records)
        out = folder / "model" if len(steps) == 1 else folder / f"step-{s}" / "model"
        say(f"{where}: fine-tuning on {len(kept)} answers" + _bar(level))
        result = _train(plan, start, data, "messages" if _chat(spec) else "completion", out, t, say)
        kept_scores = [scores[p][j] for p, j in kept]
        kept_monitor = [monitor[p * k + j] for p, j in kept] if monitor is not None else None
        runs.append(
            {
                "step": s,
                "threshold": level,
                "kept": len(kept),
                "kept_score": finite_mean(kept_scores),
                "kept_monitor": finite_mean(kept_monitor) if kept_monitor else None,
                "data": str(data),
                **result,
            }
        )
        start = str(out)
    return {"runs": runs, "model": start}


def _train_pairs(
    plan: ImprovePlan,
    t: int,
    policy: str,
    folder: Path,
    prompts: Sequence[str],
    groups: Sequence[Sequence[Any]],
    scores: pick.Scores,
    monitor: Sequence[float | None] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """self_reward: best vs worst answer of each prompt, one DPO run from this iteration's
    model (its own reference)."""
    spec = plan.spec
    pairs = pick.best_and_worst(scores, float(spec.select.min_gap or 0.0))
    if not pairs:
        readable = any(v is not None for g in scores for v in g)
        hint = (
            "raise sample.k or sample.temperature"
            if readable
            else 'the judge wrote no readable "Score: N": try score.judge.mode: expected'
        )
        raise InputError(
            f"iteration {t}: no prompt's answers were scored apart, so there are no pairs",
            [Problem("score", f"scores: {_range_text(scores)}", hint)],
        )
    records = [
        pick.pair_record(prompts[p], groups[p][b].text, groups[p][w].text, spec.sample.template)
        for p, b, w in pairs
    ]
    data = folder / "train.jsonl"
    _write_jsonl(data, records)
    start = spec.policy if spec.restart else policy
    out = folder / "model"
    say(f"iteration {t}: DPO on {len(pairs)} self-judged pairs")
    result = _train(plan, start, data, "preference", out, t, say)
    gaps = [float(scores[p][b] or 0) - float(scores[p][w] or 0) for p, b, w in pairs]
    k = spec.sample.k
    run: dict[str, Any] = {
        "step": 1,
        "kept": len(pairs),
        "pairs_share": len(pairs) / len(prompts),
        "mean_gap": statistics.fmean(gaps),
        "data": str(data),
        **result,
    }
    if monitor is not None:
        chosen = [monitor[p * k + b] for p, b, _ in pairs]
        rejected = [monitor[p * k + w] for p, _, w in pairs]
        run["monitor_agreement"] = pick.agreement(chosen, rejected)["accuracy"]
    return {"runs": [run], "model": str(out)}


def _range_text(scores: pick.Scores) -> str:
    s = _summary([v for g in scores for v in g])
    if not s["n"]:
        return "none readable"
    return f"{s['n']} scored, {s['min']:.3g} to {s['max']:.3g} (median {s['median']:.3g})"


def _bar(level: float | None) -> str:
    return "" if level is None else f" scored at least {level:.4g}"


def _chat(spec: Any) -> bool:
    return bool(spec.sample.template == "chat")


def _train(
    plan: ImprovePlan,
    start: str,
    data: Path,
    kind: str,
    out: Path,
    t: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One ordinary `alloy train` run of the loop's settings."""
    from alloy.train import train

    recipe = {
        **plan.train,
        "model": start,
        "data": [{"name": "improve", "path": str(data), "kind": kind}],
        "seed": int(plan.train.get("seed", 0)) + t,
    }
    result = train(recipe, out, force=True, say=say)
    return {
        "start": start,
        "model": str(out),
        "loss": result.final_loss,
        "steps": result.steps,
        "seconds": result.seconds,
    }


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
