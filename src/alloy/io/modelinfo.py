"""What a checkpoint is, from its config and tensor headers alone (no transformers import).

The config is the source of truth where it speaks; tensor names fill the gaps (a config without
`tie_word_embeddings`, a bare `.safetensors` file) and are cross-checked against it, so a
checkpoint whose files disagree with its config is reported rather than trusted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alloy.io.format import CODES, TensorInfo

# Suffixes of the input embedding and of the output head across the common architectures.
INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")
# Persistent buffers some architectures store beside their parameters (not parameters).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|layer|blocks)\.)(\d+)\.(.+)$")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class ModelInfo:
    architecture: str | None
    model_type: str | None
    num_layers: int | None
    vocab_size: int | None
    hidden_size: int | None
    tied_embeddings: bool
    num_parameters: int
    num_tensors: int
    nbytes: int
    dtypes: dict[str, int]  # safetensors dtype code -> number of parameters of that dtype
    input_embedding: str | None
    output_head: str | None
    warnings: list[str] = field(default_factory=list)


def text_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The part of a config that describes the language model (multimodal configs nest it)."""
    if not config:
        return {}
    nested = config.get("text_config")
    if isinstance(nested, dict) and "num_hidden_layers" not in config:
        return {**nested, **{k: v for k, v in config.items() if k != "text_config"}}
    return config


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def find_by_suffix(names: Mapping[str, object], suffixes: tuple[str, ...]) -> str | None:
    """The shortest tensor name ending with one of `suffixes` (the top-level one)."""
    hits = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
    return min(hits, key=len) if hits else None


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> ("model.layers.", 3, "mlp.up_proj.weight")."""
    match = _LAYER.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def layer_indices(names: Mapping[str, object]) -> set[int]:
    return {parts[1] for n in names if (parts := split_layer_name(n))}


def model_info(config: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> ModelInfo:
    cfg = text_config(config)
    warnings: list[str] = []
    architectures = (config or {}).get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None

    observed_layers = layer_indices(tensors)
    num_layers = _first(cfg, LAYER_KEYS)
    if observed_layers:
        count = max(observed_layers) + 1
        if num_layers is None:
            num_layers = count
        elif count != num_layers:
            warnings.append(f"config has {num_layers} layers but the weights hold {count}")

    embedding = find_by_suffix(tensors, INPUT_EMBEDDINGS)
    head = find_by_suffix(tensors, OUTPUT_HEADS)
    vocab_size = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else None
    if embedding is not None and tensors[embedding].shape:
        rows = tensors[embedding].shape[0]
        if vocab_size is None:
            vocab_size = rows
        elif rows != vocab_size:
            warnings.append(f"config vocab_size is {vocab_size} but {embedding} has {rows} rows")

    tie = cfg.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        tie = head is None and embedding is not None
    elif not tie and head is None and embedding is not None:
        warnings.append("config says embeddings are untied but no output head is stored")

    counted = [
        info
        for name, info in tensors.items()
        if not name.endswith(BUFFER_SUFFIXES) and not (tie and name == head and embedding)
    ]
    dtypes: Counter[str] = Counter()
    for info in counted:
        dtypes[CODES[info.dtype]] += info.numel
    return ModelInfo(
        architecture=architecture,
        model_type=cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
        num_layers=num_layers,
        vocab_size=vocab_size,
        hidden_size=_first(cfg, _HIDDEN_KEYS),
        tied_embeddings=tie,
        num_parameters=sum(info.numel for info in counted),
        num_tensors=len(tensors),
        nbytes=sum(info.nbytes for info in tensors.values()),
        dtypes=dict(dtypes),
        input_embedding=embedding,
        output_head=head,
        warnings=warnings,
    )
