"""`alloy lora merge`: exact sums of adapters, task-vector merges of their updates, folding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from tests.adapters.conftest import make_adapter
from transformers import AutoModelForCausalLM

from alloy.adapters import open_model, read_adapter
from alloy.adapters.combine import combine_adapters
from alloy.cli.main import main
from alloy.errors import InputError
from alloy.io import Checkpoint, save_state_dict

QV = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def two(tiny_root: Path, tmp_path: Path):
    """Two random adapters on the tiny llama (one rsLoRA), with PEFT's folded states."""
    base = tiny_root / "llama"
    a = make_adapter(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=QV), seed=1)
    b = make_adapter(
        base,
        tmp_path / "b",
        LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"]),
        seed=2,
    )
    with Checkpoint.open(base) as checkpoint:
        w = {n: checkpoint.read(n) for n in checkpoint}
    return base, tmp_path / "a", tmp_path / "b", w, a, b


def _dense(w, states, weights):
    return {
        n: w[n] + sum(c * (s[n] - w[n]) for c, s in zip(weights, states, strict=True)) for n in w
    }


def _folded(spec: str) -> dict[str, torch.Tensor]:
    with open_model(spec) as checkpoint:
        return {n: checkpoint.read(n) for n in checkpoint}


def test_sum_is_the_exact_weighted_sum_of_the_updates(two, tmp_path: Path) -> None:
    base, a, b, w, sa, sb = two
    result = combine_adapters([a, b], tmp_path / "sum", [0.7, -0.4])
    expected = _dense(w, [sa, sb], [0.7, -0.4])
    got = _folded(f"{base}+{tmp_path / 'sum'}")
    for name in w:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 6  # stacked 4 + 2
    assert ranks["model.layers.0.self_attn.v_proj.weight"] == 4
    assert ranks["model.layers.0.self_attn.o_proj.weight"] == 2
    assert all(m.energy == 1.0 and m.error == 0.0 for m in result.modules)


def test_linear_normalises_the_weights(two, tmp_path: Path) -> None:
    base, a, b, w, sa, sb = two
    combine_adapters([a, b], tmp_path / "lin", [3.0, 1.0], method="linear")
    expected = _dense(w, [sa, sb], [0.75, 0.25])
    got = _folded(f"{base}+{tmp_path / 'lin'}")
    for name in w:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_peft_linear_combination_is_not_the_weighted_sum_but_cat_matches_ours(
    tiny_root: Path, tmp_path: Path
) -> None:
    """PEFT scales A and B by √w each and adds them (cross terms B_i A_j); `cat` stacks ranks."""
    base = tiny_root / "llama"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    sa = make_adapter(base, tmp_path / "a", config, seed=1)
    sb = make_adapter(base, tmp_path / "b", config, seed=2)
    weights = [0.5, 0.5]
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ours", weights)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, tmp_path / "a", adapter_name="a")
    peft.load_adapter(tmp_path / "b", adapter_name="b")
    for kind in ("linear", "cat"):
        peft.add_weighted_adapter(["a", "b"], weights, kind, combination_type=kind)
    name = "model.layers.0.self_attn.q_proj.weight"
    with Checkpoint.open(base) as checkpoint:
        w = checkpoint.read(name)
    true_delta = 0.5 * (sa[name] - w) + 0.5 * (sb[name] - w)
    layer = peft.get_submodule(f"base_model.model.{name.removesuffix('.weight')}")
    errors = {
        kind: float((layer.get_delta_weight(kind) - true_delta).norm() / true_delta.norm())
        for kind in ("linear", "cat")
    }
    ours = _folded(f"{base}+{tmp_path / 'ours'}")[name] - w
    assert float((ours - true_delta).norm() / true_delta.norm()) < 1e-5
    assert errors["cat"] < 1e-5
    assert errors["linear"] > 0.1, errors


def test_ties_on_updates_folded_equals_alloy_merge_of_folded_models(
    two, tmp_path: Path, capsys
) -> None:
    base, a, b, w, sa, sb = two
    for name, state in (("fa", sa), ("fb", sb)):
        save_state_dict(state, tmp_path / name, donor=base)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {tmp_path / 'fa'}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {tmp_path / 'fb'}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
        "dtype: float32\n"
    )
    assert main(["merge", str(recipe), str(tmp_path / "merged"), "-q"]) == 0
    args = [
        "lora",
        "merge",
        str(a),
        str(b),
        str(tmp_path / "tied"),
        "--weights",
        "0.6,0.4",
        "--method",
        "ties",
        "-p",
        "density=0.5",
        "--base",
        str(base),
        "--fold",
    ]
    assert main(args) == 0, capsys.readouterr().err
    reference = _folded(str(tmp_path / "merged"))
    got = _folded(str(tmp_path / "tied"))
    for name in w:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(got[n], w[n]) for n in w)


