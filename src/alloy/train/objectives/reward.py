"""`reward`: a Bradley-Terry reward model trained on prompt / chosen / rejected pairs.

The model is a `...ForSequenceClassification` with one label: the recipe's causal LM body with
a freshly initialised (seeded) score head, or a folder that already is such a reward model. It
reads a sequence's reward at its last non-pad token, so the pad id is set in the config (and
in the tokenizer, from EOS, when it has none, as TRL does): with pad = EOS the appended EOS of
a string pair counts as padding and the reward sits on the answer's last token, as
`alloy eval` scores `prompt + answer`. Both answers of every pair of a micro batch are scored in
one (2B, T) forward pass (packing.Collator.pairs), and losses.reward_loss turns the two rewards
into -log σ(r_c - r_r - m) + η (r_c + r_r)² (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155; the margin m from Llama 2, https://arxiv.org/abs/2307.09288).
The data, its checks and its truncation are dpo's (pairs.py); the saved folder loads with
`AutoModelForSequenceClassification` and alloy's reward scorer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from alloy.errors import InputError, Problem
from alloy.train.losses import reward_loss, reward_metrics
from alloy.train.objectives.base import (
    LossParts,
    Objective,
    ObjectiveContext,
    model_inputs,
    objective,
)


def pair_rewards(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) rewards of a pair batch's sequences: the B chosen, then the B rejected."""
    return model(**model_inputs(batch)).logits[:, 0].float()  # (2B, 1) -> (2B,)


class Reward:
    def __init__(self, center: float) -> None:
        self.center = center  # η of the centring term

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> LossParts:
        rewards = pair_rewards(model, batch)  # (2B,)
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        margins = batch.get("margins")
        losses = reward_loss(chosen, rejected, margin=margins, center=self.center)  # (B,)
        metrics = reward_metrics(chosen.detach(), rejected.detach())
        return LossParts(losses.sum(), batch["pairs"].sum(), metrics)


def set_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad id, set to EOS when it has none (the reward is read at the last
    non-pad token, so padding must be recognisable).

    Raises:
        InputError: a tokenizer with neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InputError(
                "cannot train a reward model",
                [Problem("model", "the tokenizer has no pad and no EOS token", "add a pad token")],
            )
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def is_reward_config(config: Any) -> bool:
    architecture = str((getattr(config, "architectures", None) or [""])[0])
    return architecture.endswith("ForSequenceClassification")


def reward_config(config: Any, pad_id: int) -> Any:
    """A copy of `config` for a one-score sequence classifier padded with `pad_id`."""
    config = copy.deepcopy(config)
    if not is_reward_config(config):
        config.num_labels = 1
    config.pad_token_id = pad_id
    return config


def load_reward_model(model: Any, config: Any, tokenizer: Any, *, seed: int) -> Any:
    """The reward model to train: `model` (the recipe's ModelEntry) as a one-score sequence
    classifier in float32, its score head (when new) initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from alloy.eval.scorer import load_pretrained

    config = reward_config(config, set_pad_token(tokenizer))
    torch.manual_seed(seed)
    if model.path is None:
        reward = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "score.weight newly initialized": it is meant to be
        try:
            reward = load_pretrained(
                Path(model.path),
                AutoModelForSequenceClassification,
                "model",
                config=config,
                dtype=torch.float32,
            )
        finally:
            logging.set_verbosity(verbosity)
    # Set now, not only when saved: the training evals read it to score by reward.
    reward.config.architectures = [type(reward).__name__]
    return reward


def plan_reward_model(plan: Any) -> Any:
    """The reward model of a TrainPlan (see load_reward_model)."""
    spec = plan.recipe.spec
    return load_reward_model(spec.model, plan.config, plan.tokenizer, seed=spec.seed)


@objective(
    "reward",
    summary="a Bradley-Terry reward model (sequence classifier) on chosen/rejected pairs",
    reference="https://arxiv.org/abs/2203.02155",
    rows="pairs",
    load_model=plan_reward_model,
)
def build_reward(context: ObjectiveContext) -> Objective:
    from alloy.train.preference import settings

    set_pad_token(context.tokenizer)  # before the collator reads the pad id
    return Reward(float(settings(context.recipe.spec).center_rewards))
