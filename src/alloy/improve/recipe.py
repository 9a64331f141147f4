"""Improvement-loop recipes: strict YAML, every problem at once, nothing loaded.

    improve: raft                  # raft | rest | self_reward
    policy: runs/models/sft        # the model to improve (a folder, or BASE+ADAPTER)
    prompts: {path: prompts.jsonl, per_iteration: 64}   # JSONL {"prompt": "..."}
    iterations: 2                  # Grow steps (rest), or iterations
    sample: {k: 4, max_new_tokens: 48, temperature: 0.8, top_p: 0.95, template: chat}
    score: {reward: [runs/rm-a, runs/rm-soup]}     # mean reward of these models, or
    # score: {judge: {model: policy, mode: expected}}   # an LLM-as-a-judge rubric
    select: {top_k: 1}             # raft: best top_k per prompt (floor: minimum score)
    # select: {quantiles: [0.5, 0.8]}    # rest: one Improve step per threshold, rising
    # select: {min_gap: 0}               # self_reward: best vs worst pair per prompt
    train: {schedule: {name: constant, lr: 1e-5}, max_steps: 40, batch_size: 8}
    monitor: {reward: [runs/rm-held-out]}          # scored on every sample, never optimised
    agreement: labelled_pairs.jsonl                # judge agreement with labelled pairs
    eval: {prompts: held_out_prompts.jsonl, data: [{corpus: fiction, split: test}]}
    seed: 0

The training settings are an `alloy train` recipe without `model` and `data`, which the loop
fills in: `objective: sft` for raft and rest, `dpo` for self_reward (the default for each).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alloy.errors import ProblemCollector, RecipeError
from alloy.io.yamlfile import StrictModel, read_recipe, validate_schema
from alloy.train.recipe import DataEntry, data_shorthand, load_train_recipe, source_path

Number = float | int
Method = Literal["raft", "rest", "self_reward"]
OBJECTIVES: dict[str, str] = {"raft": "sft", "rest": "sft", "self_reward": "dpo"}
DEFAULT_JUDGE_PROMPT = Path(__file__).with_name("judge_prompt.txt")
PLACEHOLDERS = ("{prompt}", "{response}")
MAX_LISTED = 10


class PromptsEntry(StrictModel):
    path: str
    per_iteration: int | None = Field(default=None, ge=1)  # a fresh slice each iteration
    limit: int | None = Field(default=None, ge=1)  # the first N prompts only


class SampleEntry(StrictModel):
    k: int = Field(default=4, ge=1)  # samples per prompt
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: Number = Field(default=0.8, gt=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    min_p: Number | None = Field(default=None, ge=0, lt=1)
    stop: list[str] = Field(default_factory=list)
    template: str | None = None  # "chat", or a string with {prompt}
    batch_size: int = Field(default=16, ge=1)


class JudgeEntry(StrictModel):
    model: str = "policy"  # "policy": the current policy judges its own samples
    prompt: str | None = None  # a file with {prompt} and {response}; default: the 5-point rubric
    mode: Literal["generate", "expected"] = "generate"
    samples: int = Field(default=3, ge=1)  # generate: judgements averaged per answer
    max_new_tokens: int = Field(default=96, ge=1)
    temperature: Number = Field(default=0.7, gt=0)
    template: str | None = None  # default: sample.template
    batch_size: int = Field(default=8, ge=1)


class ScoreEntry(StrictModel):
    reward: list[str] | None = Field(default=None, min_length=1)  # reward models, mean score
    judge: JudgeEntry | None = None
    batch_size: int = Field(default=8, ge=1)


class SelectEntry(StrictModel):
    top_k: int | None = Field(default=None, ge=1)  # raft (default 1)
    floor: Number | None = None  # raft: keep only samples scored at least this
    thresholds: list[Number] | None = Field(default=None, min_length=1)  # rest, reward units
    quantiles: list[Number] | None = Field(default=None, min_length=1)  # rest, of each Grow
    min_gap: Number | None = Field(default=None, ge=0)  # self_reward (default 0)


class MonitorEntry(StrictModel):
    reward: list[str] = Field(min_length=1)  # held-out reward models: scored, not optimised


class EvalEntry(StrictModel):
    prompts: str | None = None  # held-out prompts: every model samples, every scorer scores
    samples: int = Field(default=1, ge=1)  # samples per held-out prompt
    limit: int | None = Field(default=None, ge=1)
    data: list[DataEntry] | None = None  # alloy eval sets (perplexity, choice, preference)
    max_items: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return data_shorthand(value)


class ImproveRecipe(StrictModel):
    name: str | None = None
    improve: Method
    policy: str
    prompts: PromptsEntry
    iterations: int = Field(default=2, ge=1)
    sample: SampleEntry = Field(default_factory=SampleEntry)
    score: ScoreEntry | None = None
    select: SelectEntry = Field(default_factory=SelectEntry)
    train: dict[str, Any] = Field(default_factory=dict)
    restart: bool = False  # fine-tune the start policy each iteration (ReST-EM), not the last
    monitor: MonitorEntry | None = None
    agreement: str | None = None  # labelled preference pairs the judge is checked against
    eval: EvalEntry | None = None
    seed: int = 0
    device: str = "cpu"
    lab: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("prompts"), str):
            value = {**value, "prompts": {"path": value["prompts"]}}
        return value


@dataclass(frozen=True)
class ImprovePlan:
    """A checked recipe: what every iteration does, with its prompts read."""

    spec: ImproveRecipe
    origin: str
    text: str  # the recipe as YAML (recorded in the report)
    out: Path
    prompts: list[str]
    train: dict[str, Any]  # the alloy train settings, objective filled in
    score: ScoreEntry
    eval_prompts: list[str]
    lab: Path

    @property
    def judge(self) -> JudgeEntry | None:
        return self.score.judge

    def iteration_prompts(self, t: int) -> list[str]:
        """The prompts of iteration t (1-based): all of them, or the t-th slice of a seeded
        shuffle when `per_iteration` is set."""
        per = self.spec.prompts.per_iteration
        if per is None:
            return self.prompts
        import random

        order = list(range(len(self.prompts)))
        random.Random(self.spec.seed).shuffle(order)
        return [self.prompts[i] for i in sorted(order[(t - 1) * per : t * per])]

    def improve_steps(self) -> int:
        """Fine-tuning runs per iteration: one per ReST threshold, else one."""
        select = self.spec.select
        if self.spec.improve == "rest":
            return len(select.thresholds or select.quantiles or [])
        return 1

    def summary(self) -> str:
        spec = self.spec
        per = spec.prompts.per_iteration
        prompts = f"{per} of {len(self.prompts)}" if per else str(len(self.prompts))
        if self.score.reward:
            scorer = f"mean reward of {len(self.score.reward)} model(s)"
        else:
            assert self.score.judge is not None
            judge = self.score.judge
            who = "the policy" if judge.model == "policy" else judge.model
            scorer = f"{who} as judge ({judge.mode})"
        train = self.train
        budget = next(
            (f"{train[k]} {k}" for k in ("max_steps", "max_tokens", "epochs") if k in train),
            "the recipe's default length",
        )
        lines = [
            f"{spec.improve}: {spec.iterations} iteration(s) from {spec.policy}",
            f"  each: {spec.sample.k} samples for each of {prompts} prompts, scored by {scorer}",
            f"  then {self.improve_steps()} {self.train['objective']} run(s) of {budget}",
        ]
        if spec.monitor:
            lines.append(f"  monitored by {len(spec.monitor.reward)} held-out reward model(s)")
        if spec.agreement:
            lines.append(f"  judge agreement on {spec.agreement}")
        return "\n".join(lines)


def is_improve_recipe(raw: Mapping[str, Any]) -> bool:
    return "improve" in raw


def load_improve_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str] | None = None,
    *,
    check_paths: bool = True,
) -> ImprovePlan:
    """Read and check an improvement-loop recipe (see the module docstring); with
    `check_paths=False` the models and files it names are not looked at (`validate
    --recipe-only`; the plan then holds no prompts).

    Raises:
        RecipeError: every problem, with its YAML path (and file:line for the prompt files).
    """
    raw, origin = read_recipe(source, "improve recipe", "improve:, policy:, prompts:, ...")
    problems = ProblemCollector()
    spec = validate_schema(raw, ImproveRecipe, {}, problems)
    if spec is None:
        problems.raise_if_any(RecipeError, f"invalid improve recipe ({origin})")
        raise AssertionError("schema validation failed without a problem")
    lab = Path(spec.lab or os.environ.get("ALLOY_LAB") or "runs/lab")
    paths = problems if check_paths else ProblemCollector()  # what the files and models say
    _check_model(spec.policy, "policy", paths, reward=False)
    prompts = read_prompts(Path(spec.prompts.path), "prompts.path", paths, spec.prompts.limit)
    per = spec.prompts.per_iteration
    if per is not None and prompts and per * spec.iterations > len(prompts):
        problems.add(
            "prompts.per_iteration",
            f"{spec.iterations} iterations of {per} need {per * spec.iterations} prompts, "
            f"{spec.prompts.path} has {len(prompts)}",
            "lower per_iteration or iterations, or leave per_iteration out to reuse the prompts",
        )
    score = _score_entry(spec, problems, paths)
    _check_select(spec, problems)
    if spec.improve == "self_reward" and spec.sample.k < 2:
        problems.add("sample.k", "self_reward pairs samples of a prompt: it needs k >= 2")
    _check_template(spec.sample.template, "sample.template", problems)
    if score.judge is not None:
        _check_judge(score.judge, problems, paths)
    for i, model in enumerate(spec.monitor.reward if spec.monitor else []):
        _check_model(model, f"monitor.reward.{i}", paths, reward=True)
    if spec.agreement is not None:
        _check_pairs(Path(spec.agreement), "agreement", paths)
    eval_prompts: list[str] = []
    if spec.eval is not None:
        if spec.eval.prompts is None and not spec.eval.data:
            problems.add("eval", "give prompts (held-out prompts to sample) or data, or both")
        if spec.eval.prompts is not None:
            eval_prompts = read_prompts(
                Path(spec.eval.prompts), "eval.prompts", paths, spec.eval.limit
            )
        for i, entry in enumerate(spec.eval.data or []):
            if (entry.path is None) == (entry.corpus is None):
                problems.add(f"eval.data.{i}", "give path or corpus (exactly one)")
            elif not source_path(entry, lab).exists():
                paths.add(f"eval.data.{i}", f"{source_path(entry, lab)}: not found")
    train = _train_settings(spec, problems)
    from alloy.train.recipe import _device_issues

    for where, message, hint in _device_issues(spec.device, "fp32"):
        problems.add(where, message, hint)
    problems.raise_if_any(RecipeError, f"invalid improve recipe ({origin})")
    import yaml

    text = yaml.safe_dump(raw, sort_keys=False)
    out_path = Path(out) if out is not None else Path()
    return ImprovePlan(spec, origin, text, out_path, prompts, train, score, eval_prompts, lab)


def _score_entry(
    spec: ImproveRecipe, problems: ProblemCollector, paths: ProblemCollector
) -> ScoreEntry:
    score = spec.score
    if score is None:
        if spec.improve == "self_reward":
            return ScoreEntry(judge=JudgeEntry())
        problems.add("score", f"{spec.improve} needs a scorer", "score: {reward: [RM, ...]}")
        return ScoreEntry(judge=JudgeEntry())
    if (score.reward is None) == (score.judge is None):
        problems.add("score", "give reward (reward models) or judge (an LLM judge), exactly one")
        return score if score.judge is not None or score.reward else ScoreEntry(judge=JudgeEntry())
    for i, model in enumerate(score.reward or []):
        _check_model(model, f"score.reward.{i}", paths, reward=True)
    if spec.improve == "self_reward" and (score.judge is None or score.judge.model != "policy"):
        problems.add(
            "score",
            "self_reward scores with the policy itself as the judge",
            "leave score out (or score: {judge: {model: policy}}); raft/rest take other scorers",
        )
    return score


def _check_select(spec: ImproveRecipe, problems: ProblemCollector) -> None:
    select = spec.select
    given = {k for k, v in select.model_dump().items() if v is not None}
    allowed = {
        "raft": {"top_k", "floor"},
        "rest": {"thresholds", "quantiles"},
        "self_reward": {"min_gap"},
    }[spec.improve]
    for key in sorted(given - allowed):
        problems.add(f"select.{key}", f"{spec.improve} does not use {key}", f"it takes {allowed}")
    if spec.improve == "rest":
        values = select.thresholds or select.quantiles
        if (select.thresholds is None) == (select.quantiles is None):
            problems.add(
                "select",
                "rest needs thresholds (reward units) or quantiles, exactly one",
                "e.g. quantiles: [0.5, 0.7, 0.9], one Improve step each",
            )
        if values is not None and any(b <= a for a, b in itertools.pairwise(values)):
            problems.add("select", "ReST's thresholds rise: give them in increasing order")
        for i, q in enumerate(select.quantiles or []):
            if not 0 <= q < 1:
                problems.add(f"select.quantiles.{i}", f"{q} is not in [0, 1)")
    if spec.improve == "raft" and select.top_k is not None and select.top_k > spec.sample.k:
        problems.add("select.top_k", f"keeps {select.top_k} of only {spec.sample.k} samples")


def _check_judge(judge: JudgeEntry, problems: ProblemCollector, paths: ProblemCollector) -> None:
    if judge.model != "policy":
        _check_model(judge.model, "score.judge.model", paths, reward=False)
    _check_template(judge.template, "score.judge.template", problems)
    if judge.prompt is not None:
        read_judge_prompt(Path(judge.prompt), "score.judge.prompt", paths)


def read_judge_prompt(path: Path, where: str, problems: ProblemCollector) -> str:
    """The judge prompt's text; it must hold {prompt} and {response}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        problems.add(where, f"cannot read {path}: {exc}")
        return ""
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        problems.add(
            where,
            f"{path} lacks {' and '.join(missing)}",
            "the judge prompt must hold {prompt} and {response}, replaced for each answer",
        )
    return text