def test_dense_methods_truncate_and_report_the_energy_kept(two, tmp_path: Path) -> None:
    base, a, b, w, _sa, _sb = two
    full = combine_adapters(
        [a, b], tmp_path / "r32", method="ties", base=base, rank=32, params={"density": 0.5}
    )
    cut = combine_adapters(
        [a, b], tmp_path / "r1", method="ties", base=base, rank=1, params={"density": 0.5}
    )
    assert all(m.error < 1e-4 for m in full.modules)  # rank = min dimension: exact
    assert all(m.rank == 1 for m in cut.modules)
    for m in cut.modules:
        assert m.error == pytest.approx((1 - m.energy) ** 0.5, abs=1e-6)
        assert 0 < m.energy < 1
    exact = _folded(f"{base}+{tmp_path / 'r32'}")
    truncated = _folded(f"{base}+{tmp_path / 'r1'}")
    m = cut.modules[0]
    true = exact[m.name] - w[m.name]
    measured = float((truncated[m.name] - exact[m.name]).norm() / true.norm())
    assert measured == pytest.approx(m.error, rel=1e-3)


def test_energy_picks_the_rank_per_module(two, tmp_path: Path) -> None:
    _base, a, b, *_ = two
    result = combine_adapters([a, b], tmp_path / "e", energy=0.9)
    for m in result.modules:
        assert m.energy >= 0.9 - 1e-9
        assert m.rank is not None and m.rank >= 1
    config = read_adapter(tmp_path / "e").config
    ranks = {m.rank for m in result.modules}
    assert len(ranks) == 1 or config["rank_pattern"]


def test_output_loads_in_peft_with_the_folded_logits(two, tmp_path: Path) -> None:
    base, a, b, *_ = two
    assert main(["lora", "merge", str(a), str(b), str(tmp_path / "m"), "-q"]) == 0
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, tmp_path / "m")
    folded = save_state_dict(_folded(f"{base}+{tmp_path / 'm'}"), tmp_path / "f", donor=base)
    reference = AutoModelForCausalLM.from_pretrained(folded, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_conv1d_adapters_sum_exactly(tiny_root: Path, tmp_path: Path) -> None:
    base = tiny_root / "gpt2"
    cfg = LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    sa = make_adapter(base, tmp_path / "a", cfg, seed=4)
    sb = make_adapter(base, tmp_path / "b", cfg, seed=5)
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "s", [1.0, 2.0])
    got = _folded(f"{base}+{tmp_path / 's'}")
    with Checkpoint.open(base) as checkpoint:
        w = {n: checkpoint.read(n) for n in checkpoint}
    expected = _dense(w, [sa, sb], [1.0, 2.0])
    for name in w:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert read_adapter(tmp_path / "s").config["fan_in_fan_out"] is True


def test_fold_command_matches_peft_merge_and_unload(tiny_root: Path, tmp_path: Path, capsys):
    base = tiny_root / "llama"
    ref = make_adapter(base, tmp_path / "d", LoraConfig(r=2, use_dora=True, target_modules=QV))
    assert main(["lora", "fold", str(base), str(tmp_path / "d"), str(tmp_path / "out")]) == 0
    got = _folded(str(tmp_path / "out"))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "out" / "config.json").is_file()
    assert main(["lora", "fold", str(base), str(tmp_path / "d"), str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err


def test_bad_requests_exit_2_listing_every_problem_and_write_nothing(
    two, tiny_root: Path, tmp_path: Path, capsys
) -> None:
    base, a, b, *_ = two
    dora = tmp_path / "dora"
    make_adapter(base, dora, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    out = tmp_path / "never"
    args = [
        "lora",
        "merge",
        str(a),
        str(b),
        str(dora),
        str(out),
        "--weights",
        "1,2",
        "--method",
        "tis",
        "--rank",
        "2",
        "--energy",
        "0.5",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    for expected in ("3 adapters", "ties", "not both", "need the base"):
        assert expected in err, (expected, err)
    assert not out.exists()
    assert main(["lora", "merge", str(a), str(out), "--method", "ties", "-p", "densty=0.5"]) == 2
    assert "density" in capsys.readouterr().err
    assert main(["lora", "merge", str(a), str(out), "--fold"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["lora", "merge", str(a), str(tiny_root / "llama"), str(out)]) == 2
    assert "model folder, not an adapter" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(InputError, match="adapter"):
        combine_adapters([a], tmp_path / "x", method="ties", params={"weight": 1.0})
