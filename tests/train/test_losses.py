"""Distillation and preference losses: hand-derived goldens, properties, parity."""

from __future__ import annotations

import math

import pytest
import torch

from alloy.train.losses import (
    SparseTeacher,
    cross_entropy,
    distillation_divergence,
    distillation_loss,
    preference_loss,
    reward_metrics,
    sequence_logprobs,
    shift_for_next_token,
)

STUDENT = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
TEACHER = torch.log(torch.tensor([[0.75, 0.25]]))  # p = (3/4, 1/4)


def test_forward_kl_golden() -> None:
    """KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812."""
    got = distillation_divergence(STUDENT, TEACHER, kind="forward_kl")
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert got.item() == pytest.approx(0.130812, abs=1e-6)


def test_reverse_kl_golden() -> None:
    """KL(q||p) = 1/2 ln(2/3) + 1/2 ln 2 = 0.143841."""
    got = distillation_divergence(STUDENT, TEACHER, kind="reverse_kl")
    assert got.item() == pytest.approx(0.143841, abs=1e-6)


def test_jsd_golden() -> None:
    """m = (5/8, 3/8); KL(p||m) = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.035375; KL(q||m) = 1/2 ln(4/5)
    + 1/2 ln(4/3) = 0.032269; JSD(1/2) = (0.035375 + 0.032269) / 2 = 0.033822."""
    got = distillation_divergence(STUDENT, TEACHER, kind="jsd", beta=0.5)
    assert got.item() == pytest.approx(0.033822, abs=1e-6)


def test_temperature_softens_both_and_scales_by_t_squared() -> None:
    """Teacher logits (ln 3, 0) at T = 2: p = (sqrt3, 1) / (sqrt3 + 1) = (0.633975, 0.366025);
    student (0, 0): q = (1/2, 1/2). KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) =
    0.633975 * 0.237401 - 0.366025 * 0.311905 = 0.036341, times T^2 = 4: 0.145363."""
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    got = distillation_divergence(STUDENT, teacher, kind="forward_kl", temperature=2.0)
    assert got.item() == pytest.approx(0.145363, abs=1e-6)


def test_sparse_teacher_goldens() -> None:
    """Top-1 teacher: p = (1, 0). Forward KL = ln 2. JSD(1/2): m = (3/4, 1/4), 1/2 ln(4/3) +
    1/2 (1/2 ln(2/3) + 1/2 ln 2) = 0.215762, the same from the top-k formula (token 1, outside
    the top k, adds q(1) (1 - beta) (-ln(1 - beta)) = 1/4 ln 2)."""
    sparse = SparseTeacher(torch.log(torch.tensor([[0.75]])), torch.tensor([[0]]))
    assert distillation_divergence(STUDENT, sparse, kind="forward_kl").item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    assert distillation_divergence(STUDENT, sparse, kind="jsd").item() == pytest.approx(
        0.215762, abs=1e-6
    )
    with pytest.raises(ValueError, match="full distribution"):
        distillation_divergence(STUDENT, sparse, kind="reverse_kl")


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_sparse_equals_dense_on_the_truncated_teacher(kind: str) -> None:
    """The top-k teacher is the dense teacher renormalised over its k tokens: equal losses (and
    with k = V, equal to the dense loss itself)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 11, generator=g)
    teacher = torch.log_softmax(torch.randn(6, 11, generator=g) * 2, dim=-1)
    for k in (3, 11):
        top = teacher.topk(k, dim=-1)
        truncated = torch.full_like(teacher, -math.inf).scatter(-1, top.indices, top.values)
        dense = distillation_divergence(student, truncated, kind=kind, temperature=1.5)  # type: ignore[arg-type]
        sparse = distillation_divergence(
            student,
            SparseTeacher(top.values, top.indices),
            kind=kind,
            temperature=1.5,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_properties(kind: str) -> None:
    """Zero when the student is the teacher (up to a constant shift of logits), positive
    otherwise; the gradient vanishes at the teacher."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(5, 7, generator=g)
    same = (teacher + 3.0).requires_grad_(True)
    loss = distillation_divergence(same, teacher, kind=kind, temperature=2.0)  # type: ignore[arg-type]
    assert loss.abs().max().item() < 1e-6
    loss.sum().backward()
    assert same.grad is not None and same.grad.abs().max().item() < 1e-6
    other = torch.randn(5, 7, generator=g)
    assert (distillation_divergence(other, teacher, kind=kind) > 0).all()  # type: ignore[arg-type]


def test_mixture_with_cross_entropy() -> None:
    """alpha = 0.25: 0.25 KL + 0.75 CE; CE of target 0 under q = (1/2, 1/2) is ln 2."""
    loss, kd, ce = distillation_loss(STUDENT, torch.tensor([0]), TEACHER, alpha=0.25)
    assert ce.item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(0.25 * 0.130812 + 0.75 * math.log(2), abs=1e-6)
    assert kd.item() == pytest.approx(0.130812, abs=1e-6)


