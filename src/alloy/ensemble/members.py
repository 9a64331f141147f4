"""Ensemble members: a model with its device, prompt template, vocabulary slice and KV cache.

A member turns rows of token ids into next-token scores (logits, or log-probabilities for a
dropout member), which the rule normalises. In decoding it keeps its own
`DecodeState` (cache, attention mask, next position) so that members with different prompt
templates, and therefore different prompt lengths, decode the same continuation side by side.
A dropout member (`samples > 1`) runs its rows `samples` times in one batch with dropout active and
pools the samples, so a dropout ensemble costs one forward per step, not `samples`.

Shapes: B rows, S samples of a dropout member, T tokens, V shared vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alloy.ensemble.layers import EarlyExits
from alloy.errors import IncompatibleModelsError, Problem
from alloy.eval.scorer import load_pretrained, start_ids

PoolRule = Literal["linear", "log_linear"]


@dataclass(frozen=True)
class MemberSpec:
    """How to load and prompt one member (a recipe's `members` entry)."""

    model: str
    name: str | None = None
    role: str | None = None
    weight: float | None = None
    template: str | None = None  # "{prompt}" is replaced by the prompt; "chat": chat template
    filters: dict[str, float] = field(default_factory=dict)
    samples: int = 1  # > 1: a dropout ensemble of this model
    pool: PoolRule = "linear"  # how a dropout member pools its samples
    dropout: float | None = None  # overrides the config's dropout probabilities
    device: str | None = None
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return self.name or self.role or self.model


@dataclass
class DecodeState:
    cache: Any  # a transformers Cache
    mask: torch.Tensor  # (S*B, L) 1 for real tokens, 0 for left padding
    position: torch.Tensor  # (S*B, 1) position id of the next token


class Member:
    """A loaded member; build with `load_member`."""

    def __init__(self, spec: MemberSpec, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.vocab = len(tokenizer)  # logits beyond this are embedding padding, sliced off
        self.name = spec.label
        self.exits: EarlyExits | None = None  # DoLa: scores of early layers too (layers.py)

    def use_exits(self, layers: tuple[int, ...]) -> None:
        """From now on score the final layer and the early exits `layers`: every score tensor
        gains an exit axis before V (final layer first), which `Ensemble.combine` splits."""
        self.exits = EarlyExits(self.model, layers, self.vocab)

    def _scores(self, out: Any, last: bool) -> torch.Tensor:
        """A forward's output -> (S*B, [T,] V') logits, or (S*B, [T,] 1 + E, V) with exits."""
        logits = out.logits[:, -1] if last else out.logits
        if self.exits is None:
            return logits
        return self.exits.logits(logits, out.hidden_states)

    @property
    def max_length(self) -> int:
        config = self.model.config
        return int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 1024
        )

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of `prompt` under this member's template, starting with BOS as in eval."""
        template = self.spec.template
        if template == "chat":
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = prompt if template is None else template.replace("{prompt}", prompt)
        return start_ids(self.tokenizer) + list(
            self.tokenizer(text, add_special_tokens=False)["input_ids"]
        )

    def _pool(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """(S*B, ..., V') logits -> (B, ..., V) fp32 scores for the rule, which normalises them:
        a plain member's logits as they are (normalising here too would be a second pass); a
        dropout member's samples pooled into log-probabilities (linear: mean of probabilities;
        log_linear: normalised mean of log-probabilities)."""
        scores = logits[..., : self.vocab].float()
        if self.spec.samples == 1:
            return scores
        logprobs = torch.log_softmax(scores, dim=-1)
        samples = logprobs.view(self.spec.samples, rows, *logprobs.shape[1:])  # (S, B, ..., V)
        if self.spec.pool == "log_linear":
            return torch.log_softmax(samples.mean(dim=0), dim=-1)
        return torch.logsumexp(samples, dim=0) - torch.log(torch.tensor(float(self.spec.samples)))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, DecodeState]:
        """Left-pad `prompts`, run them through the model once; return (B, V) next-token scores
        (see `_pool`) and the state."""
        from transformers import DynamicCache

        rows, width = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        ids = torch.full((rows, width), pad, dtype=torch.long)  # (B, L)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt) :] = torch.tensor(prompt)
            mask[b, width - len(prompt) :] = 1
        samples = self.spec.samples
        ids, mask = ids.repeat(samples, 1).to(self.device), mask.repeat(samples, 1).to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # (S*B, L), as transformers' generate
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            **cache_argument(self.model, cache),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.exits is not None,
        )
        state = DecodeState(output_cache(out), mask, position[:, -1:] + 1)
        return self._pool(self._scores(out, last=True), rows), state

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next (B, V) scores. Updates `state`."""
        rows = tokens.shape[0]
        ids = tokens.to(self.device)[:, None]  # (B, 1)
        if self.spec.samples > 1:
            ids = ids.repeat(self.spec.samples, 1)  # (S*B, 1)
        state.mask = torch.cat([state.mask, state.mask.new_ones((state.mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=state.mask,
            position_ids=state.position,
            **cache_argument(self.model, state.cache),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.exits is not None,
        )
        state.cache = output_cache(out)
        state.position = state.position + 1
        return self._pool(self._scores(out, last=True), rows)

    def keep_rows(self, state: DecodeState, keep: torch.Tensor, rows: int) -> None:
        """Drop finished rows: keep only `keep` (indices into the current B = `rows` rows)."""
        keep = keep.to(self.device)
        index = torch.cat([keep + s * rows for s in range(self.spec.samples)])
        state.cache.batch_select_indices(index)
        state.mask = state.mask[index]
        state.position = state.position[index]

    @torch.inference_mode()
    def sequence_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) right-padded ids -> (B, T, V) fp32 scores of the token after each position
        ((B, T, 1 + E, V) with early exits).

        `position_ids` (restarting per packed document) may replace or join the mask."""
        samples = self.spec.samples
        inputs: dict[str, Any] = {"input_ids": input_ids.to(self.device).repeat(samples, 1)}
        for key, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None:
                inputs[key] = value.to(self.device).repeat(samples, 1)  # (S*B, T)
        out = self.model(**inputs, use_cache=False, output_hidden_states=self.exits is not None)
        return self._pool(self._scores(out, last=False), input_ids.shape[0])


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword of `model`'s forward: `cache` in the transformers releases that
    renamed it (5.2x; `past_key_values` then warns of its removal), `past_key_values` before."""
    forward = type(model).forward
    names = _FORWARD_PARAMETERS.get(forward)
    if names is None:
        names = _FORWARD_PARAMETERS[forward] = frozenset(inspect.signature(forward).parameters)
    return {"cache" if "cache" in names else "past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name (see `cache_argument`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


_FORWARD_PARAMETERS: dict[Any, frozenset[str]] = {}


def load_member(
    spec: MemberSpec,
    *,
    device: str = "cpu",
    allow_pickle: bool = False,
    loaded: dict[tuple[Any, ...], Any] | None = None,
) -> Member:
    """Load `spec`'s model and tokenizer. `loaded` shares one model between members that name the
    same folder, dtype, device and dropout settings (K copies of one model cost one model's
    memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.model)
    where = torch.device(spec.device or device)
    # A dropout member puts its model in training mode, so it never shares with a plain one.
    key = (str(folder.resolve()), spec.dtype, str(where), spec.dropout, spec.samples > 1)
    if loaded is not None and key in loaded:
        model, tokenizer = loaded[key]
        return Member(spec, model, tokenizer, where)
    what = f"ensemble member {spec.label}"
    config = load_pretrained(folder, AutoConfig, what)
    if spec.dropout is not None:
        _set_dropout(config, spec.dropout)
    dtype = getattr(torch, spec.dtype)
    model = load_pretrained(
        folder,
        AutoModelForCausalLM,
        what,
        config=config,
        dtype=dtype,
        use_safetensors=not allow_pickle,
    )
    tokenizer = load_pretrained(folder, AutoTokenizer, what)
    # Dropout is active only in training mode; a dropout member is sampled with it on.
    model.train(spec.samples > 1)
    model.to(where)
    if loaded is not None:
        loaded[key] = (model, tokenizer)
    return Member(spec, model, tokenizer, where)