def _check_template(template: str | None, where: str, problems: ProblemCollector) -> None:
    if template is not None and template != "chat" and "{prompt}" not in template:
        problems.add(where, f"{template!r} has no {{prompt}}", 'write e.g. "Q: {prompt}\\nA:"')


def _check_model(path: str, where: str, problems: ProblemCollector, *, reward: bool) -> None:
    from alloy.adapters.adapted import split_spec

    base, _ = split_spec(path)
    config = base / "config.json"
    if not config.is_file():
        problems.add(where, f"{path}: no config.json", "a Hugging Face model folder")
        return
    if not reward:
        return
    try:
        architectures = json.loads(config.read_text()).get("architectures") or [""]
    except (OSError, ValueError) as exc:
        problems.add(where, f"{config}: unreadable config: {exc}")
        return
    if not str(architectures[0]).endswith("ForSequenceClassification"):
        problems.add(
            where,
            f"{path} is not a reward model ({architectures[0] or 'no architecture'})",
            "train one with alloy train (objective: reward) or soup several with alloy soup",
        )


def read_prompts(
    path: Path, where: str, problems: ProblemCollector, limit: int | None = None
) -> list[str]:
    """The `prompt` strings of a JSONL file (other keys ignored), bad lines listed by number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as exc:
        problems.add(where, f"cannot read {path}: {exc}")
        return []
    prompts: list[str] = []
    bad = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"invalid JSON: {exc.msg}"
            record = None
        else:
            prompt = record.get("prompt") if isinstance(record, dict) else None
            message = "" if isinstance(prompt, str) and prompt else 'needs "prompt", a string'
        if message:
            bad += 1
            if bad <= MAX_LISTED:
                problems.add(f"{path}:{n}", message, 'one {"prompt": "..."} object per line')
            continue
        assert isinstance(record, dict)
        prompts.append(record["prompt"])
    if bad > MAX_LISTED:
        problems.add(f"{path}", f"{bad - MAX_LISTED} more bad lines not listed")
    if not prompts and not bad:
        problems.add(where, f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def _check_pairs(path: Path, where: str, problems: ProblemCollector) -> None:
    from alloy.errors import InputError
    from alloy.eval.data import load_eval_sets

    try:
        (loaded,) = load_eval_sets([path])
    except InputError as exc:
        problems.add(where, f"{path}: {exc.message}", "labelled prompt/chosen/rejected pairs")
        problems.extend(exc.problems)
        return
    if loaded.kind != "preference":
        problems.add(where, f"{path} is {loaded.kind} data", "prompt/chosen/rejected pairs")


def _train_settings(spec: ImproveRecipe, problems: ProblemCollector) -> dict[str, Any]:
    """The alloy train settings of every run: checked as a recipe, model and data filled in by a
    probe (they are the loop's)."""
    train = dict(spec.train)
    for key in ("model", "data"):
        if key in train:
            problems.add(f"train.{key}", "set by the loop", "give policy: and prompts: instead")
            train.pop(key)
    objective = OBJECTIVES[spec.improve]
    train.setdefault("objective", objective)
    if train["objective"] != objective:
        problems.add(
            "train.objective",
            f"{spec.improve} trains {objective}, not {train['objective']}",
            f"objective: {objective} (or leave it out)",
        )
    train.setdefault("seed", spec.seed)
    if spec.lab is not None:
        train.setdefault("lab", spec.lab)
    probe = {**train, "model": spec.policy, "data": [{"path": spec.prompts.path}]}
    try:
        load_train_recipe(probe, check_paths=False)
    except RecipeError as error:
        for p in error.problems:
            if p.where.split(".")[0] not in ("model", "data"):
                problems.add(f"train.{p.where}", p.message, p.hint)
    return train
