"""`alloy lora extract`: exact on low-rank deltas, loaded by PEFT, every input problem refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alloy.adapters import open_model, read_adapter
from alloy.adapters.delta import truncate
from alloy.adapters.extract import randomized_truncate, tensor_kind
from alloy.cli.main import main
from alloy.io import Checkpoint
from alloy.io.writer import save_state_dict

NORMS = ("input_layernorm", "post_attention_layernorm")


def low_rank(out: int, inp: int, rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A random (out × in) matrix of exactly rank `rank`."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.randn(out, rank, generator=generator)
    V = torch.randn(rank, inp, generator=generator)
    return U @ V * (scale / rank)


def with_spectrum(out: int, inp: int, singular: list[float], seed: int) -> torch.Tensor:
    """U·diag(singular)·Vᵀ with random orthonormal U, V: singular values known exactly."""
    generator = torch.Generator().manual_seed(seed)
    k = len(singular)
    U = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, k, generator=generator, dtype=torch.float64)).Q
    return (U * torch.tensor(singular, dtype=torch.float64)) @ V.T


def finetune(base: Path, out: Path, deltas: dict[str, torch.Tensor]) -> Path:
    """BASE with `deltas` added (in the stored layout), saved with BASE's side files."""
    with Checkpoint.open(base) as checkpoint:
        state = {name: checkpoint.read(name) for name in checkpoint}
    for name, d in deltas.items():
        state[name] = (state[name].double() + d.double()).to(state[name].dtype)
    return save_state_dict(state, out, donor=base)


