"""Upcycling dense models into Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints, end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.errors import IncompatibleModelsError, OutputExistsError
from alloy.io import Checkpoint
from alloy.moe.recipe import upcycle_recipe
from alloy.moe.upcycle import RECIPE_FILE, upcycle

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


def recipe(base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    return {
        "base_model": str(base),
        "gate_mode": "random",
        "experts": [
            {"source_model": str(e), "name": f"e{i}", "positive_prompts": [f"text {i}"]}
            for i, e in enumerate(experts)
        ],
        **extra,
    }


@pytest.mark.parametrize(
    ("arch", "expected"), [("llama", "Mixtral"), ("mistral", "Mixtral"), ("qwen3", "Qwen3Moe")]
)
def test_identical_experts_give_the_dense_model(
    arch: str, expected: str, dense: dict[str, Path], tmp_path: Path
) -> None:
    base = dense[arch] / "base"
    spec = recipe(base, [base, base, base], gate_mode="random", experts_per_token=2)
    result = upcycle(spec, tmp_path / "moe")
    assert any("same model without noise" in w for w in result.plan.warnings)
    moe, dense_model = load(tmp_path / "moe"), load(base)
    assert type(moe).__name__ == f"{expected}ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, dense_model(IDS).logits, rtol=1e-4, atol=1e-5)
        greedy = moe.generate(IDS, max_new_tokens=6, do_sample=False)
        assert torch.equal(greedy, dense_model.generate(IDS, max_new_tokens=6, do_sample=False))


def test_layout_config_and_side_files(dense: dict[str, Path], tmp_path: Path) -> None:
    folder = dense["llama"]
    spec = recipe(folder / "base", [folder / "expert", folder / "base"], experts_per_token=1)
    spec["experts"][0]["residual_scale"] = 0.5
    result = upcycle(spec, tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (2, 1)
    assert config["dtype"] == "float32" and "mlp_bias" not in config
    assert {"tokenizer.json", "README.md", RECIPE_FILE} <= {
        p.name for p in (tmp_path / "moe").iterdir()
    }
    with (
        Checkpoint.open(tmp_path / "moe") as out,
        Checkpoint.open(folder / "expert") as expert,
        Checkpoint.open(folder / "base") as base,
    ):
        assert not any(".mlp." in name for name in out.tensors)
        for layer in range(2):
            moe = f"model.layers.{layer}.block_sparse_moe"
            mlp = f"model.layers.{layer}.mlp"
            assert torch.equal(
                out.read(f"{moe}.experts.0.w1.weight"), expert.read(f"{mlp}.gate_proj.weight")
            )
            assert torch.equal(
                out.read(f"{moe}.experts.0.w3.weight"), expert.read(f"{mlp}.up_proj.weight")
            )
            assert torch.equal(
                out.read(f"{moe}.experts.0.w2.weight"), 0.5 * expert.read(f"{mlp}.down_proj.weight")
            )
            assert torch.equal(
                out.read(f"{moe}.experts.1.w2.weight"), base.read(f"{mlp}.down_proj.weight")
            )
            assert torch.equal(out.read(f"{moe}.gate.weight"), result.routers[layer])
            attention = f"model.layers.{layer}.self_attn.q_proj.weight"
            assert torch.equal(out.read(attention), base.read(attention))


def test_sparse_upcycling_is_seeded_and_relative(dense: dict[str, Path], tmp_path: Path) -> None:
    base = dense["llama"] / "base"

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    upcycle(upcycle_recipe(base, 4, relative_noise=0.05, seed=3), tmp_path / "a")
    upcycle(upcycle_recipe(base, 4, relative_noise=0.05, seed=3), tmp_path / "b")
    upcycle(upcycle_recipe(base, 4, relative_noise=0.05, seed=4), tmp_path / "c")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    with Checkpoint.open(tmp_path / "a") as out, Checkpoint.open(base) as dense_ckpt:
        source = dense_ckpt.read("model.layers.1.mlp.up_proj.weight")
        copies = [
            out.read(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight") for e in range(4)
        ]
    for copy in copies:
        ratio = float((copy - source).std() / source.std())
        assert 0.04 < ratio < 0.06
    assert not torch.equal(copies[0], copies[1])


def test_qwen2_moe_with_shared_expert(dense: dict[str, Path], tmp_path: Path) -> None:
    folder = dense["qwen2"]
    spec = recipe(folder / "base", [folder / "base", folder / "expert"], gate_mode="hidden")
    spec["shared_experts"] = [{"source_model": str(folder / "base"), "positive_prompts": ["text"]}]
    upcycle(spec, tmp_path / "moe")
    moe = load(tmp_path / "moe")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert moe.config.tie_word_embeddings is True
    assert moe.config.norm_topk_prob is True
    with Checkpoint.open(tmp_path / "moe") as out, Checkpoint.open(folder / "base") as base:
        shared = out.read("model.layers.0.mlp.shared_expert.down_proj.weight")
        assert torch.equal(shared, base.read("model.layers.0.mlp.down_proj.weight").float().half())
        gate = out.read("model.layers.0.mlp.shared_expert_gate.weight")
        assert gate.shape == (1, 32) and abs(float(gate.float().norm()) - 1) < 1e-2
    with torch.no_grad():
        assert moe.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 14)


def test_incompatible_inputs_are_listed_and_nothing_is_written(
    dense: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "moe"
    qwen = dense["qwen2"]
    spec = recipe(dense["llama"] / "base", [dense["llama"] / "expert", qwen / "expert"])
    with pytest.raises(IncompatibleModelsError) as caught:
        upcycle(spec, out)
    message = str(caught.value)
    assert "a qwen2 model, the base is llama" in message
    assert "vocabulary" in message or "architecture" in message
    assert not out.exists()
    with pytest.raises(IncompatibleModelsError, match="qwen has a shared expert"):
        upcycle(recipe(qwen / "base", [qwen / "base", qwen / "expert"]), out)
    with pytest.raises(IncompatibleModelsError, match="a qwen3 model cannot become mixtral"):
        upcycle(
            recipe(dense["qwen3"] / "base", [dense["qwen3"] / "base"] * 2, architecture="mixtral"),
            out,
        )
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        upcycle(recipe(dense["llama"] / "base", [dense["llama"] / "expert"] * 2), out)
    assert (out / "keep.txt").read_text() == "mine"
