"""`SparseMoE`: a drop-in sparse mixture-of-experts feed-forward layer.

Shape legend:
    T  tokens (batch x sequence, flattened)     H  hidden size
    E  experts                                  I  expert intermediate size
    K  experts per token (top-k)                C  capacity: tokens an expert takes at most

Routing (the router runs in fp32 whatever the layer's dtype):
    "topk"   (Mixtral, Jiang et al. 2024, https://arxiv.org/abs/2401.04088): softmax over the
             K largest router logits of each token; every token goes to its K experts.
    "switch" (Fedus et al. 2022, https://arxiv.org/abs/2101.03961): top-1, weighted by the full
             softmax probability of the chosen expert; with `capacity_factor` each expert takes
             at most C = ceil(capacity_factor * T / E) tokens, in token order, and the rest are
             dropped (their output is 0, so the residual connection carries them).

Losses, for the training loss (`layer.losses` after each forward):
    load balancing  alpha * E * sum_i f_i * P_i, f_i = share of the T*K assignments that went to
                    expert i, P_i = mean router probability of expert i (Switch eq. 4). It is
                    alpha at uniform routing for any K; transformers' Mixtral version counts
                    assignments per token and gives alpha * K.
    router z-loss   beta * mean_t logsumexp(logits_t)^2 (Zoph et al. 2022, ST-MoE).

Dispatch: the T*K (token, expert) assignments are sorted by expert, and the experts run as two
grouped matrix multiplies over contiguous segments (torch's grouped_mm where it has a kernel,
a loop over the segments otherwise). Expert weights use transformers' Mixtral layout,
gate_up_proj (E, 2I, H) and down_proj (E, H, I), so they copy over unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812  (the usual torch alias)
from torch import nn

Routing = Literal["topk", "switch"]


@dataclass
class Routed:
    logits: torch.Tensor  # (T, E) fp32
    probs: torch.Tensor  # (T, E) fp32, softmax over all experts
    experts: torch.Tensor  # (T, K) long
    weights: torch.Tensor  # (T, K) fp32; 0 where dropped
    kept: torch.Tensor  # (T, K) bool; False: dropped by capacity


class SparseMoE(nn.Module):
    """Sparse MoE feed-forward block: (..., H) -> (..., H).

    Args:
        hidden_size, intermediate_size, num_experts: H, I, E.
        top_k: K (1 for "switch").
        routing: "topk" (Mixtral) or "switch" (top-1 with optional capacity).
        capacity_factor: "switch" only; None: no capacity limit.
        jitter: training only: router inputs are multiplied by U(1 - jitter, 1 + jitter).
        aux_loss_coef, z_loss_coef: alpha and beta of the losses above.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        routing: Routing = "topk",
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if routing == "switch":
            top_k = 1
        elif capacity_factor is not None:
            raise ValueError("capacity_factor applies to routing='switch' only")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got {top_k} and {num_experts}")
        self.num_experts, self.top_k, self.routing = num_experts, top_k, routing
        self.capacity_factor, self.jitter = capacity_factor, jitter
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype)
        )
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=0.02)
        self.losses: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor) -> Routed:
        """(T, H) -> the routing decision, computed in fp32."""
        inputs = x.float()
        if self.training and self.jitter > 0:
            noise = torch.empty_like(inputs).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            inputs = inputs * noise
        logits = F.linear(inputs, self.router.weight.float())  # (T, E)
        probs = torch.softmax(logits, dim=-1)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)  # (T, K)
        if self.routing == "switch":
            weights = probs.gather(-1, experts)  # the chosen expert's full softmax probability
        else:
            weights = torch.softmax(top_logits, dim=-1)  # softmax over the top-k logits
        kept = torch.ones_like(experts, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * x.shape[0] / self.num_experts)
            one_hot = F.one_hot(experts[:, 0], self.num_experts)  # (T, E)
            position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # arrival order at its expert
            kept = (position < capacity)[:, None]
            weights = weights * kept
        return Routed(logits, probs, experts, weights, kept)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routed = self.route(x)
        self.losses = self._losses(routed)
        return self._experts(x, routed).reshape(shape)

    def _losses(self, routed: Routed) -> dict[str, torch.Tensor]:
        assignments = F.one_hot(routed.experts, self.num_experts).float()  # (T, K, E)
        share = assignments.mean(dim=(0, 1))  # f_i: share of the T*K assignments
        mean_prob = routed.probs.mean(dim=0)  # P_i
        balance = self.aux_loss_coef * self.num_experts * (share * mean_prob).sum()
        z = self.z_loss_coef * torch.logsumexp(routed.logits, dim=-1).pow(2).mean()
        return {"load_balancing": balance, "z": z}

    def _experts(self, x: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Sort the T*K assignments by expert and run the experts on contiguous segments."""
        flat_experts = routed.experts.reshape(-1)  # (T*K,)
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // self.top_k  # token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts)  # (E,)
        sorted_x = x[tokens]  # (T*K, H)
        gate_up = _grouped_linear(sorted_x, self.gate_up_proj, counts)  # (T*K, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        weights = routed.weights.reshape(-1)[order, None]
        if torch.is_grad_enabled():
            hidden = F.silu(gate) * up
            out = _grouped_linear(hidden, self.down_proj, counts)  # (T*K, H)
            out = out * weights.to(out.dtype)
        else:  # inference: the same maths in place, one memory pass fewer over each intermediate
            hidden = F.silu(gate).mul_(up)
            out = _grouped_linear(hidden, self.down_proj, counts).mul_(weights.to(hidden.dtype))
        return torch.zeros_like(x).index_add_(0, tokens, out.to(x.dtype))

    def reference_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The same layer, one expert and one token group at a time (for tests)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routed = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(routed.experts == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * routed.weights[token, slot, None]).to(x.dtype))
        return out.reshape(shape)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row segment e of `x` (counts[e] rows, in expert order) times weight[e].T: (N, in) ->
    (N, out), with weight (E, out, in)."""
    grouped = getattr(F, "grouped_mm", None)
    if grouped is not None and x.dtype == weight.dtype:
        try:
            offsets = counts.cumsum(0).to(torch.int32)
            return grouped(x, weight.transpose(1, 2), offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass  # no kernel for this device or dtype: segments below
    segments = torch.split(x, counts.tolist())
    return torch.cat([s @ weight[e].T for e, s in enumerate(segments)], dim=0)