def test_cross_entropy_and_shift_match_transformers() -> None:
    """The causal shift and CE equal transformers' own causal-LM loss on masked labels."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :3] = -100
    picked, targets, mask = shift_for_next_token(logits, labels)
    ours = cross_entropy(picked, targets).mean()
    theirs = ForCausalLMLoss(logits, labels, vocab_size=9)
    torch.testing.assert_close(ours, theirs)
    assert mask.sum().item() == 10 - 2  # 5 + 5 predictions, two of row 0's targets masked


def test_parity_with_trl_gkd() -> None:
    """TRL's GKD loss (the peer implementation, when TRL is installed: `pip install .[parity]`):
    its beta 0 and 1 are forward and reverse KL, in between the generalised JSD. TRL does not
    multiply by T^2, so ours is divided by it here."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 10, generator=g)
    teacher = torch.randn(4, 10, generator=g)
    cases = [(0.0, "forward_kl"), (0.1, "jsd"), (0.5, "jsd"), (0.9, "jsd"), (1.0, "reverse_kl")]
    for beta, kind in cases:
        theirs = gkd.GKDTrainer.generalized_jsd_loss(
            student[None], teacher[None], beta=beta, temperature=2.0, reduction="none"
        ).sum(-1)[0]
        ours = distillation_divergence(
            student,
            teacher,
            kind=kind,
            beta=beta if kind == "jsd" else 0.5,
            temperature=2.0,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(ours / 4.0, theirs, atol=1e-5, rtol=1e-5)


# ---- preference losses ---------------------------------------------------------------------


def _pair(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([v]) for v in values]


def test_dpo_is_log_2_when_the_policy_is_the_reference() -> None:
    """h = 0: -log σ(0) = log 2 for sigmoid at any β and any ε; IPO's (0 - 1/(2β))² = 1/(4β²)."""
    logps = _pair(-3.0, -5.0, -3.0, -5.0)
    for beta in (0.1, 1.0):
        for eps in (0.0, 0.2):
            loss, chosen, rejected = preference_loss(*logps, beta=beta, label_smoothing=eps)
            assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
            assert chosen.item() == rejected.item() == 0.0
    loss, _, _ = preference_loss(*logps, beta=0.5, loss="ipo")
    assert loss.item() == pytest.approx(1.0, abs=1e-7)


def test_dpo_goldens() -> None:
    """π_c = -1, π_r = -4, r_c = -2, r_r = -3: h = (-1 + 2) - (-4 + 3) = 2.
    β = 0.5: βh = 1, -log σ(1) = log(1 + e^-1) = 0.313262; rewards β(π - r) = 0.5 and -0.5.
    ε = 0.25: 0.75 · 0.313262 + 0.25 · log(1 + e) = 0.234946 + 0.25 · 1.313262 = 0.563262.
    IPO at β = 0.5: (2 - 1)² = 1; at β = 0.25: (2 - 2)² = 0."""
    logps = _pair(-1.0, -4.0, -2.0, -3.0)
    loss, chosen, rejected = preference_loss(*logps, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    smoothed, _, _ = preference_loss(*logps, beta=0.5, label_smoothing=0.25)
    assert smoothed.item() == pytest.approx(0.563262, abs=1e-6)
    assert preference_loss(*logps, beta=0.5, loss="ipo")[0].item() == pytest.approx(1.0)
    assert preference_loss(*logps, beta=0.25, loss="ipo")[0].item() == pytest.approx(0.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    """d/dπ_c of -log σ(β h) = -β σ(-β h) < 0 (descent raises π_c); d/dπ_r = +β σ(-β h) > 0.
    At h = 0, β = 0.5: ∓0.25. The reference gets no gradient from the policy's loss terms."""
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = preference_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-5.0]), beta=0.5)
    loss.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)
    # IPO past its target margin (h > 1/(2β)) pushes back: the gradient flips sign
    pc.grad = pr.grad = None
    loss, _, _ = preference_loss(pc, pr, torch.tensor([-6.0]), torch.tensor([-2.0]), loss="ipo")
    loss.sum().backward()
    assert pc.grad.item() > 0 > pr.grad.item()  # h = 6 > 5


def test_reward_metrics_sum_over_pairs() -> None:
    chosen, rejected = torch.tensor([0.5, -0.1, 0.2]), torch.tensor([-0.5, 0.3, 0.2])
    got = reward_metrics(chosen, rejected)
    assert got["rewards/margin"].item() == pytest.approx(1.0 - 0.4 + 0.0)
    assert got["rewards/accuracy"].item() == 1.0  # a tie is not a win
    assert got["rewards/chosen"].item() == pytest.approx(0.6)


def test_sequence_logprobs_sum_and_mean_over_scored_tokens() -> None:
    """Two-token vocabulary, logits (0, 0) everywhere: every scored token has log-prob -log 2.
    Row 0 scores 3 tokens (sum -3 log 2, mean -log 2); row 1 scores none (0)."""
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[1, 0, 1, -100], [-100, -100, -100, -100]])
    total = sequence_logprobs(logits, labels)
    mean = sequence_logprobs(logits, labels, average=True)
    torch.testing.assert_close(total, torch.tensor([-3 * math.log(2), 0.0]))
    torch.testing.assert_close(mean, torch.tensor([-math.log(2), 0.0]))
