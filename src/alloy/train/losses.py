"""Training losses: pure tensor functions, per token, for the objectives to sum and normalise.

Every function returns one loss per row of its (..., V) inputs (one per scored token),
unreduced, so an objective can mask, sum over a gradient-accumulation window and divide by the
number of tokens across processes (the exact token mean, whatever the padding and the batch
split). Inputs may have any leading dimensions: a batch's whole (B, T, V) logits need no copy.

Distillation divergences compare the teacher's distribution P with the student's Q, both
softened by a temperature τ (logits / τ), and are multiplied by τ² so that their gradients keep
the scale of the τ = 1 loss (Hinton et al. 2015, https://arxiv.org/abs/1503.02531):

- forward KL  KL(P || Q) = Σ P (log P - log Q)    (mass-covering; the classic KD loss)
- reverse KL  KL(Q || P) = Σ Q (log Q - log P)    (mode-seeking; MiniLLM, https://arxiv.org/abs/2306.08543)
- generalised JSD(β) = β KL(P || M) + (1 - β) KL(Q || M), M = β P + (1 - β) Q (GKD,
  https://arxiv.org/abs/2306.13649); β = 0.5 is the symmetric Jensen-Shannon divergence.

A teacher may be given sparsely, as its top-k log-probabilities and their token ids (a cache of
them is what makes several students cheap). P is then the teacher renormalised over its top k
tokens and zero elsewhere; forward KL and JSD against that P are computed exactly (JSD's terms
outside the top k reduce to Q's remaining mass times -log(1 - β)). Reverse KL needs P everywhere
Q is not zero and is refused with a sparse teacher.

Shapes: N tokens (any leading dimensions), V vocabulary, k teacher tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V) logits, (...) token ids -> (...) negative log-likelihood in nats (fp32)."""
    return _nll(torch.log_softmax(logits.float(), dim=-1), targets)


def _nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logprobs.gather(-1, targets[..., None]).squeeze(-1)


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal-LM alignment: (B, T, V) logits and (B, T) labels -> the (N, V) logits that predict
    a label, their (N,) targets, and the (B, T-1) mask they were selected with (position t
    predicts label t + 1; labels equal to `ignore_index` are not scored)."""
    mask = labels[:, 1:] != ignore_index  # (B, T-1)
    return logits[:, :-1][mask], labels[:, 1:][mask], mask


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-k log-probabilities at temperature 1 and their token ids, (N, k) each."""

    logprobs: torch.Tensor
    indices: torch.Tensor


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Σ p (log p - log q) over the last axis, with 0 log 0 = 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


def _forward_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) with P a constant (the teacher): Σ P log P, computed without autograd, minus
    Σ P log Q, the only term with a gradient. The same value as `_kl_terms(p_log, q_log)` with
    a fraction of the (N, V) temporaries in the graph (forward KL is the common case)."""
    with torch.no_grad():
        p = p_log.exp()
        negentropy = torch.where(p > 0, p * p_log, 0.0).sum(-1)
    return negentropy - (p * q_log).sum(-1)


def distillation_divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    *,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence between teacher and student at `temperature`, times temperature².

    Args:
        student_logits: (N, V) student logits.
        teacher: (N, V) teacher logits or log-probabilities (normalised here), or a
            `SparseTeacher` of (N, k) top-k log-probabilities and token ids.
        kind: forward_kl, reverse_kl or jsd (see the module docstring).
        temperature: τ > 0; both distributions are softened by it.
        beta: the JSD mixture weight of the teacher, in (0, 1).
    Returns:
        (N,) fp32 divergences, >= 0.
    """
    tau = float(temperature)
    q_log = torch.log_softmax(_soften(student_logits, tau), dim=-1)  # (N, V)
    return _divergence(q_log, teacher, kind, tau, beta)


