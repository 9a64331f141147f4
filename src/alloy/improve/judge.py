"""Scoring answers: reward models, or a language model judging with a rubric (LLM-as-a-judge).

A scorer maps (prompts, answers) to one score per answer, `None` where it has none. Two kinds:

- `RewardModels`: the mean reward of one or more sequence-classification models (a WARM soup
  is one folder) on `prompt + answer`, the text `alloy eval` scores preference pairs on. Models
  load one at a time, so memory is that of the largest.
- `Judge`: a causal LM reads a prompt built from a template holding `{prompt}` and `{response}`
  (by default the additive 5-point rubric of self-rewarding language models, Yuan et al. 2024,
  https://arxiv.org/abs/2401.10020, in alloy's words: `judge_prompt.txt`). In `generate` mode it
  writes its judgement `samples` times (sampled), the last "Score: N" of each is read, and the
  readable ones are averaged, as the paper does; an answer with none readable gets `None`. In
  `expected` mode it is asked for the score directly ("Score:" is appended) and the score is the
  mean of 0..5 under its next-token distribution restricted to the digit tokens: deterministic,
  never unreadable, and graded where a small model's written scores are mostly noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

POINTS = 5
_SCORE = re.compile(r"score\s*(?:[:=]|is)?\s*\**\s*([0-5](?:\.\d+)?)(?![\d.])", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


class AnswerScorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float | None]: ...


def render(template: str, prompt: str, response: str) -> str:
    """`template` with {prompt} and {response} replaced in one pass (so braces inside the
    prompt or answer are left as they are)."""
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_score(text: str) -> float | None:
    """The last "Score: N" (N in 0..5) of a judgement, else None."""
    found = _SCORE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 0 <= value <= POINTS else None


def digit_token_ids(tokenizer: Any) -> list[list[int]]:
    """For each score 0..5, the single tokens that spell it (with or without a leading space).

    Raises:
        ValueError: when some digit has no single token.
    """
    out = []
    for digit in range(POINTS + 1):
        ids = set()
        for spelling in (str(digit), f" {digit}"):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for {digit}")
        out.append(sorted(ids))
    return out


def expected_score(scores: torch.Tensor, digits: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) next-token logits -> (B,) expected score: each score's probability is the mass of
    its spellings, renormalised over the scores 0..5."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    per_score = torch.stack([torch.logsumexp(logprobs[:, list(ids)], dim=-1) for ids in digits])
    weights = torch.softmax(per_score, dim=0)  # (6, B)
    values = torch.arange(len(digits), dtype=weights.dtype)[:, None]
    return (weights * values).sum(dim=0)


class RewardModels:
    """The mean reward of reward-model folders (or BASE+ADAPTER) on prompt + answer."""

    def __init__(
        self,
        models: Sequence[str],
        *,
        device: str = "cpu",
        batch_size: int = 8,
        say: Callable[[str], None] = print,
    ) -> None:
        self.models = list(models)
        self.device = device
        self.batch_size = batch_size
        self.say = say
        self.name = "mean reward" if len(self.models) > 1 else f"reward of {self.models[0]}"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float | None]:
        return list(self.per_model(prompts, answers).mean(dim=0).tolist())

    def per_model(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """(M, N) rewards, one row per model."""
        from alloy.eval.choice import reward_scores
        from alloy.eval.scorer import load_scorer

        texts = [p + a for p, a in zip(prompts, answers, strict=True)]
        rows = []
        for path in self.models:
            scorer = load_scorer(path, device=self.device)
            rows.append(torch.tensor(reward_scores(scorer, texts, self.batch_size)))
            del scorer
        return torch.stack(rows)


class Judge:
    """A causal LM (a folder, or BASE+ADAPTER) scoring answers with a rubric prompt."""

    def __init__(
        self,
        model: str,
        prompt: str,
        *,
        mode: str = "generate",
        samples: int = 3,
        max_new_tokens: int = 96,
        temperature: float = 0.7,
        template: str | None = None,
        batch_size: int = 8,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if mode not in ("generate", "expected"):
            raise ValueError(f"unknown judge mode {mode!r}")
        self.model = model
        self.prompt = prompt
        self.mode = mode
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.template = template
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.name = f"judge {model} ({mode})"
        self.unreadable = 0  # judgements with no readable score, over all calls (generate)
        self.judgements = 0

    def score(
        self, prompts: Sequence[str], answers: Sequence[str], *, ensemble: Any = None
    ) -> list[float | None]:
        """One score per answer; `ensemble` is the judge already loaded (the policy that just
        sampled, when it judges itself), else the model is loaded here."""
        texts = [render(self.prompt, p, a) for p, a in zip(prompts, answers, strict=True)]
        if ensemble is None:
            ensemble = load_policy(self.model, self.template, self.device)
        if self.mode == "expected":
            return list(self._expected(ensemble, texts))
        return self._generated(ensemble, texts)

    def _expected(self, ensemble: Any, texts: Sequence[str]) -> list[float]:
        member = ensemble.members[0]
        tokenizer = member.tokenizer
        digits = digit_token_ids(tokenizer)
        cue = tokenizer("Score:", add_special_tokens=False)["input_ids"]
        limit = member.max_length - 1
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            rows = []
            for text in texts[i : i + self.batch_size]:
                if self.template == "chat":
                    ids = member.encode_prompt(text) + list(cue)
                else:
                    ids = member.encode_prompt(text + "\n\nScore:")
                rows.append(ids[-limit:])  # too long: the rubric's start is cut, not the answer
            with torch.inference_mode():
                scores, _ = member.prefill(rows)
            out += expected_score(scores.cpu(), digits).tolist()
        return out

    def _generated(self, ensemble: Any, texts: Sequence[str]) -> list[float | None]:
        repeated = [t for t in texts for _ in range(self.samples)]
        generations = ensemble.generate(
            repeated,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.samples > 1,
            temperature=self.temperature if self.samples > 1 else None,
            seed=self.seed,
        )
        out: list[float | None] = []
        for i in range(len(texts)):
            parsed = [
                parse_score(g.text) for g in generations[i * self.samples : (i + 1) * self.samples]
            ]
            readable = [s for s in parsed if s is not None]
            self.judgements += len(parsed)
            self.unreadable += len(parsed) - len(readable)
            out.append(sum(readable) / len(readable) if readable else None)
        return out


def load_policy(model: str, template: str | None, device: str) -> Any:
    """A model (folder or BASE+ADAPTER) as a one-member `alloy.Ensemble` (batched, KV-cached
    sampling), prompted through `template`."""
    from alloy.ensemble import Ensemble

    options: dict[str, Any] = {} if template is None else {"template": template}
    return Ensemble.from_models([model], rule="linear", device=device, **options)


def finite_mean(values: Sequence[float | None]) -> float:
    """Mean of the values that exist and are finite; NaN if none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def judge_prompt_text(path: str | None) -> str:
    from alloy.improve.recipe import DEFAULT_JUDGE_PROMPT

    return Path(path or DEFAULT_JUDGE_PROMPT).read_text(encoding="utf-8")
