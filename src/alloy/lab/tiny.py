"""Tiny real Hugging Face checkpoints, built from configs in a second (no download).

Used by the test suite and the quick demo. The weights are seeded and deliberately non-trivial:
transformers initialises norms to ones and biases to zeros, which hides bugs (a merge that drops a
norm still "works"), so every parameter is perturbed with seeded noise after initialisation.
Each folder carries a real tokenizer (character-level BPE over printable ASCII), a generation
config and a chat template, so side-file handling is exercised too.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloy.errors import InputError
from alloy.io.atomic import AtomicFolder

VOCAB_SIZE = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    model_type: str
    config: dict[str, Any]
    dtype: torch.dtype
    max_shard_size: str | None  # None: one file


_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

TINY: dict[str, TinySpec] = {
    # untied, fp32, sharded
    "llama": TinySpec("llama", {**_COMMON, "tie_word_embeddings": False}, torch.float32, "40KB"),
    # untied, bf16, one file
    "mistral": TinySpec(
        "mistral",
        {**_COMMON, "tie_word_embeddings": False, "sliding_window": 64},
        torch.bfloat16,
        None,
    ),
    # tied, fp16, one file
    "qwen2": TinySpec("qwen2", {**_COMMON, "tie_word_embeddings": True}, torch.float16, None),
    # tied, Conv1D (transposed) weights, fp32, sharded
    "gpt2": TinySpec(
        "gpt2",
        {
            "vocab_size": VOCAB_SIZE,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": True,
        },
        torch.float32,
        "30KB",
    ),
    # sparse MoE, bf16, sharded
    "mixtral": TinySpec(
        "mixtral",
        {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
        torch.bfloat16,
        "60KB",
    ),
}
# Architectures built on request but left out of the cross-architecture test matrix (TINY).
MORE_TINY: dict[str, TinySpec] = {
    # q/k norms in attention; untied, fp32, one file
    "qwen3": TinySpec(
        "qwen3", {**_COMMON, "tie_word_embeddings": False, "head_dim": 8}, torch.float32, None
    ),
}
_ALL_TINY = {**TINY, **MORE_TINY}


def tiny_tokenizer() -> Any:
    """A character-level BPE tokenizer over printable ASCII, wrapped for transformers."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(arch: str, *, seed: int = 0, noise: float = 0.05, **overrides: Any) -> Any:
    """An in-memory tiny model of `arch` (a key of TINY) with seeded non-trivial weights.

    `noise` is the std of the seeded noise added to every parameter; around 0.5 the model's
    greedy output varies with context instead of settling on one repeated token (decoding tests).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in _ALL_TINY:
        raise InputError(f"unknown tiny architecture {arch!r}; choose from {', '.join(_ALL_TINY)}")
    spec = _ALL_TINY[arch]
    config = AutoConfig.for_model(spec.model_type, **{**spec.config, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return model.to(spec.dtype).eval()


def tiny_reward_model(*, seed: int = 3) -> Any:
    """A tiny Llama reward model (sequence classification, one label), seeded.

    Its config carries a pad token id, so transformers reads each row's score at its last
    non-pad token and batched, right-padded scoring is valid.
    """
    from transformers import AutoConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **_COMMON, num_labels=1)
    return LlamaForSequenceClassification(config).eval()


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """No transformers progress bars or info logs inside the block; the settings come back after."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny(
    arch: str,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    sharded: bool | None = None,
    layers: int | None = None,
    force: bool = False,
    noise: float = 0.05,
    **overrides: Any,
) -> Path:
    """Save a tiny `arch` checkpoint (weights, config, tokenizer, generation config) to `out`.

    `sharded` overrides the architecture's default layout (None keeps it); `layers` the number of
    layers (2 by default).
    """
    from transformers import GenerationConfig

    spec = _ALL_TINY.get(arch)
    if layers is not None:
        overrides["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    model = tiny_model(arch, seed=seed, noise=noise, **overrides)
    assert spec is not None
    shard = spec.max_shard_size if sharded is None else ("40KB" if sharded else None)
    with AtomicFolder(out, force=force) as tmp, transformers_quiet():
        model.save_pretrained(tmp, max_shard_size=shard or "50GB")
        model.generation_config = GenerationConfig(
            bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=16
        )
        model.generation_config.save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
    return Path(out)
