"""Document order (order.py): TF-IDF, k nearest neighbours and the greedy walk against hand-derived
goldens, the permutation property, related beats random on real text, and the recipe checks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from alloy.errors import RecipeError
from alloy.train.order import (
    OrderEntry,
    knn_graph,
    nearest_neighbours,
    neighbour_similarity,
    random_order,
    related_order,
    resolve_encoder,
    terms,
    tfidf,
    top_neighbours,
    traverse,
)
from alloy.train.recipe import load_train_recipe


def test_tfidf_golden() -> None:
    """N = 4. df: x 3, y 2, z 1, w 1, q 1; z, w, q occur once and are dropped (they link
    nothing), so the columns are [x, y] with idf ln(4/3) = 0.287682 and ln 2 = 0.693147.
    "x y": (0.287682, 0.693147) / 0.750477 = (0.383332, 0.923610); "x z": x only, (1, 0);
    "x y w y": tf(y) = 2 gives y (1 + ln 2) ln 2 = 1.173600, so (0.287682, 1.173600) / 1.208345
    = (0.238079, 0.971246); "q": no kept term, a zero row."""
    vectors = tfidf(["x y", "x z", "X y w y", "q"])
    expected = [[0.383332, 0.923610], [1.0, 0.0], [0.238079, 0.971246], [0.0, 0.0]]
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert vectors.dtype == np.float32
    # max_terms keeps the highest document frequency: x (df 3) over y (df 2)
    np.testing.assert_allclose(tfidf(["x y", "x z", "x y w", "q"], max_terms=1)[:, 0], [1, 1, 1, 0])


def test_terms_lower_case_words() -> None:
    assert terms("The cat's 2 MATS_x, naïve!") == ["the", "cat", "s", "2", "mats_x", "naïve"]


# A hand-built similarity matrix of two clusters, {0, 1, 2} and {3, 4, 5}, barely linked.
S = np.array(
    [
        [1.0, 0.9, 0.5, 0.01, 0.01, 0.01],
        [0.9, 1.0, 0.6, 0.01, 0.01, 0.01],
        [0.5, 0.6, 1.0, 0.02, 0.01, 0.01],
        [0.01, 0.01, 0.02, 1.0, 0.3, 0.8],
        [0.01, 0.01, 0.01, 0.3, 1.0, 0.4],
        [0.01, 0.01, 0.01, 0.8, 0.4, 1.0],
    ]
)


def test_walk_golden_on_a_hand_built_graph() -> None:
    """k = 1: 0 -> 1 (0.9), 1 -> 0, 2 -> 1 (0.6), 3 -> 5 (0.8), 4 -> 5 (0.4), 5 -> 3. The
    undirected graph has edges 0-1, 1-2, 3-5, 4-5, so the degrees are 1, 2, 1, 1, 1, 2 and the
    starts by (degree, index) are 0, 2, 3, 4, 1, 5. The walk from 0 goes to 1 (its only
    neighbour), then to 2 (1's only unvisited one), and is stuck; the next unvisited start of
    lowest degree is 3, which goes to 5, then 4. Order 0 1 2 3 5 4 in 2 walks."""
    indices, sims = top_neighbours(S, 0, 1)
    assert indices[:, 0].tolist() == [1, 0, 1, 5, 5, 3]
    np.testing.assert_allclose(sims[:, 0], [0.9, 0.9, 0.6, 0.8, 0.4, 0.8])
    graph = knn_graph(indices, sims)
    assert [sorted(g) for g in graph] == [[1], [0, 2], [1], [5], [5], [3, 4]]
    order, walks = traverse(graph)
    assert order.tolist() == [0, 1, 2, 3, 5, 4] and walks == 2


def test_walk_golden_k2_takes_the_most_similar_unvisited_neighbour() -> None:
    """k = 2 adds 0 -> 2 (0.5), 1 -> 2, 2 -> 0 (0.5), 3 -> 4 (0.3), 4 -> 3 (0.3), 5 -> 4
    (0.4): every node now has degree 2 (two triangles), so the walk starts at 0, steps to its
    most similar neighbour 1 (0.9 over 2's 0.5), then 2; stuck, it restarts at 3 (lowest index
    of degree 2), takes 5 (0.8 over 4's 0.3), then 4. Order 0 1 2 3 5 4, 2 walks; a greedy
    walk that took the first neighbour instead of the most similar would go 0 2 1 or 3 4 5."""
    order, walks = traverse(knn_graph(*top_neighbours(S, 0, 2)))
    assert order.tolist() == [0, 1, 2, 3, 5, 4] and walks == 2


def test_walk_starts_at_the_lowest_degree() -> None:
    """Node 0 links 1 (0.2) and 2 (0.7), so it has degree 2 and the others 1: the walk starts at
    1 (lowest degree, lowest index), goes to 0, then 2."""
    order, walks = traverse([{1: 0.2, 2: 0.7}, {0: 0.2}, {0: 0.7}])
    assert order.tolist() == [1, 0, 2] and walks == 1


def test_links_without_similarity_are_dropped() -> None:
    graph = knn_graph(np.array([[1], [0], [0]]), np.array([[0.5], [0.5], [0.0]]))
    assert graph == [{1: 0.5}, {0: 0.5}, {}]
    order, walks = traverse(graph)
    assert sorted(order.tolist()) == [0, 1, 2] and walks == 2


def test_nearest_neighbours_in_chunks_equal_one_block() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = top_neighbours(x @ x.T, 0, 5)
    chunked = nearest_neighbours(x, 5, chunk=6)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-6)
    brute = np.argsort(-(x @ x.T - 2 * np.eye(37)), axis=1)[:, :5]
    np.testing.assert_array_equal(chunked[0], brute)
    assert nearest_neighbours(x[:1], 5)[0].shape == (1, 0)


@pytest.mark.parametrize("n", [0, 1, 2, 50])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_every_document_appears_exactly_once(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    vectors = np.abs(rng.normal(size=(n, 6))).astype(np.float32)
    vectors[::7] = 0  # documents with nothing in common with any other
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    order, walks = related_order(vectors, k)
    assert sorted(order.tolist()) == list(range(n))
    assert (walks >= 1) == (n >= 1)


def test_random_order_is_a_seeded_permutation() -> None:
    a, b, c = random_order(100, 0, 0), random_order(100, 0, 0), random_order(100, 1, 0)
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.tolist() != random_order(100, 0, 1).tolist()  # each source its own stream


def _stdlib_documents() -> list[str]:
    """Real English text: the docstrings of the public functions and classes of eight standard
    library modules, each cut into pieces of 40 words, shuffled together (seeded)."""
    import collections
    import datetime
    import json
    import os
    import shutil
    import string
    import textwrap
    import unittest

    docs = []
    for module in (collections, datetime, json, os, shutil, string, textwrap, unittest):
        words = " ".join(
            getattr(module, name).__doc__ or ""
            for name in sorted(dir(module))
            if not name.startswith("_")
        ).split()
        docs += [" ".join(words[i : i + 40]) for i in range(0, len(words) - 39, 40)]
    random.Random(0).shuffle(docs)
    return docs


def test_related_order_neighbours_are_more_similar_than_random() -> None:
    docs = _stdlib_documents()
    vectors = tfidf(docs)
    order, _ = related_order(vectors, 10)
    assert sorted(order.tolist()) == list(range(len(docs))) and len(docs) > 200
    related = neighbour_similarity(vectors, order)
    shuffled = [neighbour_similarity(vectors, random_order(len(docs), s, 0)) for s in range(5)]
    print(f"mean neighbour similarity: related {related:.3f}, random {np.mean(shuffled):.3f}")
    assert related > 2 * max(shuffled)


def test_neighbour_similarity_golden() -> None:
    """Unit vectors e0, e0, e1: order 0 1 2 has consecutive cosines 1 and 0, mean 0.5; order
    0 2 1 has 0 and 0."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert neighbour_similarity(x, np.array([0, 1, 2])) == 0.5
    assert neighbour_similarity(x, np.array([0, 2, 1])) == 0.0
    assert neighbour_similarity(x, np.array([1])) == 0.0


# ---- recipe ------------------------------------------------------------------------------------


def _recipe(**changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "model": "m",
        "data": ["d.jsonl"],
        "schedule": {"name": "constant", "lr": 1e-3},
        "max_steps": 2,
    }
    return {**recipe, **changes}


def test_order_shorthand_and_defaults() -> None:
    spec = load_train_recipe(_recipe(order="related"), check_paths=False).spec
    assert spec.order == OrderEntry(kind="related", encoder="auto", neighbours=10, max_terms=4096)
    assert load_train_recipe(_recipe(), check_paths=False).spec.order is None
    entry = OrderEntry(kind="related", encoder="tfidf")
    assert resolve_encoder(entry) == "tfidf"


def test_bad_order_is_reported_all_at_once() -> None:
    recipe = _recipe(
        objective="sft",
        data=[{"path": "d.jsonl", "kind": "completion"}],
        replay={"data": [{"path": "o.jsonl", "kind": "messages"}], "fraction": 0.1},
        order={"kind": "random", "encoder": "minilml", "neighbours": 4},
    )
    with pytest.raises(RecipeError) as caught:
        load_train_recipe(recipe, check_paths=False)
    found: dict[str, list[str]] = {}
    for p in caught.value.problems:
        found.setdefault(p.where, []).append(f"{p.message} ({p.hint})")
    assert "unknown encoder 'minilml' (did you mean 'minilm'?" in found["order.encoder"][0]
    assert found["order.encoder"][1].startswith("applies to order: related only")
    assert found["order.neighbours"][0].startswith("applies to order: related only")
    assert found["order"][0].startswith("sft rows are examples, not packed text blocks")
    assert "completion source" in found["data.0.kind"][0]
    assert "messages source" in found["replay.data.0.kind"][0]


def test_unknown_order_and_keys_get_a_did_you_mean() -> None:
    with pytest.raises(RecipeError, match=r"unknown order 'relatd' \(did you mean 'related'\?"):
        load_train_recipe(_recipe(order="relatd"), check_paths=False)
    # misspelt keys and bad values are schema errors, all at once (cross checks come after)
    with pytest.raises(RecipeError) as caught:
        load_train_recipe(
            _recipe(order={"kind": "related", "neighbors": 3, "max_terms": 0}), check_paths=False
        )
    where = sorted(p.where for p in caught.value.problems)
    assert where == ["order.max_terms", "order.neighbors"]
    assert "did you mean 'neighbours'?" in str(caught.value)