def _set_dropout(config: Any, p: float) -> None:
    """Set every dropout probability the config declares (names vary by architecture)."""
    names = [
        name
        for name, value in vars(config).items()
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop"))
    ]
    for name in names:
        setattr(config, name, p)


def check_vocabularies(members: list[Member]) -> int:
    """The vocabulary size all members share; raise if their token ids do not mean the same.

    A model whose output layer has more rows than its tokenizer has tokens (embeddings padded to a
    multiple of 64, say) is fine: the extra rows are sliced off. Different tokenizers are refused,
    showing the first ids that differ.
    """
    problems = []
    for m in members:
        rows = m.model.get_output_embeddings().weight.shape[0]
        if rows < m.vocab:
            problems.append(
                Problem(
                    m.name,
                    f"the model scores {rows} tokens but its tokenizer has {m.vocab}",
                    "the checkpoint and tokenizer do not belong together",
                )
            )
    first = members[0]
    tokens = first.tokenizer.convert_ids_to_tokens(list(range(first.vocab)))
    for m in members[1:]:
        if m.tokenizer is first.tokenizer:
            continue
        other = m.tokenizer.convert_ids_to_tokens(list(range(m.vocab)))
        differ = [i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b]
        if differ or len(other) != len(tokens):
            shown = ", ".join(f"id {i}: {tokens[i]!r} vs {other[i]!r}" for i in differ[:3])
            sizes = f"{first.vocab} vs {m.vocab} tokens" + (f"; {shown}" if shown else "")
            problems.append(
                Problem(
                    f"{first.name} / {m.name}",
                    f"tokenizers differ ({sizes})",
                    "members must share token ids; use models of one family",
                )
            )
    if problems:
        raise IncompatibleModelsError("ensemble members cannot be combined", problems)
    return first.vocab
