"""Folding a PEFT adapter into its base tensor by tensor equals PEFT's own merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, VeraConfig
from tests.adapters.conftest import make_adapter

from alloy.adapters import open_model, read_adapter, split_spec
from alloy.errors import InputError

CASES = {
    "lora": (
        "llama",
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "rslora": ("llama", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"])),
    "patterns": (
        "llama",
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 16},
        ),
    ),
    "dora": ("llama", LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "gate_proj"])),
    "vera": ("llama", VeraConfig(r=8, target_modules=["q_proj", "up_proj"], save_projection=True)),
    "embedding": ("llama", LoraConfig(r=4, target_modules=["embed_tokens"])),
    "saved": ("llama", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "conv1d": ("gpt2", LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "conv1d_dora": (
        "gpt2",
        LoraConfig(r=4, use_dora=True, target_modules=["c_proj"], fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_matches_peft_merge_and_unload(case: str, tiny_root: Path, tmp_path: Path) -> None:
    arch, config = CASES[case]
    base = tiny_root / arch
    reference = make_adapter(base, tmp_path / "adapter", config, seed=3)
    with open_model(f"{base}+{tmp_path / 'adapter'}") as adapted:
        changed = 0
        for name in adapted:
            if name not in reference:
                continue  # e.g. GPT-2's lm_head, tied and not on disk
            got = adapted.read(name)
            assert got.dtype == reference[name].dtype
            torch.testing.assert_close(got, reference[name], rtol=1e-5, atol=1e-6, msg=name)
            changed += name in adapted.adapter.names
        assert changed == len(adapted.adapter.names) > 0
        # Row blocks fold to the same rows of the whole tensor.
        for name in adapted.adapter.modules:
            rows = adapted.info(name).shape[0]
            whole = adapted.read(name)
            torch.testing.assert_close(adapted.read(name, (1, rows - 1)), whole[1 : rows - 1])


def test_folded_tensors_really_change(tiny_root: Path, tmp_path: Path) -> None:
    base = tiny_root / "llama"
    make_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"]), seed=1)
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.modules) == [
        f"model.layers.{k}.self_attn.q_proj.weight" for k in range(2)
    ]
    with open_model(f"{base}+{tmp_path / 'a'}") as adapted, open_model(base) as plain:
        for name in adapted:
            same = torch.equal(adapted.read(name), plain.read(name))
            assert same == (name not in adapter.modules), name


def test_split_spec_prefers_an_existing_path_and_an_adapter_side(tmp_path: Path) -> None:
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert split_spec(plus) == (plus, None)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert split_spec(f"{plus}+{tmp_path / 'lora'}") == (plus, tmp_path / "lora")
    assert split_spec("x") == (Path("x"), None)


def test_adapter_of_another_base_shape_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    make_adapter(
        tiny_root / "gpt2",
        tmp_path / "g",
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    with pytest.raises(InputError) as info:
        open_model(f"{tiny_root / 'llama'}+{tmp_path / 'g'}")
    text = str(info.value) + "".join(str(p) for p in info.value.problems)
    assert "c_attn" in text and "another base" in text


def test_unsupported_and_broken_adapters_list_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "IA3", "lora_bias": true}')
    with pytest.raises(InputError) as info:
        read_adapter(folder)
    text = " ".join(str(p) for p in info.value.problems)
    assert "IA3" in text and "lora_bias" in text and "adapter_model.safetensors" in text
    with pytest.raises(InputError, match=r"no adapter_config\.json"):
        read_adapter(tmp_path)
