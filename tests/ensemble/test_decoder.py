"""The decoder against transformers' own generate, against recomputation without a cache, and
the vocabulary checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from alloy import Ensemble
from alloy.errors import IncompatibleModelsError, InputError
from alloy.lab.tiny import tiny_tokenizer

PROMPTS = ["Hello there", "a", "The quick brown fox jumps over"]


def hf_greedy(ensemble: Ensemble, prompts: list[str], new: int) -> list[list[int]]:
    """transformers' generate on the one member, left-padded like the decoder, cut at EOS."""
    member = ensemble.members[0]
    encoded = [member.encode_prompt(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    out = member.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(2)] if 2 in row else row)
    return rows


@pytest.mark.parametrize("arch", ["a", "gpt2", "mistral"])
def test_one_member_greedy_equals_transformers_generate(lively: dict[str, Path], arch: str) -> None:
    ensemble = Ensemble.from_models([lively[arch]], rule="linear")
    ours = [g.token_ids for g in ensemble.generate(PROMPTS, max_new_tokens=24)]
    assert ours == hf_greedy(ensemble, PROMPTS, 24)
    assert len({t for row in ours for t in row}) > 5  # varied output, not one token repeated


@pytest.mark.parametrize("rule", ["linear", "log_linear"])
def test_copies_of_one_model_decode_like_the_model(lively: dict[str, Path], rule: str) -> None:
    single = Ensemble.from_models([lively["a"]], rule="linear")
    copies = Ensemble.from_models([lively["a"]] * 3, rule=rule, weights=[0.2, 0.3, 0.5])
    assert copies.members[0].model is copies.members[2].model  # loaded once
    expected = [g.token_ids for g in single.generate(PROMPTS, max_new_tokens=20)]
    assert [g.token_ids for g in copies.generate(PROMPTS, max_new_tokens=20)] == expected


def recompute(ensemble: Ensemble, prompt: str, new: int) -> list[int]:
    """Greedy decoding with no cache: every step runs every member over its whole prefix."""
    prefixes = [m.encode_prompt(prompt) for m in ensemble.members]
    tokens: list[int] = []
    for _ in range(new):
        scores = []
        for member, prefix in zip(ensemble.members, prefixes, strict=True):
            ids = torch.tensor([prefix + tokens])
            logits = member.model(input_ids=ids).logits[:, -1, : member.vocab]
            scores.append(torch.log_softmax(logits.float(), -1))
        token = int(ensemble.combine(scores).argmax(-1))
        if token in ensemble.eos_ids:
            break
        tokens.append(token)
    return tokens


def test_cached_decoding_equals_recomputing_from_scratch(lively: dict[str, Path]) -> None:
    """Three different members, one negative weight, and templates of different lengths (so
    each member's cache and positions differ)."""
    recipe = {
        "rule": "log_linear",
        "members": [
            {"model": str(lively["a"]), "weight": 1.0},
            {"model": str(lively["b"]), "weight": 0.8, "template": "Q: {prompt}\nA:"},
            {"model": str(lively["c"]), "weight": -0.4, "filters": {"top_k": 50}},
        ],
    }
    ensemble = Ensemble.from_recipe(recipe)
    with torch.inference_mode():
        expected = [recompute(ensemble, p, 16) for p in PROMPTS]
    assert [g.token_ids for g in ensemble.generate(PROMPTS, max_new_tokens=16)] == expected


def test_finished_rows_leave_the_batch_without_changing_the_others(lively: dict[str, Path]) -> None:
    ensemble = Ensemble.from_models([lively["a"], lively["b"]], rule="linear")
    alone = [ensemble.generate([p], max_new_tokens=20)[0] for p in PROMPTS]
    stop = alone[0].text[3:5]  # row 0 stops early; the others run on (or stop later)
    alone = [ensemble.generate([p], max_new_tokens=20, stop=[stop])[0] for p in PROMPTS]
    batch = ensemble.generate(PROMPTS, max_new_tokens=20, stop=[stop])
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert batch[0].finish_reason == "stop" and stop not in batch[0].text
    assert len({len(g.token_ids) for g in batch}) > 1  # rows left the batch at different steps


