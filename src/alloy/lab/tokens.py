"""The lab's tokenizer and token streams: byte-level BPE trained on the corpus, packed blocks.

Byte-level BPE (as in GPT-2 and Llama 3) never produces an unknown token, so every model of the
family can score any text, and bits per byte stay comparable with models of other tokenizers.
One token, `<|endoftext|>`, is both BOS and EOS: it separates chunks when they are packed into
training blocks and opens every document at evaluation time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for a given text order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT, PAD, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=PAD
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_records(
    tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], batch: int = 256
) -> np.ndarray:
    """Token ids of `texts`, each followed by EOT, concatenated into one uint16/uint32 array."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    parts: list[np.ndarray] = []
    buffer: list[str] = []

    def flush() -> None:
        for ids in tokenizer(buffer, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray([*ids, eot], dtype=dtype))
        buffer.clear()

    for text in texts:
        buffer.append(text)
        if len(buffer) == batch:
            flush()
    if buffer:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class PackedBlocks(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """`count` training blocks of `seq_len` tokens cut from token streams at seeded offsets.

    With several streams (domains), block `i` comes from stream `i % len(streams)`, so a mixture
    has equal tokens per domain whatever the domains' sizes; offsets are uniform in each stream
    (the nanoGPT sampler), drawn once from `seed` so an epoch is reproducible.
    """

    def __init__(self, streams: list[np.ndarray], seq_len: int, count: int, seed: int) -> None:
        short = [i for i, s in enumerate(streams) if len(s) <= seq_len]
        if short or not streams:
            raise ValueError(f"streams {short} are shorter than one block of {seq_len} tokens")
        self.streams = streams
        self.seq_len = seq_len
        generator = np.random.default_rng(seed)
        self.offsets = [
            int(generator.integers(0, len(streams[i % len(streams)]) - seq_len))
            for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        stream = self.streams[i % len(self.streams)]
        start = self.offsets[i]
        ids = torch.from_numpy(stream[start : start + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def iter_texts(paths: Iterable[Path], max_chars: int | None = None) -> Iterator[str]:
    """The "text" fields of JSONL files, stopping after about `max_chars` characters."""
    from alloy.lab.corpus import read_jsonl

    seen = 0
    for path in paths:
        for record in read_jsonl(path):
            yield record["text"]
            seen += len(record["text"])
            if max_chars is not None and seen >= max_chars:
                return