def _soften(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """fp32 logits / τ, without the (N, V) copy at τ = 1 for fp32 logits."""
    logits = logits.float()
    return logits if tau == 1.0 else logits / tau


def _divergence(
    q_log: torch.Tensor, teacher: torch.Tensor | SparseTeacher, kind: str, tau: float, beta: float
) -> torch.Tensor:
    """`distillation_divergence` from the student's softened log-probabilities."""
    if isinstance(teacher, SparseTeacher):
        if kind == "reverse_kl":
            raise ValueError("reverse_kl needs the teacher's full distribution, not its top k")
        p_log = torch.log_softmax(_soften(teacher.logprobs, tau), dim=-1)  # (N, k) renormalised
        q_top = q_log.gather(-1, teacher.indices)  # (N, k)
        if kind == "forward_kl":
            return _forward_kl(p_log, q_top) * tau**2
        return _sparse_jsd(p_log, q_top, beta) * tau**2
    p_log = torch.log_softmax(_soften(teacher, tau), dim=-1)  # (N, V)
    if kind == "forward_kl":
        loss = _forward_kl(p_log, q_log)
    elif kind == "reverse_kl":
        loss = _kl_terms(q_log, p_log)
    else:
        m_log = _mixture(p_log, q_log, beta)
        loss = beta * _kl_terms(p_log, m_log) + (1 - beta) * _kl_terms(q_log, m_log)
    return loss * tau**2


def _mixture(p_log: torch.Tensor, q_log: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β P + (1 - β) Q), computed in log space."""
    both = torch.stack([p_log + math.log(beta), q_log + math.log(1 - beta)])
    return torch.logsumexp(both, dim=0)


def _sparse_jsd(p_log: torch.Tensor, q_top: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β) with P zero outside its top k: on the top k as usual; outside, M = (1 - β) Q, so
    Q's terms there add up to (1 - Q(top k)) (-log(1 - β)) and P's to nothing."""
    m_log = _mixture(p_log, q_top, beta)
    inside = beta * _kl_terms(p_log, m_log) + (1 - beta) * _kl_terms(q_top, m_log)
    outside_mass = (1 - q_top.exp().sum(-1)).clamp(min=0)
    return inside + (1 - beta) * outside_mass * -math.log(1 - beta)


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    *,
    alpha: float = 0.5,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * divergence + (1 - alpha) * cross-entropy on the real next tokens, per token.

    Returns (loss, divergence, cross_entropy), each (N,). alpha = 1 is pure distillation,
    alpha = 0 plain language modelling (the teacher is then not needed at all).
    """
    logprobs = torch.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    ce = _nll(logprobs, targets)
    tau = float(temperature)
    # at τ = 1 the divergence's softened student is the same log-softmax: computed once
    q_log = logprobs if tau == 1.0 else torch.log_softmax(_soften(student_logits, tau), dim=-1)
    kd = _divergence(q_log, teacher, kind, tau, beta)
    return alpha * kd + (1 - alpha) * ce, kd, ce


# ---- preference optimisation -----------------------------------------------------------------
#
# From per-sequence log-probabilities of the answers under the policy π and the frozen reference
# r, h = (π_c - r_c) - (π_r - r_r) is how much more the policy prefers the chosen answer than the
# reference does. Shapes: (B,) one value per preference pair.
#
# - sigmoid (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): -log σ(β h); with
#   label smoothing ε (conservative DPO, https://ericmitchell.ai/cdpo.pdf) the labels are taken
#   to be flipped with probability ε: -(1 - ε) log σ(β h) - ε log σ(-β h)
# - ipo (Azar et al. 2023, https://arxiv.org/abs/2310.12036): (h - 1 / (2 β))², on length-averaged
#   log-probabilities (as the paper and TRL do)
#
# The implicit rewards are β (π - r) of each answer; their margin is β h.

PreferenceLoss = Literal["sigmoid", "ipo"]
PREFERENCE_LOSSES: tuple[str, ...] = ("sigmoid", "ipo")


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """(B, T, V) logits and (B, T) labels already aligned with them (position t predicts
    labels[:, t]; -100 is not scored) -> (B,) fp32 sum of the scored tokens' log-probabilities,
    or their mean with `average` (0 for a row without scored tokens)."""
    mask = labels != -100  # (B, T)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    total = torch.where(mask, picked, 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss: PreferenceLoss = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / IPO loss and the implicit rewards (see the section comment above).

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: (B,) sequence
            log-probabilities (length-averaged for ipo; the caller decides).
        beta: β > 0, the strength of the pull towards the reference.
        loss: sigmoid or ipo.
        label_smoothing: ε in [0, 0.5), sigmoid only.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,) fp32; the rewards are detached.
    """
    policy = policy_chosen.float() - policy_rejected.float()
    reference = reference_chosen.float() - reference_rejected.float()
    h = policy - reference  # (B,)
    if loss == "sigmoid":
        logsig = torch.nn.functional.logsigmoid
        losses = -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    chosen = beta * (policy_chosen.float() - reference_chosen.float()).detach()
    rejected = beta * (policy_rejected.float() - reference_rejected.float()).detach()
    return losses, chosen, rejected


# ---- reward models (Bradley-Terry) -----------------------------------------------------------
#
# A reward model gives each answer one scalar r. Under the Bradley-Terry model (Bradley & Terry
# 1952; InstructGPT, https://arxiv.org/abs/2203.02155) P(chosen ≻ rejected) = σ(r_c - r_r), and
# the loss is its negative log-likelihood; Llama 2 (https://arxiv.org/abs/2307.09288) subtracts
# a per-pair margin m (how much better the chosen answer was rated): -log σ(r_c - r_r - m).
# With `center` η the auxiliary η (r_c + r_r)² keeps rewards centred on 0 (Eisenstein et al.
# 2023, https://arxiv.org/abs/2312.09244; TRL's center_rewards_coefficient). Shapes: (B,).


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center: float = 0.0,
) -> torch.Tensor:
    """(B,) Bradley-Terry loss per pair: -log σ(r_c - r_r - m) + η (r_c + r_r)².

    Args:
        chosen, rejected: (B,) rewards of each pair's answers.
        margin: (B,) per-pair margins m (none: 0).
        center: η ≥ 0, the weight of the centring term.
    Returns:
        (B,) fp32 losses (log 2 for a pair whose rewards are equal, without margin or centring).
    """
    difference = chosen.float() - rejected.float()
    if margin is not None:
        difference = difference - margin.float()
    losses = -torch.nn.functional.logsigmoid(difference)
    if center:
        losses = losses + center * (chosen.float() + rejected.float()) ** 2
    return losses


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """() sums over pairs of the implicit rewards, their margin and how often chosen wins."""
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margin": (chosen - rejected).sum(),
        "rewards/accuracy": (chosen > rejected).float().sum(),
    }
