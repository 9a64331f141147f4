"""Router initialisation for upcycled MoEs: one (E, H) weight per layer.

Shape legend: L layers, E experts, H hidden size, V vocabulary.

Modes (the router computes logits = W x from the hidden state x entering the MoE block, i.e. the
output of the layer's post-attention norm):

    hidden          per layer, the mean of x over every token of an expert's positive prompts
                    minus the same mean over its negative prompts, scaled to unit norm. Token
                    logits are then |x| times the cosine between x and each expert's direction.
                    (mergekit takes the residual stream entering the decoder layer at the last
                    prompt token; alloy averages what the router itself sees, over all tokens,
                    because routing is decided per token.)
    cheap_embed     the same with input embeddings instead of hidden states: one direction per
                    expert, repeated in every layer; no forward pass.
    random          standard normal (as mergekit): sharp, arbitrary routing to train from.
    uniform_random  U(-1/sqrt(H), 1/sqrt(H)), torch.nn.Linear's initialisation.
    uniform         zeros: every expert gets the same logit. With experts_per_token equal to the
                    number of experts each token averages all experts; with fewer, ties go to
                    the lowest expert indices, so this is a start for training only.

The leading BOS (or document separator) of each prompt is left out of every mean: its hidden
state is usually an outlier (an attention sink), not the prompt's content.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alloy.errors import ProblemCollector, RecipeError


def random_routers(shape: tuple[int, int, int], mode: str, seed: int) -> torch.Tensor:
    """(L, E, H) fp32 for the prompt-free modes, seeded."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        bound = 1.0 / math.sqrt(shape[-1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if mode == "uniform":
        return torch.zeros(shape)
    raise ValueError(f"{mode!r} needs prompts")


def directions(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """(..., H) means of positive (minus negative) prompts -> unit vectors (zero stays zero)."""
    vector = positive if negative is None else positive - negative
    norm = vector.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, vector / norm.clamp_min(1e-30), vector)


def prompt_ids(
    tokenizer: Any, prompts: Sequence[str], max_length: int | None = None
) -> list[list[int]]:
    """Each prompt as token ids after the model's start token (see eval.scorer.start_ids), cut
    to `max_length` tokens in all (the model's context)."""
    from alloy.eval.scorer import start_ids

    start = start_ids(tokenizer)
    ids = [start + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return [seq[:max_length] for seq in ids] if max_length else ids


def mean_embeddings(embed: torch.Tensor, ids: Sequence[Sequence[int]], skip: int) -> torch.Tensor:
    """(V, H) input embeddings -> (H,) fp32 mean over every token after the first `skip` of
    each sequence."""
    tokens = [t for seq in ids for t in seq[skip:]]
    return embed[torch.tensor(tokens, dtype=torch.long)].float().mean(dim=0)


@torch.no_grad()
def mean_router_inputs(model: Any, ids: Sequence[Sequence[int]], skip: int) -> torch.Tensor:
    """(L, H) fp32: per decoder layer, the mean over every token after the first `skip` of each
    sequence of the post-attention norm's output (the input an MoE block's router sees)."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    count = 0
    handles = []
    for index, layer in enumerate(layers):

        def hook(_module: Any, _inputs: Any, output: torch.Tensor, index: int = index) -> None:
            sums[index] += output[0, skip:].double().sum(dim=0).cpu()

        handles.append(layer.post_attention_layernorm.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for seq in ids:  # one prompt at a time: no padding, so nothing to mask
            model(torch.tensor([list(seq)], device=device), use_cache=False)
            count += len(seq) - skip
    finally:
        for handle in handles:
            handle.remove()
    return (sums / count).float()


def prompted_routers(
    base: Path,
    experts: Sequence[tuple[Sequence[str], Sequence[str]]],
    mode: str,
    num_layers: int,
    *,
    device: str = "cpu",
) -> torch.Tensor:
    """(L, E, H) fp32 routers of `hidden` or `cheap_embed` from each expert's (positive, negative)
    prompts, read with the base model in `base`. An expert without prompts gets zeros.

    `base` may be `BASE+ADAPTER`: the tokenizer is BASE's, and the embeddings and hidden states
    are those of BASE with the adapter folded in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.adapters import open_model
    from alloy.eval.scorer import load_pretrained, start_ids

    tokenizer = load_pretrained(base, AutoTokenizer, "the base model's tokenizer")
    skip = len(start_ids(tokenizer))
    with open_model(base) as checkpoint:
        context = (checkpoint.config or {}).get("max_position_embeddings")
        embedding = checkpoint.model_info().input_embedding
        embed = checkpoint.read(embedding) if mode == "cheap_embed" and embedding else None
    problems = ProblemCollector()
    encoded: list[tuple[list[list[int]], list[list[int]]]] = []
    for e, (positive, negative) in enumerate(experts):
        pos = prompt_ids(tokenizer, positive, context)
        neg = prompt_ids(tokenizer, negative, context)
        for kind, seqs in (("positive", pos), ("negative", neg)):
            if any(len(s) <= skip for s in seqs):
                problems.add(f"experts.{e}.{kind}_prompts", "a prompt has no tokens")
        encoded.append((pos, neg))
    problems.raise_if_any(RecipeError, "cannot route from these prompts")

    if mode == "hidden":
        model = load_pretrained(base, AutoModelForCausalLM, dtype=torch.float32)
        model.to(device).eval()

        def means(seqs: list[list[int]]) -> torch.Tensor:
            return mean_router_inputs(model, seqs, skip)  # (L, H)
    elif mode == "cheap_embed":
        if embed is None:
            raise RecipeError(f"{base}: no input embedding found for cheap_embed")
        table = embed

        def means(seqs: list[list[int]]) -> torch.Tensor:
            return mean_embeddings(table, seqs, skip).expand(num_layers, -1)
    else:
        raise ValueError(f"{mode!r} takes no prompts")

    vectors: list[torch.Tensor | None] = []
    for pos, neg in encoded:
        if not pos:
            vectors.append(None)
            continue
        vectors.append(directions(means(pos), means(neg) if neg else None))
    hidden = next(v for v in vectors if v is not None).shape[-1]
    zeros = torch.zeros(num_layers, hidden)
    return torch.stack([v if v is not None else zeros for v in vectors], dim=1)


def similar_experts(routers: torch.Tensor, threshold: float = 0.98) -> list[tuple[int, int, int]]:
    """(layer, i, j) for each pair of non-zero expert directions with cosine above `threshold`:
    those experts would get nearly the same share of every token."""
    found = []
    unit = directions(routers.float(), None)
    for layer in range(routers.shape[0]):
        cosine = unit[layer] @ unit[layer].T
        for i in range(cosine.shape[0]):
            for j in range(i + 1, cosine.shape[0]):
                if cosine[i, j] > threshold:
                    found.append((layer, i, j))
    return found