def test_sampling_is_seeded(lively: dict[str, Path]) -> None:
    ensemble = Ensemble.from_models([lively["a"], lively["b"]], rule="log_linear")
    settings = {"max_new_tokens": 16, "do_sample": True, "top_p": 0.95, "ignore_eos": True}
    first = [g.token_ids for g in ensemble.generate(PROMPTS, seed=1, **settings)]
    assert [g.token_ids for g in ensemble.generate(PROMPTS, seed=1, **settings)] == first
    assert [g.token_ids for g in ensemble.generate(PROMPTS, seed=2, **settings)] != first
    assert all(len(t) == 16 for t in first)


def test_padded_embedding_is_sliced(lively: dict[str, Path]) -> None:
    """The padded model scores 128 ids, its tokenizer has 102: the extra rows are dropped, so the
    ensemble's distribution has 102 entries and never emits a padding id."""
    ensemble = Ensemble.from_models([lively["padded"], lively["a"]], rule="linear")
    real_vocab = len(tiny_tokenizer())
    assert ensemble.vocab == real_vocab
    out = ensemble.generate(PROMPTS, max_new_tokens=12, do_sample=True, ignore_eos=True)
    assert max(max(g.token_ids) for g in out) < real_vocab


def test_different_tokenizers_are_refused(lively: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(lively["b"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    swapped = {token: (9 if i == 10 else 10 if i == 9 else i) for token, i in vocab.items()}
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=swapped, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(other)
    with pytest.raises(IncompatibleModelsError) as error:
        Ensemble.from_models([lively["a"], other], rule="linear")
    assert "id 9" in str(error.value) and "id 10" in str(error.value)


def test_dropout_member(lively: dict[str, Path]) -> None:
    """A dropout member samples its model 4 times per step; seeded, so it repeats exactly, and it
    differs from the model without dropout."""
    ensemble = Ensemble.from_models([lively["a"]], rule="linear", samples=4, dropout=0.3)
    assert ensemble.members[0].model.training
    first = [g.token_ids for g in ensemble.generate(PROMPTS, max_new_tokens=16, seed=3)]
    assert [g.token_ids for g in ensemble.generate(PROMPTS, max_new_tokens=16, seed=3)] == first
    plain = Ensemble.from_models([lively["a"]], rule="linear")
    assert [g.token_ids for g in plain.generate(PROMPTS, max_new_tokens=16)] != first
    with pytest.raises(InputError, match="no dropout"):
        Ensemble.from_models([lively["a"]], rule="linear", samples=4)


def test_chat_template_member_prompt(lively: dict[str, Path]) -> None:
    """A member with `template: chat` sees the prompt through its tokenizer's chat template (no
    extra BOS: the template writes its own special tokens); a plain member gets BOS + prompt."""
    recipe = {
        "rule": "log_linear",
        "members": [{"model": str(lively["a"]), "template": "chat"}, {"model": str(lively["b"])}],
    }
    ensemble = Ensemble.from_recipe(recipe)
    chat, plain = ensemble.members
    text = "<|user|>hi\n<|assistant|>"  # the tiny tokenizer's template, written out
    assert chat.encode_prompt("hi") == chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain.encode_prompt("hi") == [
        1,
        *plain.tokenizer("hi", add_special_tokens=False)["input_ids"],
    ]
    assert len(ensemble.generate(["hi"], max_new_tokens=3)[0].token_ids) <= 3


def test_dropout_member_does_not_share_a_plain_members_model(lively: dict[str, Path]) -> None:
    """GPT-2's config has dropout 0.1 of its own: a sampled member of it and a plain member of
    the same folder get two models, so the plain one stays in eval mode (no dropout)."""
    recipe = {
        "rule": "linear",
        "members": [{"model": str(lively["gpt2"])}, {"model": str(lively["gpt2"]), "samples": 2}],
    }
    plain, sampled = Ensemble.from_recipe(recipe).members
    assert plain.model is not sampled.model
    assert not plain.model.training and sampled.model.training


def test_decoding_uses_the_current_cache_argument(lively: dict[str, Path]) -> None:
    """No deprecation warning from transformers for the KV-cache keyword (`past_key_values` was
    renamed `cache`; alloy passes whichever the installed release takes)."""
    import warnings

    ensemble = Ensemble.from_models([lively["a"]], rule="linear")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensemble.generate(PROMPTS, max_new_tokens=4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
