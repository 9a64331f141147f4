"""SparseMoE against its eager reference and against transformers' Mixtral block; losses and
capacity goldens."""

from __future__ import annotations

import pytest
import torch

from alloy.moe import SparseMoE


def layer(**options: object) -> SparseMoE:
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, 4, **options)  # type: ignore[arg-type]
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    return moe.eval()


@pytest.mark.parametrize("routing", ["topk", "switch"])
def test_equals_eager_reference(routing: str) -> None:
    moe = layer(routing=routing, top_k=2)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(x), moe.reference_forward(x), rtol=1e-5, atol=1e-6)


def test_equals_transformers_mixtral_block() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(config).eval()
    moe = layer(top_k=2)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.gate_up_proj)
        block.experts.down_proj.copy_(moe.down_proj)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)


def test_gradients_match_the_reference() -> None:
    moe = layer(top_k=2)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    for forward in (moe, moe.reference_forward):
        moe.zero_grad()
        forward(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in moe.parameters()])  # type: ignore[union-attr]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_load_balancing_loss_is_alpha_at_uniform_routing_and_grows_when_collapsed() -> None:
    """Balanced: token t goes to expert t mod E with probability ~1, so f_i = P_i = 1/E and the
    loss is alpha * E * E * (1/E)(1/E) = alpha. Collapsed: every token to expert 0 with
    probability ~1: f_0 = P_0 = 1, the loss is alpha * E = 4 alpha."""
    moe = layer(routing="switch", aux_loss_coef=0.01)
    eye = torch.eye(4, 16) * 50.0  # token t's input = e_(t mod 4): router favours expert t mod 4
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 16))
    x = eye.repeat(3, 1)  # 12 tokens, 3 per expert, probabilities ~one-hot
    moe(x)
    assert moe.losses["load_balancing"].item() == pytest.approx(0.01, rel=1e-4)
    moe(torch.zeros(12, 16) + eye[0])  # every token to expert 0
    assert moe.losses["load_balancing"].item() == pytest.approx(0.04, rel=1e-4)


def test_z_loss_golden() -> None:
    """Zero router: logits 0, logsumexp = log E -> beta * log(4)^2."""
    moe = layer(z_loss_coef=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(5, 16))
    assert moe.losses["z"].item() == pytest.approx(0.5 * torch.log(torch.tensor(4.0)).item() ** 2)


def test_capacity_drops_the_late_tokens() -> None:
    """8 tokens all routed to expert 0, capacity_factor 1 -> C = ceil(8/4) = 2: tokens 0 and 1
    are processed, tokens 2..7 output zero."""
    moe = layer(routing="switch", capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 16) * 10)
    x = torch.zeros(8, 16)
    x[:, 0] = 1.0
    x[:, 5] = torch.arange(8.0)  # distinct tokens
    out = moe(x)
    assert out[:2].abs().sum(-1).gt(0).all()
    assert torch.equal(out[2:], torch.zeros(6, 16))
    torch.testing.assert_close(out, moe.reference_forward(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_equals_training_path(dtype: torch.dtype) -> None:
    moe = layer(top_k=2).to(dtype)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        fast = moe(x)  # the in-place branch
    torch.testing.assert_close(fast, moe(x).detach(), rtol=0, atol=0)
