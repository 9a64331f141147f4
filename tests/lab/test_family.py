"""The lab's corpus splits, tokenizer and Trainer-built family, on a small synthetic corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alloy.lab import corpus
from alloy.lab.corpus import assign_split, chunk_text, quiz_tasks, split_chunks
from alloy.lab.presets import Preset, Size, Stage
from alloy.lab.tokens import train_tokenizer

WORDS = {
    "drama": "thou art my lord and the king doth speak to thee",
    "scripture": "and the lord said unto them verily it shall come to pass",
    "fiction": "she was not sure that mr darcy would call at the house again",
    "technical": "the function returns a list of strings and raises an error",
}


def _docs(domain: str, n: int = 20) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(len(domain))
    words = WORDS[domain].split()
    docs = []
    for d in range(n):
        paragraphs = [" ".join(rng.choice(words, 60)) for _ in range(40)]
        docs.append((domain, f"doc{d}", "\n\n".join(paragraphs)))
    return docs


def test_chunk_text_bounds_and_content() -> None:
    text = "\n\n".join(["a" * 700, "b" * 700, "c" * 700, "d" * 5000, "", "e"])
    chunks = chunk_text(text, size=1000)
    assert all(len(c) <= 2000 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    assert chunks[0] == "a" * 700  # a+b would pass 1000 characters


def test_splits_deterministic_disjoint_and_stable() -> None:
    docs = _docs("drama") + _docs("fiction")
    first, second = split_chunks(docs, seed=3), split_chunks(docs, seed=3)
    assert first == second
    ids = [(c.source, c.doc, c.index) for s in corpus.SPLITS for c in first[s]]
    assert len(ids) == len(set(ids))  # disjoint, and every chunk is somewhere
    total = sum(len(chunk_text(t)) for _, _, t in docs)
    assert len(ids) == total
    # A chunk's split is a function of its identity only: adding documents moves nothing.
    more = split_chunks(docs + _docs("technical"), seed=3)
    for s in corpus.SPLITS:
        assert set(first[s]) <= set(more[s])
    assert split_chunks(docs, seed=4) != first
    # About 5% / 5% / 90% on many chunks.
    counts = {s: 0 for s in corpus.SPLITS}
    for i in range(20000):
        counts[assign_split(0, "s", "d", i)] += 1
    assert 800 < counts["validation"] < 1200 and 800 < counts["test"] < 1200


def test_quiz_tasks_have_the_answer_once() -> None:
    pairs = [("capitals", f"capital of {c}?", c.upper()) for c in "abcdef"]
    pairs.append(("tiny", "q", "a"))  # fewer than 4 distinct answers: skipped
    mc, preference = quiz_tasks(pairs, seed=0)
    assert len(mc) == len(preference) == 6
    for item, pref, (_, question, answer) in zip(mc, preference, pairs[:6], strict=True):
        assert item["choices"][item["answer"]] == f" {answer}"
        assert len(set(item["choices"])) == 4 and item["choices"].count(f" {answer}") == 1
        assert question in item["context"] and pref["chosen"] == f" {answer}"
        assert pref["rejected"] != pref["chosen"]


def test_tokenizer_round_trips() -> None:
    texts = [t for _, _, t in _docs("drama", 2) + _docs("technical", 2)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    sample = "thou art the function \u00e9\u4e2d!"  # unseen bytes still encode (byte-level)
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample


MICRO = Preset(
    name="micro",
    vocab_size=320,
    seq_len=32,
    batch=4,
    gpu_batch=4,
    tokenizer_chars=20_000,
    sizes={
        "small": Size(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32),
        "large": Size(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
    },
    pretrain={"small": Stage(6, 3e-3, 1, 3), "large": Stage(4, 3e-3, 1, 0)},
    expert={"small": Stage(3, 1e-3, 1, 0), "large": Stage(2, 1e-3, 1, 0)},
    soup_domain="fiction",
    soup_stage=Stage(2, 1e-3, 1),
    soup_variants=((0.5, 1), (2.0, 2)),
    eval_tokens=256,
)


def _fake_corpus(root: Path, seed: int) -> None:
    """Write a corpus whose manifest matches what build_corpus would check, from synthetic text."""
    out = root / "corpus"
    manifest = {
        "settings": corpus.corpus_settings(seed, dict(corpus.DOMAINS), {}),
        "sources": {},
        "domains": {d: corpus._write_domain(out / d, _docs(d), seed) for d in corpus.DOMAINS},
        "tasks": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_build_family_trains_saves_and_reuses(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.lab.family import build_family, plan_jobs

    _fake_corpus(tmp_path, seed=0)
    record = build_family(tmp_path, MICRO, seed=0)
    home = tmp_path / "family" / "micro"
    names = [j.name for j in plan_jobs(MICRO, 0)]
    assert list(record["models"]) == names
    assert len(names) == 2 + 8 + 2
    vocab = len(AutoTokenizer.from_pretrained(home / "tokenizer"))
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(home / name)
        assert model.config.vocab_size == vocab
        assert AutoTokenizer.from_pretrained(home / name).eos_token == "<|endoftext|>"
        assert not list((home / name).glob("*.bin")) and not (home / name / "_trainer").exists()
    trajectory = sorted(p.name for p in (home / "small" / "trajectories" / "base").iterdir())
    assert trajectory == ["checkpoint-3", "checkpoint-6"]
    assert not list((home / "small" / "trajectories").rglob("*.bin"))
    # Fine-tuning moved the weights; experts differ from the base and from each other.
    base = AutoModelForCausalLM.from_pretrained(home / "small" / "base").state_dict()
    expert = AutoModelForCausalLM.from_pretrained(home / "small/experts/drama").state_dict()
    assert not torch.equal(base["model.norm.weight"], expert["model.norm.weight"])
    # A second build reuses every model (nothing retrained, files untouched).
    stamp = (home / "small" / "base" / "model.safetensors").stat().st_mtime_ns
    again = build_family(tmp_path, MICRO, seed=0)
    assert (home / "small" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["models"]["small/base"]["key"] == record["models"]["small/base"]["key"]
    # Retuning the large base retrains it and its children only.
    from dataclasses import replace

    retuned = replace(
        MICRO, pretrain={**MICRO.pretrain, "large": replace(MICRO.pretrain["large"], lr=2e-3)}
    )
    third = build_family(tmp_path, retuned, seed=0)
    assert (home / "small" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    changed = {n for n in names if third["models"][n]["key"] != record["models"][n]["key"]}
    assert changed == {n for n in names if n.startswith("large/")}


def test_demo_merges_and_scores_every_model(tmp_path: Path) -> None:
    from alloy.lab.demo import run_demo

    _fake_corpus(tmp_path, seed=0)
    out = tmp_path / "demo"
    payload = run_demo(tmp_path, out, preset=MICRO, say=lambda message: None)
    rows = payload["results"]
    assert list(rows) == [
        "base",
        *(f"expert:{d}" for d in corpus.DOMAINS),
        "merge:soup",
        "merge:task_arithmetic",
        "merge:ties",
        "soup:greedy-fiction",
        "large base",
        "train:distill-experts",
        *(f"lora:{d}" for d in corpus.DOMAINS),
        "merge:lora-linear",
        "improve:raft-fiction",
        "ensemble:proxy-fiction",
    ]
    for row in rows.values():
        assert set(row) == {*corpus.DOMAINS, "overall"}
        assert all(0 < row[d]["perplexity"] < 1e4 for d in corpus.DOMAINS)
        assert all(row[d]["tokens"] == MICRO.eval_tokens for d in corpus.DOMAINS)
    assert {p.name for p in (out / "recipes").iterdir()} == {
        "soup.yaml",
        "task_arithmetic.yaml",
        "ties.yaml",
        "proxy-fiction.yaml",
        "experts-mixture.yaml",
        "distill-experts.yaml",
        *(f"lora-{d}.yaml" for d in corpus.DOMAINS),
        "raft-fiction.yaml",
        "mtp-heads.yaml",
    }
    # RAFT fine-tuned on each prompt's best of 4 by the reward model: above the samples' mean
    raft = payload["raft"]
    prompts = (out / "improve" / "prompts.jsonl").read_text().splitlines()
    assert raft["kept"] == len(prompts) and raft["reward_kept"] > raft["reward_before"]
    # each LoRA expert (the base frozen, an adapter trained) beats the base on its own domain
    for d in corpus.DOMAINS:
        assert rows[f"lora:{d}"][d]["perplexity"] < rows["base"][d]["perplexity"], d
    assert (out / "adapters" / "drama" / "adapter_config.json").is_file()
    assert (out / "merges" / "lora-linear" / "lora_merge.json").is_file()
    # the student learnt from the experts' mixture: better than the base it started from
    assert (
        rows["train:distill-experts"]["overall"]["perplexity"]
        < rows["base"]["overall"]["perplexity"]
    )
    assert [s["prompt"] for s in payload["proxy_samples"]] == ["It was a", "She said that"]
    # self-speculative decoding with the MTP heads writes exactly what greedy decoding writes
    assert payload["speculative"]["identical_to_greedy"] == payload["speculative"]["prompts"] == 2
    assert (out / "train" / "mtp-heads" / "mtp_heads.safetensors").is_file()
    decoders = [(s["decoder"], s["prompt"]) for s in payload["dola_samples"]]
    assert decoders == [
        (d, p)
        for d in ("greedy", "dola (layers low, penalty 1.2)")
        for p in ("It was a", "She said that")
    ]
    written = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["decoder"] for s in written] == [
        *["proxy-tuning, top-p 0.9"] * 2,
        *(d for d, _ in decoders),
    ]
    assert "| merge:ties |" in (out / "perplexity.md").read_text()
    # The output folder is never silently replaced.
    from alloy.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        run_demo(tmp_path, out, preset=MICRO, say=lambda message: None)


def test_cli_lab_rejects_bad_input(tmp_path: Path) -> None:
    from alloy.cli.main import main

    assert main(["lab", "build", "--preset", "nope", "--root", str(tmp_path)]) == 2
    assert main(["lab", "corpora", "--root", str(tmp_path), "--add", "nofolder"]) == 2
    assert main(["lab", "corpora", "--root", str(tmp_path), "--add", f"x={tmp_path}/no"]) == 2
    assert not (tmp_path / "corpus").exists()


def test_too_small_domain_is_refused(tmp_path: Path) -> None:
    from alloy.errors import InputError

    with pytest.raises(InputError, match="too small"):
        corpus._write_domain(tmp_path / "tiny", [("tiny", "a", "just one short paragraph")], 0)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("words " * 100)
    (tmp_path / "texts" / "b.bin").write_bytes(b"\xff\xfe")
    docs = corpus.folder_documents("legal", tmp_path / "texts")
    assert [(s, d) for s, d, _ in docs] == [("legal", "a.txt")]  # non-text suffixes skipped
