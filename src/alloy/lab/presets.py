"""Presets of the lab's model family: sizes, steps and learning rates, in one table.

`demo` must finish (corpus, tokenizer, two bases, all experts, soup ingredients) in under ten
minutes on two CPU cores; `experiment` in about an hour, in the background. Token budgets follow
the measured training speeds in RESOURCES.md (fp32, two threads). With a CUDA device the
experiment preset trains with larger batches (`gpu_batch`) for the same number of steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Size:
    """A Llama-architecture shape (grouped-query attention, SwiGLU, RoPE, tied embeddings)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Stage:
    steps: int
    lr: float
    warmup: int
    save_every: int = 0  # 0: no trajectory


@dataclass(frozen=True)
class Preset:
    name: str
    vocab_size: int
    seq_len: int
    batch: int
    gpu_batch: int
    tokenizer_chars: int  # characters per domain used to train the tokenizer
    sizes: dict[str, Size]
    pretrain: dict[str, Stage]
    expert: dict[str, Stage]
    # Several fine-tunes of one domain from the small base, differing in learning rate and seed:
    # the ingredients of model soups.
    soup_domain: str
    soup_stage: Stage
    soup_variants: tuple[tuple[float, int], ...]  # (lr multiplier, seed)
    eval_tokens: int  # tokens per domain used by the demo's evaluation
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        name="demo",
        vocab_size=4096,
        seq_len=128,
        batch=16,
        gpu_batch=16,
        tokenizer_chars=1_000_000,
        sizes={
            "small": Size(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=192),
            "large": Size(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
        },
        pretrain={
            "small": Stage(steps=300, lr=3e-3, warmup=20, save_every=100),
            "large": Stage(steps=250, lr=2e-3, warmup=20, save_every=50),
        },
        expert={
            "small": Stage(steps=60, lr=1e-3, warmup=5, save_every=20),
            "large": Stage(steps=40, lr=7e-4, warmup=4, save_every=10),
        },
        soup_domain="fiction",
        soup_stage=Stage(steps=60, lr=1e-3, warmup=5),
        soup_variants=((0.5, 1), (1.0, 2), (2.0, 3)),
        eval_tokens=8192,
    ),
    "experiment": Preset(
        name="experiment",
        vocab_size=8192,
        seq_len=256,
        batch=8,
        gpu_batch=64,
        tokenizer_chars=3_000_000,
        sizes={
            "small": Size(hidden=192, layers=4, heads=3, kv_heads=1, intermediate=512),
            "large": Size(hidden=320, layers=6, heads=5, kv_heads=1, intermediate=864),
        },
        pretrain={
            "small": Stage(steps=700, lr=2e-3, warmup=50, save_every=100),
            # 600 steps at 1.5e-3 left the large base worse than the small one on every
            # domain (docs/results.md); twice the tokens at twice the peak LR, see docs/lab.md.
            "large": Stage(steps=1200, lr=3e-3, warmup=50, save_every=100),
        },
        expert={
            "small": Stage(steps=120, lr=6e-4, warmup=10, save_every=20),
            "large": Stage(steps=100, lr=4e-4, warmup=10, save_every=20),
        },
        soup_domain="fiction",
        soup_stage=Stage(steps=120, lr=6e-4, warmup=10),
        soup_variants=((0.5, 1), (1.0, 2), (1.0, 3), (2.0, 4)),
        eval_tokens=65536,
    ),
}
