"""Adapters made with PEFT itself (random non-zero factors), and PEFT's own folded weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def make_adapter(base: Path, out: Path, config: Any, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter of `config` on `base` with random factors; return PEFT's folded state.

    PEFT starts B (and VeRA's λ_b) at zero, which would make every update zero, so every
    trainable adapter tensor is redrawn from a seeded normal distribution before saving. The
    returned state dict is `merge_and_unload()` of that model: the reference for folding.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and ("lora_" in name or "vera_lambda" in name):
                noise = torch.randn(parameter.shape, generator=generator) * 0.2
                if "magnitude" in name:
                    parameter.mul_(1 + noise.abs())
                else:
                    parameter.copy_(noise)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture
def adapter_factory():
    return make_adapter
