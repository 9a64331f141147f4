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
