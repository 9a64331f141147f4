"""`BASE+ADAPTER` inputs of `alloy merge` and `alloy moe` equal the same recipes over folded models.

Each adapter is made with PEFT itself (random non-zero factors, tests/adapters/conftest.py), so
two references exist: PEFT's `merge_and_unload` state written to disk (`peft`), equal to ours to
float rounding, and alloy's own fold written to disk (`alloy`), which the merge must reproduce
bit for bit: the engine reads the same bytes either way, only later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig
from tests.adapters.conftest import make_adapter

from alloy.adapters import open_model
from alloy.cli.main import main
from alloy.io import save_state_dict
from alloy.lab.tiny import build_tiny
from alloy.merge.api import plan
from alloy.merge.engine import execute

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
# The second adapter changes the embeddings too (cheap_embed routing reads them) and the MLP.
LORA_EMBED = LoraConfig(r=2, target_modules=["embed_tokens", "gate_proj", "up_proj", "o_proj"])


def _state(folder: Path | str) -> dict[str, torch.Tensor]:
    with open_model(folder) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint}


@pytest.fixture(scope="module")
def models(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama base, two fine-tunes of it, two PEFT adapters on it, and each adapter folded
    to disk twice: by PEFT (`*_peft`) and by alloy (`*_alloy`)."""
    root = tmp_path_factory.mktemp("adapted")
    base = tiny_root / "llama"
    folders = {"base": base}
    state = _state(base)
    for k, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(40 + k)
        tuned = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        folders[name] = save_state_dict(tuned, root / name, donor=base)
    for name, config, seed in (("lora", LORA, 3), ("lora2", LORA_EMBED, 4)):
        reference = make_adapter(base, root / name, config, seed=seed)
        folders[name] = root / name
        peft_state = {n: reference[n].contiguous() for n in state}
        folders[f"{name}_peft"] = save_state_dict(peft_state, root / f"{name}_peft", donor=base)
        alloy_state = _state(f"{base}+{root / name}")
        folders[f"{name}_alloy"] = save_state_dict(alloy_state, root / f"{name}_alloy", donor=base)
    return folders


def _adapted(m: dict[str, Path], name: str = "lora") -> str:
    return f"{m['base']}+{m[name]}"


def _write(folder: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    file = folder / name
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return file


def _recipes(method: str, lora: str, m: dict[str, Path]) -> dict[str, Any]:
    """A recipe of `method` with `lora` (the adapted model, or a folded copy of it) among its
    models; for linear it is the first model, hence the donor of config and tokenizer."""
    base, a, b = str(m["base"]), str(m["a"]), str(m["b"])
    if method == "linear":
        entries = [(lora, 0.5), (a, 0.3), (b, 0.2)]
        return {
            "merge_method": "linear",
            "models": [{"model": p, "parameters": {"weight": w}} for p, w in entries],
        }
    if method == "ties":
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": lora, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": a, "parameters": {"weight": 0.7, "density": 0.6}},
            ],
        }
    assert method == "slerp"
    return {
        "merge_method": "slerp",
        "base_model": base,
        "models": [{"model": base}, {"model": lora}],
        "parameters": {"t": 0.4},
    }


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_merge_with_an_adapter_equals_merging_the_folded_model(
    method: str, models: dict[str, Path], tmp_path: Path
) -> None:
    outs = {}
    for variant in ("adapted", "lora_alloy", "lora_peft"):
        lora = _adapted(models) if variant == "adapted" else str(models[variant])
        recipe = _write(tmp_path, _recipes(method, lora, models), f"{variant}.yaml")
        outs[variant] = tmp_path / variant
        assert main(["merge", str(recipe), str(outs[variant]), "-q"]) == 0
    got, alloy, peft = (_state(outs[v]) for v in ("adapted", "lora_alloy", "lora_peft"))
    assert set(got) == set(alloy) == set(peft)
    for name, tensor in got.items():
        assert torch.equal(tensor, alloy[name]), name  # the same bytes as the folded model's
        torch.testing.assert_close(tensor, peft[name], rtol=1e-5, atol=1e-6, msg=name)
    # Side files come from BASE (for linear the adapted model is the donor).
    for side in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (outs["adapted"] / side).read_bytes() == (models["base"] / side).read_bytes()


def test_the_adapter_changes_the_merge(models: dict[str, Path], tmp_path: Path) -> None:
    """Guard against a vacuous equality: with the adapter the merge differs from the base's."""
    outs = []
    for k, lora in enumerate([_adapted(models), str(models["base"])]):
        recipe = _write(tmp_path, _recipes("ties", lora, models), f"{k}.yaml")
        outs.append(tmp_path / f"out{k}")
        assert main(["merge", str(recipe), str(outs[-1]), "-q"]) == 0
    with_adapter, without = _state(outs[0]), _state(outs[1])
    differ = {n for n in with_adapter if not torch.equal(with_adapter[n], without[n])}
    adapted = ("q_proj.weight", "v_proj.weight", "down_proj.weight")
    assert differ and all(name.endswith(adapted) for name in differ)


