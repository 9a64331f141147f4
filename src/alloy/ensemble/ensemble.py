"""`alloy.Ensemble`: members + rule, usable to generate and, as an eval `Scorer`, to score text.

Scoring runs each member once over the whole text (no cache needed) and applies the same member
filters and rule as decoding at every position, so `alloy eval` compares an ensemble with its
members on identical windows. A truncating rule (dexperts, contrastive) or a truncating member
filter gives -inf to tokens outside its kept set: text that leaves it has infinite perplexity,
which is the honest answer for what that decoder can produce.

Shapes: K members, B rows, T tokens, V shared vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from alloy.ensemble.decoder import Generation, Sampling, decode
from alloy.ensemble.filters import apply_filters
from alloy.ensemble.members import Member, check_vocabularies, load_member
from alloy.ensemble.recipe import EnsembleRecipe, load_ensemble_recipe
from alloy.ensemble.rules import get_rule, parameter_problems
from alloy.errors import InputError, Problem


class Ensemble:
    """K loaded members combined by a rule.

    Build one with `Ensemble.from_recipe(path_or_mapping)` or
    `Ensemble.from_models([...], rule="log_linear", weights=[...])`.
    """

    def __init__(
        self,
        members: Sequence[Member],
        rule: str,
        *,
        params: Mapping[str, float] | None = None,
        sampling: Sampling | None = None,
        name: str | None = None,
        device: str | torch.device | None = None,
        layers: str | Sequence[int] | None = None,
    ) -> None:
        self.rule = get_rule(rule)
        problems = parameter_problems(self.rule, params or {})
        if problems:
            listing = "; ".join(f"{k}: {m}" + (f" ({h})" if h else "") for k, m, h in problems)
            raise InputError(f"ensemble rule {rule!r}: {listing}")
        self.members = list(members)
        self.params = {**self.rule.params, **(params or {})}
        self.sampling = sampling or Sampling()
        self.vocab = check_vocabularies(self.members)
        self.device = torch.device(device) if device is not None else self.members[0].device
        self.tokenizer = self.members[0].tokenizer
        self.max_length = min(m.max_length for m in self.members)
        self.name = name or f"{rule}({', '.join(m.name for m in self.members)})"
        self.layers: tuple[int, ...] = ()  # a layer rule's early exits
        if self.rule.layers:
            self.layers = _use_exits(self.rule.name, self.members, layers)
        elif layers is not None:
            raise InputError(f"layers are for rules that contrast layers (dola), not {rule}")
        if self.rule.weighted:
            weights = [m.spec.weight for m in self.members]
            uniform = 1.0 / len(self.members)
            self.weights = torch.tensor([uniform if w is None else w for w in weights])
        for m in self.members:
            if m.spec.samples > 1 and not _has_dropout(m.model):
                raise InputError(
                    f"member {m.name} samples {m.spec.samples} times but its model has no dropout",
                    [Problem(m.name, "every sample would be identical", "set dropout: 0.1")],
                )

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a generation (the first member's generation config, else its
        config, else its tokenizer)."""
        model = self.members[0].model
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}

    def combine(self, scores: Sequence[torch.Tensor]) -> torch.Tensor:
        """K members' (N, V) scores (logits or log-probs) -> (N, V) combined log-probs: member
        filters, then the rule (which normalises each member). A member with early exits gives
        (N, 1 + E, V): its final layer and each exit enter the rule as members of their own."""
        views = []  # one (N, V) per member, or per layer of a member with early exits
        for m, s in zip(self.members, scores, strict=True):
            s = s.to(self.device)  # members may sit on other devices
            for view in s.unbind(-2) if m.exits is not None else (s,):
                views.append(apply_filters(view, m.spec.filters) if m.spec.filters else view)
        stacked = torch.stack(views)  # (K, N, V)
        if self.rule.weighted:
            return self.rule.fn(stacked, weights=self.weights)
        return self.rule.fn(stacked, **self.params)

    @torch.inference_mode()
    def distribution(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) log-probabilities of the token after each position under the
        rule (what a distilled student learns from)."""
        per_member = [
            m.sequence_scores(input_ids, attention_mask, position_ids) for m in self.members
        ]
        return torch.stack(
            [self.combine([lp[b] for lp in per_member]) for b in range(input_ids.shape[0])]
        )

    @torch.inference_mode()
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The eval `Scorer` protocol: (B, T) -> (B, T) log p(ids[t] | ids[:t]) under the rule."""
        if self.layers and input_ids.shape[0] > 1:
            # Early exits hold (T, 1 + E, V) scores per row: score one row at a time.
            return torch.cat(
                [
                    self.token_logprobs(input_ids[b : b + 1], attention_mask[b : b + 1])
                    for b in range(input_ids.shape[0])
                ]
            )
        per_member = [m.sequence_scores(input_ids, attention_mask) for m in self.members]
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        targets = input_ids[:, 1:].to(self.device)
        for b in range(input_ids.shape[0]):  # (T, V) per member at a time keeps memory small
            combined = self.combine([lp[b, :-1] for lp in per_member])  # (T-1, V)
            out[b, 1:] = combined.gather(-1, targets[b, :, None]).squeeze(-1).cpu()
        return out

    def generate(
        self,
        prompts: Sequence[str],
        *,
        batch_size: int = 8,
        on_token: Callable[[int], None] | None = None,
        **sampling: Any,
    ) -> list[Generation]:
        """Continue `prompts` (in batches of `batch_size`). Keyword arguments override fields of
        the recipe's sampling (max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
        seed, stop, ignore_eos); batch i samples with seed + i."""
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = (sampling["stop"],)
        elif "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"])
        settings = replace(self.sampling, **sampling)
        out: list[Generation] = []
        for i in range(0, len(prompts), batch_size):
            batch_settings = replace(settings, seed=settings.seed + i // batch_size)
            out += decode(self, list(prompts[i : i + batch_size]), batch_settings, on_token)
        return out

    @classmethod
    def from_recipe(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any] | EnsembleRecipe,
        *,
        device: str | None = None,
        allow_pickle: bool = False,
    ) -> Ensemble:
        """Check a recipe (every member folder included), then load the members."""
        recipe = source if isinstance(source, EnsembleRecipe) else load_ensemble_recipe(source)
        specs = recipe.member_specs()
        default = device or recipe.device or "cpu"
        loaded: dict[tuple[Any, ...], Any] = {}
        members = [
            load_member(s, device=default, allow_pickle=allow_pickle, loaded=loaded) for s in specs
        ]
        return cls(
            members,
            recipe.rule,
            params=recipe.rule_parameters(),
            sampling=recipe.to_sampling(),
            name=recipe.name,
            device=device or recipe.device,
            layers=recipe.layers,
        )

    @classmethod
    def from_models(
        cls,
        models: Sequence[str | os.PathLike[str]],
        rule: str = "log_linear",
        *,
        weights: Sequence[float] | None = None,
        roles: Sequence[str] | None = None,
        parameters: Mapping[str, float] | None = None,
        device: str | None = None,
        **member_options: Any,
    ) -> Ensemble:
        """An ensemble of model folders; `member_options` (template, filters, samples, dropout,
        dtype, ...) apply to every member."""
        members = []
        for i, model in enumerate(models):
            entry: dict[str, Any] = {"model": str(model), **member_options}
            if weights is not None:
                entry["weight"] = weights[i]
            if roles is not None:
                entry["role"] = roles[i]
            members.append(entry)
        recipe = {"rule": rule, "members": members, "parameters": dict(parameters or {})}
        return cls.from_recipe(recipe, device=device)


def _use_exits(
    rule: str, members: Sequence[Member], layers: str | Sequence[int] | None
) -> tuple[int, ...]:
    """Resolve a layer rule's candidate layers on its one member and switch its exits on."""
    from alloy.ensemble.layers import candidate_layers, parse_layers

    if len(members) != 1:
        raise InputError(f"{rule} contrasts the layers of one model; got {len(members)} members")
    member = members[0]
    try:
        wanted = parse_layers("high" if layers is None else layers)
    except ValueError as error:
        raise InputError(f"layers: {error}") from None
    model = member.model
    config = model.config.get_text_config()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    chosen = candidate_layers(wanted, int(config.num_hidden_layers), tied)
    member.use_exits(chosen)
    return chosen


def _has_dropout(model: Any) -> bool:
    config = model.config
    return any(
        isinstance(v, float) and v > 0 and ("dropout" in k or k.endswith("pdrop"))
        for k, v in vars(config).items()
    )