def linear_deltas(base: Path, rank: int, *, transposed: bool = False) -> dict[str, torch.Tensor]:
    """A rank-`rank` update for every 2-D linear weight of BASE (stored layout)."""
    deltas = {}
    with Checkpoint.open(base) as checkpoint:
        for k, (name, info) in enumerate(checkpoint.tensors.items()):
            if tensor_kind(name, info.shape) == "linear":
                rows, cols = info.shape
                d = low_rank(cols, rows, rank, k) if transposed else low_rank(rows, cols, rank, k)
                deltas[name] = d.T if transposed else d
    return deltas


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main(["lora", "extract", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def report(out: Path) -> dict:
    return json.loads((out / "extract.json").read_text())


def logits(model_or_path: object, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_path
    if isinstance(model_or_path, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


IDS = torch.tensor([[1, 17, 40, 5, 99, 23, 64, 2]])


def test_exact_low_rank_delta_is_recovered_and_folds_back(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ΔW of exactly rank 3 on every linear weight, extracted at rank 3: error at rounding level
    (fp32 ~1e-7; 1e-5 allowed), and BASE+OUT folded by alloy reproduces FINETUNED's tensors."""
    base = tiny_root / "llama"
    deltas = linear_deltas(base, 3)
    norm = {"model.layers.0.input_layernorm.weight": torch.full((32,), 0.01)}
    ft = finetune(base, tmp_path / "ft", {**deltas, **norm})
    out = tmp_path / "lora"
    code, text = run(capsys, ft, base, out, "--rank", 3)
    assert code == 0, text
    assert "median" in text and "input_layernorm" in text and "not saved" in text
    data = report(out)
    assert {m["name"] for m in data["modules"]} == set(deltas)
    assert all(m["rank"] == 3 and m["error"] < 1e-5 for m in data["modules"])
    assert all(m["energy"] > 1 - 1e-6 for m in data["modules"])
    assert [f["name"] for f in data["full"]] == list(norm)
    with Checkpoint.open(base) as checkpoint:
        weight = checkpoint.read("model.layers.0.input_layernorm.weight")
        change = 0.01 * math.sqrt(32) / float(torch.linalg.norm(weight))
        assert data["full"][0]["change"] == pytest.approx(change, rel=1e-4)
        assert data["unchanged"] == len(checkpoint.tensors) - len(deltas) - 1
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["base_model_name_or_path"] == str(base)
    assert not config["fan_in_fan_out"] and (out / "tokenizer.json").is_file()
    with open_model(f"{base}+{out}") as folded, Checkpoint.open(ft) as tuned:
        for name in deltas:
            torch.testing.assert_close(folded.read(name), tuned.read(name), atol=2e-6, rtol=0)
    # bf16 factors: the error reported is that of the rounded factors (bf16's 2^-9 steps).
    again = tmp_path / "again"
    assert (
        run(capsys, ft, base, again, "--rank", 3, "--svd", "exact", "--dtype", "bfloat16")[0] == 0
    )
    assert all(m["svd"] == "exact" and 3e-4 < m["error"] < 1e-2 for m in report(again)["modules"])
    with Checkpoint.open(again / "adapter_model.safetensors") as saved:
        assert {saved.info(n).dtype for n in saved} == {torch.bfloat16}


def test_peft_loads_the_adapter_and_matches_the_folded_model(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rank-4 delta cut to rank 2 (not exact), plus a changed head and norm saved full: PEFT's
    logits equal the alloy-folded model's, and the error reported is the one measured."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_root / "llama"
    extra = {
        "lm_head.weight": torch.randn(128, 32, generator=torch.Generator().manual_seed(1)) * 0.01,
        "model.norm.weight": torch.full((32,), -0.02),
    }
    ft = finetune(base, tmp_path / "ft", {**linear_deltas(base, 4), **extra})
    out = tmp_path / "lora"
    assert run(capsys, ft, base, out, "--rank", 2, "--save-full")[0] == 0
    data = report(out)
    assert sorted(f["name"] for f in data["full"] if f["saved"]) == sorted(extra)
    assert all(0.05 < m["error"] < 1 for m in data["modules"])
    folded_dir = tmp_path / "folded"
    with open_model(f"{base}+{out}") as folded:
        save_state_dict({n: folded.read(n) for n in folded}, folded_dir, donor=base)
        adapter = read_adapter(out)
        with Checkpoint.open(ft) as tuned:
            for m in data["modules"]:
                delta = tuned.read(m["name"]) - Checkpoint.open(base).read(m["name"])
                missed = torch.linalg.norm(tuned.read(m["name"]) - folded.read(m["name"]))
                assert float(missed / torch.linalg.norm(delta)) == pytest.approx(m["error"], 1e-3)
    # modules_to_save "norm" makes PEFT wrap every *norm module: all of them are in the file.
    assert sorted(adapter.full) == sorted(
        ["lm_head.weight", "model.norm.weight"]
        + [f"model.layers.{k}.{n}.weight" for k in range(2) for n in NORMS]
    )
    assert any("unchanged tensors are saved too" in note for note in data["notes"])
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out
    )
    torch.testing.assert_close(logits(model, IDS), logits(folded_dir, IDS), atol=1e-4, rtol=1e-4)


def test_energy_picks_each_modules_rank(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Singular values (3, 2, 1): energies 9/14, 13/14, 1, so --energy 0.9 keeps rank 2 (0.929).
    Four equal ones: 0.25 per rank, so 0.9 needs all 4. Unchanged matrices get no module."""
    base = tiny_root / "llama"
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    deltas = {
        q: with_spectrum(32, 32, [0.3, 0.2, 0.1], 1),
        down: with_spectrum(32, 64, [0.1] * 4, 2),
    }
    ft = finetune(base, tmp_path / "ft", deltas)
    out = tmp_path / "lora"
    assert run(capsys, ft, base, out, "--energy", 0.9)[0] == 0
    modules = {m["name"]: m for m in report(out)["modules"]}
    assert sorted(modules) == sorted(deltas)
    assert modules[q]["rank"] == 2 and modules[q]["energy"] == pytest.approx(13 / 14, abs=1e-5)
    assert modules[q]["error"] == pytest.approx(math.sqrt(1 / 14), abs=1e-4)
    assert modules[down]["rank"] == 4 and modules[down]["error"] < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {**{k: config["r"] for k in config["target_modules"]}, **config["rank_pattern"]}
    assert {k.replace("\\", ""): v for k, v in ranks.items()} == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.down_proj": 4,
    }
    assert read_adapter(out).modules[q].rank == 2


def test_gpt2_conv1d_weights_are_transposed(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-2's Conv1D stores (in × out): the adapter says fan_in_fan_out and PEFT, with B·A in
    the (out × in) layout, reproduces FINETUNED's logits exactly (rank-2 deltas at rank 2). A
    changed LayerNorm bias is saved with --save-full (its module, ln_1, as a full copy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_root / "gpt2"
    deltas = linear_deltas(base, 2, transposed=True)
    assert any("c_attn" in n for n in deltas) and not any("wte" in n for n in deltas)
    bias = {"transformer.h.1.ln_1.bias": torch.full((32,), 0.05)}
    ft = finetune(base, tmp_path / "ft", {**deltas, **bias})
    out = tmp_path / "lora"
    assert run(capsys, ft, base, out, "--rank", 2, "--save-full")[0] == 0
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    data = report(out)
    assert all(m["error"] < 1e-5 for m in data["modules"]) and data["full"][0]["saved"]
    adapter = read_adapter(out)
    name = "transformer.h.0.attn.c_attn.weight"
    assert adapter.modules[name].transposed and adapter.modules[name].shape == (32, 96)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out
    )
    torch.testing.assert_close(logits(model, IDS), logits(ft, IDS), atol=1e-4, rtol=1e-4)


def test_left_out_tensors_are_listed_and_tied_embeddings_not_saved(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Excluded matrices and a tied embedding (qwen2): listed with their change; --save-full
    saves the excluded ones but not the tied embedding (PEFT would untie it), nor biases."""
    base = tiny_root / "qwen2"
    ft = finetune(
        base,
        tmp_path / "ft",
        {
            **linear_deltas(base, 1),
            "model.embed_tokens.weight": torch.full((128, 32), 0.01),
            "model.layers.0.self_attn.q_proj.bias": torch.full((32,), 0.01),
        },
    )
    out = tmp_path / "lora"
    code, text = run(capsys, ft, base, out, "--rank", 1, "--save-full", "--exclude", r"mlp\.")
    assert code == 0, text
    data = report(out)
    assert not any("mlp" in m["name"] for m in data["modules"])
    full = {f["name"]: f for f in data["full"]}
    assert "tied" in full["model.embed_tokens.weight"]["why"]
    assert "bias" in full["model.layers.0.self_attn.q_proj.bias"]["why"]
    mlp = [f for f in full.values() if ".mlp." in f["name"]]
    assert len(mlp) == 6 and all(f["saved"] for f in mlp) and len(data["excluded"]) == 6
    assert 0 < data["total_error"] < 1
    assert sorted(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) == [
        "down_proj",
        "gate_proj",
        "up_proj",
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("rank too large", ["k_proj", "--rank 17 exceeds", "--rank 16 or less"]),
        ("architectures", ["LlamaForCausalLM", "GPT2LMHeadModel", "only in FINETUNED"]),
        ("missing", ["FINETUNED", "BASE", "nowhere"]),
        ("exists", ["--force"]),
        ("options", ["give exactly one", "not a regular expression"]),
        ("energy", ["--energy", "(0, 1]"]),
        ("unchanged", ["no extracted linear weight differs"]),
        ("mergekit flag", ["--max-rank (a mergekit flag)", "--rank R"]),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(
    case: str,
    expected: list[str],
    tiny_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    llama, out = tiny_root / "llama", tmp_path / "out"
    args: list[object] = {
        "rank too large": [llama, llama, out, "--rank", 17],
        "architectures": [tiny_root / "gpt2", llama, out, "--rank", 2],
        "missing": [tmp_path / "nowhere", tmp_path / "nowhere-base", out, "--rank", 2],
        "exists": [llama, llama, tmp_path, "--rank", 2],
        "options": [llama, llama, out, "--rank", 2, "--energy", 0.5, "--include", "("],
        "energy": [llama, llama, out, "--energy", 1.5],
        "unchanged": [llama, llama, out, "--rank", 2],
        "mergekit flag": [llama, llama, out, "--max-rank", 2],
    }[case]
    if case == "exists":
        (tmp_path / "keep").write_text("x")
    code, text = run(capsys, *args)
    assert code == 2, text
    for word in expected:
        assert word in text, (word, text)
    assert not out.exists()
    if case == "rank too large":  # every too-small matrix is named, in one message
        assert text.count("exceeds") == 4  # k_proj and v_proj (16 × 32) of two layers


def test_randomized_svd_is_near_optimal_and_seeded() -> None:
    """On a slowly decaying spectrum (σ_k = k^-½, the hard case), four power iterations land
    within 0.1% of the exact truncation's error; same seed, same factors."""
    matrix = with_spectrum(384, 256, [k**-0.5 for k in range(1, 257)], 3).float()
    exact = truncate(matrix, rank=16)
    fast = randomized_truncate(matrix, 16)
    measured = float(torch.linalg.norm(matrix - fast.B @ fast.A) / torch.linalg.norm(matrix))
    assert measured == pytest.approx(fast.error, rel=1e-4)
    assert exact.error <= measured < exact.error * 1.001
    again = randomized_truncate(matrix, 16)
    assert torch.equal(again.A, fast.A) and torch.equal(again.B, fast.B)


def test_tensor_kinds() -> None:
    assert tensor_kind("model.layers.0.mlp.up_proj.weight", (64, 32)) == "linear"
    assert tensor_kind("transformer.h.0.attn.c_attn.weight", (32, 96)) == "linear"
    assert tensor_kind("model.embed_tokens.weight", (128, 32)) == "embedding"
    assert tensor_kind("transformer.wpe.weight", (128, 32)) == "embedding"
    assert tensor_kind("lm_head.weight", (128, 32)) == "head"
    assert tensor_kind("model.norm.weight", (32,)) == "norm"
    assert tensor_kind("model.layers.0.self_attn.q_proj.bias", (32,)) == "bias"
    assert tensor_kind("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 32)) == "other"
