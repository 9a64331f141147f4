"""Training data: formats, every bad line at once, masks, the token cache, packing and mixing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alloy.errors import InputError
from alloy.train.data import Source, load_sources, resolve_sources
from alloy.train.packing import BlockRows, Collator, ExampleRows, TrainRows, blend, mixture_order
from alloy.train.recipe import DataEntry


def _source(path: Path, name: str = "s", kind: str = "auto") -> Source:
    return resolve_sources([DataEntry(name=name, path=str(path), kind=kind)], Path())[0]  # type: ignore[arg-type]


def _text(tokenizer, ids) -> str:  # type: ignore[no-untyped-def]
    """The tiny tokenizer is character-level and has no decoder: join its tokens."""
    return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_folders_skip_hidden_files_and_read_text(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = _source(data_dir / "notes")
    assert [f.name for f in source.files] == ["n0.txt", "n1.txt", "n2.txt"]
    (tokenized,) = load_sources([source], tokenizer, cache=False)
    assert tokenized.items == 3 and tokenized.kinds == ("text",)
    first = tokenized.ids[tokenized.starts[0] : tokenized.starts[1]]
    text = (data_dir / "notes" / "n0.txt").read_text()
    # a document is BOS + its tokens + EOS, every id a target
    assert first[0] == tokenizer.bos_token_id and first[-1] == tokenizer.eos_token_id
    assert _text(tokenizer, first[1:-1]) == text
    assert tokenized.mask[: tokenized.starts[1]].all()


def test_completion_only_mask(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    (tokenized,) = load_sources([_source(data_dir / "sft.jsonl")], tokenizer, cache=False)
    record = json.loads((data_dir / "sft.jsonl").read_text().splitlines()[0])
    ids = tokenized.ids[tokenized.starts[0] : tokenized.starts[1]]
    mask = tokenized.mask[tokenized.starts[0] : tokenized.starts[1]]
    assert _text(tokenizer, ids[~mask]) == "<s>" + record["prompt"]
    assert _text(tokenizer, ids[mask]) == record["completion"] + "</s>"


def test_messages_train_on_assistant_turns_only(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    (tokenized,) = load_sources([_source(data_dir / "chat.jsonl")], tokenizer, cache=False)
    record = json.loads((data_dir / "chat.jsonl").read_text().splitlines()[0])
    ids = tokenized.ids[tokenized.starts[0] : tokenized.starts[1]]
    mask = tokenized.mask[tokenized.starts[0] : tokenized.starts[1]]
    whole = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert _text(tokenizer, ids) == whole
    # the tiny template ends every turn with a newline; the assistant's turns are the targets
    scored = _text(tokenizer, ids[mask])
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    assert scored == "".join(f"{a}\n" for a in answers)


def test_every_bad_line_is_reported_at_once(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "fine"}\n'
        "{not json\n"
        '{"prompt": "p"}\n'
        '{"foo": 1}\n'
        '{"text": "   "}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(InputError) as info:
        load_sources([_source(bad), _source(latin, "l")], tokenizer, cache=False)
    where = [p.where for p in info.value.problems]
    assert where == [f"{bad}:2", f"{bad}:3", f"{bad}:4", f"{bad}:5", f"{bad}:6", str(latin)]
    text = str(info.value)
    assert "missing completion" in text and "unknown record shape" in text
    assert "no assistant message" in text and "not UTF-8" in text


def test_kind_mismatch_is_an_error(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="a completion record in a source of kind text"):
        load_sources([_source(data_dir / "sft.jsonl", kind="text")], tokenizer, cache=False)


def test_token_cache_is_reused_and_keyed_by_content(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    (first,) = load_sources([_source(path)], tokenizer)
    (second,) = load_sources([_source(path)], tokenizer)
    assert not first.cached and second.cached
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.starts, second.starts)
    path.write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    (third,) = load_sources([_source(path)], tokenizer)
    assert not third.cached and third.tokens == second.tokens + 2  # " f"


def _lab_tokenizer():  # type: ignore[no-untyped-def]
    from alloy.lab.tokens import train_tokenizer

    return train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=300)


@pytest.mark.parametrize("lab_style", [False, True])
def test_packing_never_joins_documents_without_eos(
    data_dir: Path, tokenizer, lab_style: bool
) -> None:  # type: ignore[no-untyped-def]
    """Wherever a block holds the end of one document and the start of the next, an EOS lies
    between them: with distinct BOS/EOS (the tiny tokenizer) and with one token for both (the
    lab's)."""
    tok = _lab_tokenizer() if lab_style else tokenizer
    (tokenized,) = load_sources([_source(data_dir / "docs.jsonl")], tok, cache=False)
    rows = BlockRows(tokenized, 16, seed=0, index=0)
    eos = tok.eos_token_id
    boundaries = set(tokenized.starts[1:-1].tolist())
    checked = 0
    for i in range(rows.blocks):
        block = i  # epoch 0 order does not matter here: check every block
        a = block * 16
        for offset in range(a + 1, a + 16):
            if offset in boundaries:  # a new document starts inside the block
                before, at = tokenized.ids[offset - 1], tokenized.ids[offset]
                assert eos in (before, at), (offset, before, at)
                checked += 1
    assert checked > 50


def test_document_attention_equals_documents_alone(
    data_dir: Path, tiny_llama: Path, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """With position ids restarting per document, a packed block's logits equal those of each
    of its documents run alone (no attention crosses a document)."""
    (tokenized,) = load_sources([_source(data_dir / "docs.jsonl")], tokenizer, cache=False)
    rows = BlockRows(tokenized, 96, seed=0, index=0, document_attention=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    row = rows.row(0, 0)
    assert row.positions is not None and (row.positions == 0).sum() >= 2
    ids = torch.from_numpy(row.ids.astype(np.int64))[None]
    positions = torch.from_numpy(row.positions)[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        starts = [*np.flatnonzero(row.positions == 0).tolist(), len(row.ids)]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-5)
        plain = model(input_ids=ids, use_cache=False).logits[0]
    assert not torch.allclose(plain[starts[1] :], packed[starts[1] :], atol=1e-3)


def test_blend_is_exact_at_every_prefix() -> None:
    weights = [0.5, 0.3, 0.2]
    order = blend(weights, 1000)
    counts = np.zeros(3)
    for i, j in enumerate(order):
        counts[j] += 1
        assert np.abs(counts - np.asarray(weights) * (i + 1)).max() < 1.0


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.25])
def test_replay_share_is_exact(fraction: float) -> None:
    """Replay gets `fraction` of the rows to within one row after any number of rows, so every
    batch window carries its share and the whole run the exact fraction."""
    n = 2000
    order = mixture_order([1.0, 1.0], n, replay=[2.0, 1.0], replay_fraction=fraction)
    replay = np.cumsum(order >= 2)
    assert np.abs(replay - fraction * np.arange(1, n + 1)).max() < 1.0
    old = order[order >= 2]
    assert abs((old == 2).sum() - 2 * (old == 3).sum()) <= 2  # the replay sources by weight


def test_example_rows_pack_without_splitting(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    (tokenized,) = load_sources([_source(data_dir / "sft.jsonl")], tokenizer, cache=False)
    packed = ExampleRows(tokenized, 32, seed=0, index=0, pack=True)
    single = ExampleRows(tokenized, 32, seed=0, index=0)
    assert single.epoch_size(0) == tokenized.items > packed.epoch_size(0)
    seen = 0
    for i in range(packed.epoch_size(0)):
        row = packed.row(0, i)
        assert row.positions is not None and len(row.ids) <= 32
        starts = np.flatnonzero(row.positions == 0)
        seen += len(starts)
        for a in starts:  # every packed example is whole: it starts with BOS
            assert row.ids[a] == tokenizer.bos_token_id
    assert seen == tokenized.items


def test_rows_are_deterministic_and_cycle_epochs(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    (tokenized,) = load_sources([_source(data_dir / "docs.jsonl")], tokenizer, cache=False)
    rows = [BlockRows(tokenized, 64, seed=3, index=0)]
    n = rows[0].blocks * 2 + 3
    a = TrainRows(rows, blend([1.0], n), replay_from=1)
    b = TrainRows([BlockRows(tokenized, 64, seed=3, index=0)], blend([1.0], n), replay_from=1)
    assert a.epochs == [3]
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(n))
    epoch0 = {tuple(a[i]["input_ids"].tolist()) for i in range(rows[0].blocks)}
    epoch1 = {tuple(a[i]["input_ids"].tolist()) for i in range(rows[0].blocks, 2 * rows[0].blocks)}
    assert epoch0 == epoch1  # each epoch visits every block once, in another order
    batch = Collator(0)([a[i] for i in range(4)])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (4, 64)
