"""The MoE architectures alloy writes, their tensor names and configs, and which dense models feed
each.

Tensor names are the Hugging Face hub layout (one tensor per expert and projection), which is what
transformers 5 writes with save_pretrained and what vLLM, llama.cpp and mergekit read; transformers
5 fuses the experts into 3-D parameters when it loads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROJECTIONS = ("gate", "up", "down")


def dense_mlp(layer: int, projection: str) -> str:
    """A dense decoder layer's MLP weight (Llama, Mistral, Qwen2, Qwen3)."""
    return f"model.layers.{layer}.mlp.{projection}_proj.weight"


@dataclass(frozen=True)
class MoeArchitecture:
    name: str  # the recipe's `architecture`
    model_type: str
    class_name: str
    bases: tuple[str, ...]  # dense model types whose attention carries over unchanged
    shared_expert: bool  # has (and needs) a shared expert
    config_updates: Mapping[str, Any]

    def expert(self, layer: int, expert: int, projection: str) -> str:
        if self.name == "mixtral":
            weight = {"gate": "w1", "up": "w3", "down": "w2"}[projection]
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{weight}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}_proj.weight"

    def router(self, layer: int) -> str:
        block = "block_sparse_moe" if self.name == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def shared(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}_proj.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def config(
        self,
        base: Mapping[str, Any],
        *,
        num_experts: int,
        experts_per_token: int,
        intermediate_size: int,
        dtype: str,
    ) -> dict[str, Any]:
        """The output's config.json: the base's settings that the MoE class knows, plus the MoE's.

        Raises ValueError if transformers rejects the result.
        """
        from transformers import CONFIG_MAPPING, AutoConfig

        known = {f.name for f in dataclasses.fields(CONFIG_MAPPING[self.model_type])}
        keep = known | {"head_dim"}  # read with getattr by every one of the three models
        config = {k: v for k, v in base.items() if k in keep and k != "transformers_version"}
        config.update(self.config_updates)
        experts_key = "num_local_experts" if self.name == "mixtral" else "num_experts"
        config.update(
            {
                "architectures": [self.class_name],
                "model_type": self.model_type,
                experts_key: num_experts,
                "num_experts_per_tok": experts_per_token,
                "dtype": dtype,
            }
        )
        if self.name == "mixtral":
            config["intermediate_size"] = intermediate_size
        else:
            config["moe_intermediate_size"] = intermediate_size
            if self.shared_expert:
                config["shared_expert_intermediate_size"] = intermediate_size
        fields = {k: v for k, v in config.items() if k != "model_type"}
        AutoConfig.for_model(self.model_type, **fields)  # raises on what transformers rejects
        return config


# Qwen MoEs: every layer sparse, top-k weights renormalised (as Mixtral, and as mergekit writes)
_QWEN_MOE = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
}

ARCHITECTURES: dict[str, MoeArchitecture] = {
    "mixtral": MoeArchitecture(
        name="mixtral",
        model_type="mixtral",
        class_name="MixtralForCausalLM",
        bases=("llama", "mistral"),
        shared_expert=False,
        config_updates={"output_router_logits": False, "router_jitter_noise": 0.0},
    ),
    "qwen": MoeArchitecture(
        name="qwen",
        model_type="qwen2_moe",
        class_name="Qwen2MoeForCausalLM",
        bases=("qwen2",),
        shared_expert=True,
        config_updates=_QWEN_MOE,
    ),
    "qwen3": MoeArchitecture(
        name="qwen3",
        model_type="qwen3_moe",
        class_name="Qwen3MoeForCausalLM",
        bases=("qwen3",),
        shared_expert=False,
        config_updates=_QWEN_MOE,
    ),
}


def architecture_for(base_type: str | None, shared: bool) -> str | None:
    """The architecture chosen when the recipe names none (None: no MoE takes this base)."""
    for arch in ARCHITECTURES.values():
        if base_type in arch.bases and (arch.shared_expert or not shared):
            return arch.name
    return None
