"""End to end: recipes through the CLI on tiny real checkpoints, reloaded with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from alloy.cli.main import main
from alloy.io import Checkpoint
from alloy.lab.tiny import build_tiny
from alloy.merge import merge_state_dicts


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama base and three fine-tunes of it (base + seeded noise), as folders."""
    root = tmp_path_factory.mktemp("family")
    base = build_tiny("llama", root / "base", seed=1)
    members = {"base": base}
    with Checkpoint.open(base) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt}
    for k, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(100 + k)
        tuned = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        folder = root / name
        from alloy.io import save_state_dict

        save_state_dict(tuned, folder, donor=base, max_shard_bytes=40_000)
        members[name] = folder
    return members


def _state(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def _write(tmp_path: Path, recipe: dict) -> Path:
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return file


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 33, 70, 2]])).logits


CASES = {
    "linear": ({"weight": [0.5, 0.3, 0.2]}, {}),
    "task_arithmetic": ({"weight": [1.0, -0.5, 0.5]}, {"lambda": 0.8}),
    "ties": ({"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.7]}, {}),
    "dare_linear": ({"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}, {}),
    "dare_ties": ({"weight": [1.0, 0.5, 0.7], "density": [0.6, 0.6, 0.6]}, {}),
    "breadcrumbs": ({"weight": [1.0, 1.0, 1.0], "density": [0.8, 0.8, 0.8]}, {}),
    "della": ({"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}, {}),
    "model_stock": ({}, {}),
}


def _case(
    method: str, family: dict[str, Path], seed: int, extra: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The recipe of CASES[method] over models a, b, c (and the base), and the in-memory merge
    of the same tensors that the recipe must reproduce."""
    per_model, shared = CASES[method]
    shared = {**shared, **(extra or {})}
    names = ["a", "b", "c"]
    uses_base = method != "linear"
    recipe: dict = {
        "merge_method": method,
        **({"base_model": str(family["base"])} if uses_base else {}),
        "models": [
            {
                "model": str(family[n]),
                **({"parameters": {k: v[i] for k, v in per_model.items()}} if per_model else {}),
            }
            for i, n in enumerate(names)
        ],
        "parameters": shared,
        "seed": seed,
    }
    expected = merge_state_dicts(
        method,
        [_state(family[n]) for n in names],
        base=_state(family["base"]) if uses_base else None,
        seed=seed,
        **per_model,
        **shared,
    )
    return recipe, expected


@pytest.mark.parametrize("method", list(CASES))
def test_cli_merge_equals_in_memory_merge(
    method: str, family: dict[str, Path], tmp_path: Path
) -> None:
    recipe, expected = _case(method, family, seed=3)
    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    got = _state(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert torch.isfinite(_logits(out)).all()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "mixtral"])
def test_ties_on_every_architecture(arch: str, tmp_path: Path) -> None:
    base = build_tiny(arch, tmp_path / "base", seed=1)
    a = build_tiny(arch, tmp_path / "a", seed=2)
    b = build_tiny(arch, tmp_path / "b", seed=3)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 1.0, "density": 0.5},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with Checkpoint.open(out) as merged, Checkpoint.open(base) as ref:
        assert set(merged.tensors) == set(ref.tensors)
        assert all(info.dtype == torch.bfloat16 for info in merged.tensors.values())
    assert torch.isfinite(_logits(out)).all()
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "ties" in card and str(a) in card


def test_slerp_gradient_reaches_both_endpoints(family: dict[str, Path], tmp_path: Path) -> None:
    """t: [0, 1] over 2 layers: layer 0 has t=0 (the base), layer 1 t=1 (the model).

    Tensors outside the layers take the gradient's first value, t=0, so they equal the base.
    """
    recipe = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["base"])}, {"model": str(family["a"])}],
        "parameters": {"t": [0.0, 1.0]},
    }
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    got, base, a = _state(out), _state(family["base"]), _state(family["a"])
    for name, tensor in got.items():
        expected = a[name] if name.startswith("model.layers.1.") else base[name]
        torch.testing.assert_close(tensor, expected, msg=name)


def test_filters_pick_values_by_tensor_name(family: dict[str, Path], tmp_path: Path) -> None:
    """weight 1 for attention tensors, 0 elsewhere: linear with b gives a's attention only."""
    recipe = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(family["a"]),
                "parameters": {"weight": [{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]},
            },
            {
                "model": str(family["b"]),
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]},
            },
        ],
    }
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    got, a, b = _state(out), _state(family["a"]), _state(family["b"])
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, a[name] if "self_attn" in name else b[name], msg=name)


def test_passthrough_slices_stack_layers(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family["a"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(family["b"]), "layer_range": [1, 2]}]},
        ],
    }
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    if "layer_types" in config:
        assert len(config["layer_types"]) == 3
    got, a, b = _state(out), _state(family["a"]), _state(family["b"])
    assert torch.equal(
        got["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # from the last slice
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3


def test_random_methods_are_deterministic(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
        "parameters": {"weight": 1.0, "density": 0.5},
        "seed": 11,
    }
    file = _write(tmp_path, recipe)
    assert main(["merge", str(file), str(tmp_path / "one"), "-q"]) == 0
    assert main(["merge", str(file), str(tmp_path / "two"), "-q"]) == 0
    for shard in (tmp_path / "one").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_dry_run_and_validate_write_nothing(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
        "parameters": {"weight": 1.0, "density": [0.2, 0.8]},
    }
    file = _write(tmp_path, recipe)
    assert main(["merge", str(file), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # One line per layer pattern, the gradient shown as its two ends.
    assert "model.layers.{0..1}.mlp.up_proj.weight  ties [1], [2] base [0]  t=0.0..1.0" in out
    assert "'density': ['0.2..0.8', '0.2..0.8']" in out and "(2 tensors)" in out
    assert "model.layers.1.mlp.up_proj.weight" not in out
    assert main(["merge", str(file), str(tmp_path / "out"), "--dry-run", "-v"]) == 0
    full = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj.weight" in full and "'density': [0.8, 0.8]" in full
    assert len(full.splitlines()) > len(out.splitlines())
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(file)]) == 0
    assert "ok: ties of 3 models" in capsys.readouterr().out


def test_bad_recipes_exit_2_naming_the_problem(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["a"]), "parameters": {"densty": 0.5, "weight": 1}}],
    }
    assert main(["merge", str(_write(tmp_path, recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "models[0].parameters.densty" in err and "density" in err
    recipe["models"] = [{"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1}}]
    assert main(["merge", str(_write(tmp_path, recipe)), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = build_tiny("llama", tmp_path / "base", seed=1)
    other = build_tiny("llama", tmp_path / "other", seed=2, vocab_size=120)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(other), "parameters": {"weight": 1.0}}],
    }
    assert main(["merge", str(_write(tmp_path, recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 120 tokens" in err and "does not merge different vocabularies" in err


def test_merge_does_not_import_transformers(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
        "parameters": {"weight": 1.0},
    }
    file = _write(tmp_path, recipe)
    code = (
        "import sys\nfrom alloy.cli.main import main\n"
        f"rc = main(['merge', {str(file)!r}, {str(tmp_path / 'out')!r}, '-q'])\n"
        "assert rc == 0, rc\nassert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("method", list(CASES))
def test_streamed_merge_equals_in_memory_merge(
    method: str, family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny blocks and no whole-tensor shortcut: every tensor streams through many blocks and
    all reduction passes, and the result is bit-identical to the in-memory merge (which uses the
    same canonical blocks, hence the same random draws)."""
    from alloy.merge import blocks
    from alloy.merge.api import plan
    from alloy.merge.engine import execute

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 100)
    recipe, expected = _case(method, family, 5, {"rescale": True} if method == "ties" else None)
    out = execute(plan(recipe), tmp_path / "out", whole_bytes=0, read_ahead_bytes=1000)
    got = _state(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_tokenizer_source_picks_the_tokenizer_files(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """Config from the base (the donor), tokenizer files and chat template from `b`."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(family["b"], b)
    (b / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["a"])}, {"model": str(b)}],
        "parameters": {"weight": 0.5},
        "tokenizer_source": str(b),
    }
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, recipe)), str(out), "-q"]) == 0
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    base_config = json.loads((family["base"] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base_config["vocab_size"]
    recipe["tokenizer_source"] = str(tmp_path / "missing")
    assert main(["merge", str(_write(tmp_path, recipe)), str(tmp_path / "out2"), "-q"]) == 2