def test_streamed_row_blocks_fold_like_whole_tensors(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """With every tensor streamed block by block (whole_bytes=0) the adapted input still gives
    the folded model's bytes: each block folds only its rows of B·A."""
    outs = {}
    for variant in ("adapted", "lora_alloy"):
        lora = _adapted(models) if variant == "adapted" else str(models[variant])
        merge_plan = plan(_recipes("ties", lora, models))
        outs[variant] = execute(merge_plan, tmp_path / variant, whole_bytes=0)
    got, expected = _state(outs["adapted"]), _state(outs["lora_alloy"])
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_model_card_names_and_hashes_base_and_adapter(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import hashlib

    recipe = _write(tmp_path, _recipes("ties", _adapted(models), models))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    weights = models["lora"] / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    row = f"| model adapter | `{models['lora']}` | adapter_model.safetensors | `{digest}` |"
    assert row in card
    assert f"| model | `{models['base']}` | model-00001-of-" in card
    assert _adapted(models) in card  # the recipe, as written


def test_validate_and_dry_run_accept_base_plus_adapter(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapted = _adapted(models)
    recipe = {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "slices": [
            {
                "sources": [
                    {"model": str(models["base"]), "layer_range": [0, 2]},
                    {"model": adapted, "layer_range": [0, 2]},
                    {"model": f"{models['a']}+{models['lora']}", "layer_range": [0, 2]},
                ]
            }
        ],
        "parameters": {"weight": 1.0, "density": 0.5},
        "tokenizer_source": adapted,
    }
    file = _write(tmp_path, recipe)
    assert main(["validate", str(file)]) == 0
    assert capsys.readouterr().out.startswith("ok: ties of 3 models")
    out = tmp_path / "out"
    assert main(["merge", str(file), str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"[1] {adapted}  (LORA adapter folded into 6 tensors on read)" in printed
    assert not out.exists()


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "validate"])
def test_missing_parts_are_named_under_their_yaml_key(
    command: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_adapter = f"{models['base']}+{tmp_path / 'no-lora'}"
    missing_base = f"{tmp_path / 'no-base'}+{models['lora']}"
    recipe = _recipes("ties", missing_adapter, models)
    recipe["models"][1]["model"] = missing_base
    file = _write(tmp_path, recipe)
    out = tmp_path / "out"
    err = _fails([command, str(file), *([str(out)] if command == "merge" else [])], capsys)
    no_lora, no_base = tmp_path / "no-lora", tmp_path / "no-base"
    assert f"models[0].model: {missing_adapter}: no such adapter folder {no_lora}" in err
    assert f"models[1].model: {missing_base}: no such base model folder {no_base}" in err
    assert "no such model folder" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


def test_adapter_of_another_base_shape_exits_2_naming_the_tensor(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = build_tiny("llama", tmp_path / "wide", seed=5, hidden_size=48)
    make_adapter(wide, tmp_path / "wide-lora", LoraConfig(r=2, target_modules=["q_proj"]))
    recipe = _recipes("ties", f"{models['base']}+{tmp_path / 'wide-lora'}", models)
    file = _write(tmp_path, recipe)
    out = tmp_path / "out"
    for args in (["merge", str(file), str(out)], ["validate", str(file)]):
        err = _fails(args, capsys)
        assert "models[0].model: " in err and "does not fit" in err
        assert "model.layers.0.self_attn.q_proj.weight: adapter implies shape (48, 48)" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "wide", "wide-lora"]


def _moe(base: str, experts: list[str], gate_mode: str) -> dict[str, Any]:
    return {
        "base_model": base,
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": [
            {"source_model": e, "name": f"e{i}", "positive_prompts": [f"topic {i} text"]}
            for i, e in enumerate(experts)
        ],
    }


@pytest.mark.parametrize("gate_mode", ["random", "hidden", "cheap_embed"])
def test_moe_with_adapted_experts_equals_moe_of_folded_experts(
    gate_mode: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Experts (and, for the routers that read the base model, the base) given as BASE+ADAPTER
    give the bytes of the same MoE built from the folded folders."""
    base = str(models["base"])
    adapted = [_adapted(models), _adapted(models, "lora2"), base]
    folded = [str(models["lora_alloy"]), str(models["lora2_alloy"]), base]
    # hidden / cheap_embed read the base model itself: make that an adapted one too.
    routed_base = {"adapted": adapted[1], "folded": folded[1]} if gate_mode != "random" else {}
    outs = {}
    for variant, experts in (("adapted", adapted), ("folded", folded)):
        recipe = _moe(routed_base.get(variant, base), experts, gate_mode)
        file = _write(tmp_path, recipe, f"{variant}.yaml")
        assert main(["validate", str(file)]) == 0
        outs[variant] = tmp_path / variant
        assert main(["moe", str(file), str(outs[variant]), "--no-report"]) == 0
    capsys.readouterr()
    got, expected = _state(outs["adapted"]), _state(outs["folded"])
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((outs["adapted"] / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    card = (outs["adapted"] / "README.md").read_text()
    assert f"| expert adapter | `{models['lora']}` | adapter_model.safetensors |" in card
    tokenizer = (outs["adapted"] / "tokenizer.json").read_bytes()
    assert tokenizer == (models["base"] / "tokenizer.json").read_bytes()


def test_moe_missing_adapter_is_named_under_its_key(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{models['base']}+{tmp_path / 'nothing'}"
    file = _write(tmp_path, _moe(str(models["base"]), [_adapted(models), missing], "random"))
    err = _fails(["moe", str(file), str(tmp_path / "out")], capsys)
    assert f"experts.1.source_model: {missing}: no such adapter folder" in err
    assert not (tmp_path / "out").exists()


def test_scorer_of_base_plus_adapter_is_the_folded_model(models: dict[str, Path]) -> None:
    from alloy.eval.scorer import load_scorer

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    mask = torch.ones_like(ids)
    adapted = load_scorer(_adapted(models, "lora2"))
    folded = load_scorer(models["lora2_alloy"])
    plain = load_scorer(models["base"])
    got = adapted.token_logprobs(ids, mask)
    assert torch.equal(got, folded.token_logprobs(ids, mask))
    assert not torch.equal(got, plain.token_logprobs(ids, mask))
    assert adapted.name == _adapted(models, "lora2")


CONV1D = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)


@pytest.mark.parametrize(("arch", "config"), [("llama", LORA), ("gpt2", CONV1D)])
@pytest.mark.parametrize("chunk", [None, 100])
def test_any_split_of_rows_folds_to_the_same_bits(
    arch: str,
    config: Any,
    chunk: int | None,
    tiny_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine reads a tensor whole or in row blocks of any size: each split must give the
    bits of the whole read (a lone row too, which torch would send to gemv), also when the
    fold's own chunks (FOLD_ELEMENTS; 100: 1-3 rows) are smaller than the blocks."""
    from alloy.adapters import adapted as module

    if chunk is not None:
        monkeypatch.setattr(module, "FOLD_ELEMENTS", chunk)
    make_adapter(tiny_root / arch, tmp_path / "a", config, seed=2)
    with open_model(f"{tiny_root / arch}+{tmp_path / 'a'}") as adapted:
        for name in adapted.adapter.modules:
            whole = adapted.read(name)
            rows = whole.shape[0]
            for size in (1, 2, 3, 7):
                parts = [adapted.read(name, (a, min(a + size, rows))) for a in range(0, rows, size)]
                assert torch.equal(torch.cat(parts), whole), (name, size)


def test_cli_eval_and_generate_take_base_plus_adapter(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`alloy eval` and `alloy generate` (a model or an ensemble member) accept `BASE+ADAPTER` and
    give what the folded model on disk gives."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    scores = {}
    for label, model in (("adapted", _adapted(models, "lora2")), ("folded", models["lora2_alloy"])):
        out = tmp_path / f"{label}.json"
        assert main(["eval", str(model), "--data", str(text), "--json", str(out)]) == 0
        (row,) = json.loads(out.read_text())["results"].values()
        scores[label] = row
    assert scores["adapted"] == scores["folded"]
    lines = {}
    member = {"rule": "linear", "members": [{"model": _adapted(models, "lora2")}]}
    recipe = _write(tmp_path, member, "ensemble.yaml")
    targets = (("adapted", _adapted(models, "lora2")), ("recipe", str(recipe)))
    for label, target in (*targets, ("folded", str(models["lora2_alloy"]))):
        out = tmp_path / f"{label}.jsonl"
        argv = ["generate", target, "-p", "the quick", "--max-new-tokens", "6", "--out", str(out)]
        assert main(argv) == 0
        lines[label] = json.loads(out.read_text())["text"]
    assert lines["adapted"] == lines["folded"] == lines["recipe"]
    capsys.readouterr()
    missing = f"{models['base']}+{tmp_path / 'nothing'}"
    for command in (["eval", missing, "--data", str(text)], ["generate", missing, "-p", "x"]):
        assert "no adapter folder" in _fails(command, capsys)
