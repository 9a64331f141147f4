"""`alloy train` with `adapter:` (LoRA, DoRA, VeRA) and with the GaLore optimizer, on tiny
checkpoints: recipe and model checks before training, PEFT folders that reload to the trained
logits, base weights untouched, --merge, averaging, resume, GaLore against AdamW."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.train.conftest import write_recipe
from transformers import AutoModelForCausalLM

from alloy.cli.main import main
from alloy.errors import RecipeError
from alloy.train import load_train_recipe, train
from alloy.train.plan import plan_training

ADAPTER_NAMES = ("lora_", "vera_lambda", "modules_to_save")
# PeftModel reads transformers' deprecated is_gradient_checkpointing when the tests load OUT
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _recipe(start: Path, data_dir: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "objective": "causal_lm",
        "model": str(start),
        "data": [str(data_dir / "docs.jsonl")],
        "schedule": {"name": "constant", "lr": 1e-2},
        "max_steps": 3,
        "batch_size": 4,
        "sequence_length": 32,
        "adapter": {"type": "lora", "rank": 4, "alpha": 8},
    }
    recipe.update(changes)
    return {k: v for k, v in recipe.items() if v is not None}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        load_train_recipe(recipe)
    return "\n".join(str(p) for p in info.value.problems)


def _batch() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records the trained in-memory model (logits on `_batch()`, parameters) just before OUT
    is written."""
    import alloy.train.outputs as outputs

    seen: dict[str, Any] = {}
    original = outputs.write_outputs

    def spy(plan: Any, trainer: Any, *args: Any, **kwargs: Any) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=_batch()).logits  # (B, T, V)
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["averaged_bytes"] = {
            n: a.nbytes for n, a in (args[1].averagers if args[1] else {}).items()
        }
        original(plan, trainer, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_outputs", spy)
    return seen


def _peft_model(base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_batch()).logits


# ---- checks before training -------------------------------------------------------------------


def test_recipe_problems_name_their_keys(tiny_llama: Path, data_dir: Path) -> None:
    shape = _problems(
        _recipe(
            tiny_llama,
            data_dir,
            adapter={"type": "lorra", "rank": 0, "alpha": 0, "dropout": 1.0, "ranks": 4},
        )
    )
    for expected in [
        "adapter.type: Input should be 'lora', 'dora' or 'vera'",
        "adapter.rank: Input should be greater than or equal to 1",
        "adapter.alpha: Input should be greater than 0",
        "adapter.dropout: Input should be less than 1",
        "adapter.ranks: unknown key 'ranks' (did you mean 'rank'?",
    ]:
        assert expected in shape, expected
    vera = {"type": "vera", "alpha": 8, "use_rslora": True}
    text = _problems(
        _recipe(tiny_llama, data_dir, adapter=vera, averaging={"ema": {"trainable_only": False}})
    )
    assert "adapter.use_rslora: rsLoRA scales LoRA by alpha / sqrt(rank); VeRA has no alpha" in text
    assert "adapter.alpha: VeRA has no alpha" in text
    assert "averaging.ema.trainable_only: with an adapter only the adapter's parameters" in text
    lora = {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"], "vera": {}}
    text = _problems(
        _recipe(tiny_llama, data_dir, adapter=lora, optimizer={"name": "galore_adamw"})
    )
    assert "adapter.vera: applies to type: vera, not lora" in text
    assert "adapter.modules_to_save: 'lm_head' is also a target module" in text
    assert "optimizer.name: GaLore projects the gradients of full weight matrices" in text
    text = _problems(_recipe(tiny_llama, data_dir, adapter={"target_modules": "q_proj("}))
    assert "adapter.target_modules: not a regular expression" in text
    scratch = {"config": str(tiny_llama), "tokenizer": str(tiny_llama)}
    text = _problems(_recipe(tiny_llama, data_dir, model=scratch))
    assert "adapter: an adapter adapts a trained model (give model: PATH" in text
    text = _problems(_recipe(tiny_llama, data_dir, adapter=None, optimizer={"rank": 4}))
    assert "optimizer.rank: applies to galore_adamw only" in text


@pytest.mark.parametrize(
    "model, adapter, optimizer, expected",
    [
        (
            "llama",
            {"target_modules": ["q_proj", "q_prj"]},
            None,
            "adapter.target_modules.1: 'q_prj' matches no module of the model (did you mean "
            "'q_proj'? layer names: down_proj, embed_tokens, gate_proj, input_layernorm, k_proj",
        ),
        (
            "llama",
            {"target_modules": r".*\.attn\.q_proj"},
            None,
            r"adapter.target_modules: the regular expression '.*\\.attn\\.q_proj' matches no "
            "module name (it must match whole names, e.g. model.layers.0.self_attn.q_proj",
        ),
        (
            "llama",
            {"rank": 17},
            None,
            "adapter.rank: 17 is larger than model.layers.0.self_attn.k_proj's (16, 32) weight "
            "allows (its rank is at most 16) (set rank: 16 or lower",
        ),
        (
            "llama",
            {"target_modules": ["self_attn"]},
            None,
            "adapter.target_modules: matches modules lora cannot adapt: model.layers.0.self_attn "
            "(LlamaAttention), model.layers.1.self_attn (LlamaAttention) (lora adapts linear "
            "layers and embeddings: name those, e.g. model.layers.0.self_attn.q_proj",
        ),
        (
            "gpt2",
            {"type": "vera", "alpha": None, "target_modules": ["c_attn"]},
            None,
            "matches modules vera cannot adapt: transformer.h.0.attn.c_attn (Conv1D), "
            "transformer.h.1.attn.c_attn (Conv1D) (vera adapts linear layers (nn.Linear) only: "
            "name those, e.g. (this model has none)",
        ),
        (
            "llama",
            {"modules_to_save": ["lm_haed"]},
            None,
            "adapter.modules_to_save.0: 'lm_haed' matches no module (did you mean 'lm_head'?",
        ),
        (
            "llama",
            None,
            {"name": "galore_adamw", "target_modules": ["attention", "mlp"]},
            "optimizer.target_modules.0: 'attention' matches no linear layer of the model",
        ),
    ],
    ids=["typo", "regex", "rank", "block", "vera-conv1d", "saved", "galore"],
)
def test_targets_are_checked_against_the_model_by_validate(
    tiny_root: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    adapter: dict[str, Any] | None,
    optimizer: dict[str, Any] | None,
    expected: str,
) -> None:
    """`alloy validate` builds the model on the meta device and reports what PEFT or GaLore
    would fail on later, with the names that exist."""
    if adapter is not None:
        adapter = {k: v for k, v in {"rank": 4, "alpha": 8, **adapter}.items() if v is not None}
    recipe = _recipe(tiny_root / model, data_dir, adapter=adapter, optimizer=optimizer)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err


def test_train_refuses_before_loading_weights(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recipe(
        tmp_path / "r.yaml", _recipe(tiny_llama, data_dir, adapter={"target_modules": ["qproj"]})
    )
    assert main(["train", str(path), str(tmp_path / "out")]) == 2
    assert "adapter.target_modules.0: 'qproj' matches no module" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_llama, data_dir, adapter=None))
    assert main(["train", str(path), str(tmp_path / "out"), "--merge"]) == 2
    assert "--merge folds a trained adapter" in capsys.readouterr().err


def test_galore_without_its_package_is_a_recipe_error(
    tiny_llama: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "galore_torch" else find_spec(name, *a),
    )
    text = _problems(
        _recipe(tiny_llama, data_dir, adapter=None, optimizer={"name": "galore_adamw"})
    )
    assert (
        "optimizer.name: galore_adamw needs the galore-torch package (pip install 'alloy[galore]')"
        in text
    )


# ---- runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, changes",
    [
        (
            "lora",
            {
                "objective": "sft",
                "data": ["sft.jsonl"],
                "adapter": {
                    "rank": 4,
                    "alpha": 8,
                    "use_rslora": True,
                    "modules_to_save": ["lm_head"],
                },
            },
        ),
        (
            "dora",
            {
                "adapter": {
                    "type": "dora",
                    "rank": 4,
                    "alpha": 8,
                    "target_modules": ["q_proj", "v_proj"],
                }
            },
        ),
        (
            "vera",
            {
                "objective": "distill",
                "teacher": {"model": "mistral"},
                "adapter": {"type": "vera", "rank": 8, "target_modules": r".*\.(q|v)_proj"},
            },
        ),
    ],
)
def test_adapter_runs_write_peft_folders_that_reload_to_the_trained_model(
    tiny_root: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    changes: dict[str, Any],
) -> None:
    """Each objective with each adapter type: OUT loads with PeftModel.from_pretrained onto the
    start model and gives the trained model's logits; only adapter parameters trained (every
    frozen one still equals the start checkpoint); the plan predicted the trainable count and
    the modules PEFT adapted."""
    base = tiny_root / "llama"
    given = str(base)
    if kind == "dora":  # a relative start path is recorded as given
        monkeypatch.chdir(tiny_root)
        given = changes["model"] = "./llama"
    if "data" in changes:
        changes["data"] = [str(data_dir / d) for d in changes["data"]]
    if "teacher" in changes:
        changes["teacher"] = {"model": str(tiny_root / changes["teacher"]["model"])}
    recipe = _recipe(base, data_dir, **changes)  # changes["model"] wins
    plan = plan_training(load_train_recipe(recipe))
    assert plan.adapter is not None
    seen = _spy(monkeypatch)
    out = tmp_path / "out"
    result = train(recipe, out)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == given
    assert config["peft_type"] == ("VERA" if kind == "vera" else "LORA")
    assert {"tokenizer.json", "README.md", "training"} <= {p.name for p in out.iterdir()}
    assert not (out / "config.json").exists()
    loaded = _peft_model(base, out)
    torch.testing.assert_close(_logits(loaded), seen["logits"], atol=1e-5, rtol=1e-5)
    start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert not torch.allclose(_logits(start), seen["logits"], atol=1e-3)

    checkpoint = _tensors(base)
    frozen = {n: p for n, p in seen["params"].items() if n not in seen["trainable"]}
    for name, value in frozen.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, checkpoint[key.replace(".original_module", "")]), name
    assert seen["trainable"] and all(any(a in n for a in ADAPTER_NAMES) for n in seen["trainable"])
    trainable = sum(seen["params"][n].numel() for n in seen["trainable"])
    assert result.trainable_parameters == plan.adapter.trainable == trainable
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["trainable_parameters"] == trainable
    assert f"| trainable parameters | {trainable:,} of" in (out / "README.md").read_text()

    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, BaseTunerLayer)
    ]
    assert adapted == plan.adapter.modules
    saved = _tensors(out)
    if kind == "lora":  # rsLoRA: alpha / sqrt(rank), not alpha / rank
        assert config["use_rslora"] is True
        layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == 8 / math.sqrt(4)
        assert "base_model.model.lm_head.weight" in saved  # modules_to_save: trained in full
        assert len(adapted) == 14  # all-linear: 7 per layer, not the head
    if kind == "dora":
        assert config["use_dora"] is True and any("lora_magnitude_vector" in k for k in saved)
    if kind == "vera":  # the shared projections are in the file (save_projection)
        assert config["save_projection"] is True
        assert any("vera_A" in k for k in saved) and any("vera_B" in k for k in saved)


def test_merge_writes_the_folded_model_and_averages_only_the_adapter(
    tiny_llama: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _spy(monkeypatch)
    evaluation = {"data": [str(data_dir / "old.jsonl")], "max_tokens": 256, "at_start": False}
    recipe = _recipe(tiny_llama, data_dir, averaging={"ema": {"decay": 0.5}}, eval=evaluation)
    out = tmp_path / "out"
    assert (
        main(["train", "-q", str(write_recipe(tmp_path / "r.yaml", recipe)), str(out), "--merge"])
        == 0
    )
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), seen["logits"], atol=1e-5, rtol=1e-5)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "training" / "metrics.csv").is_file()
    # the run's last eval (of the adapted model in memory) is alloy eval's score of OUT
    from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer

    sets = load_eval_sets([data_dir / "old.jsonl"])
    (scores,) = evaluate(load_scorer(out), sets, EvalSettings(max_tokens=256)).values()
    with (out / "training" / "eval.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["perplexity"]) == pytest.approx(scores["perplexity"], rel=1e-5)
    # the EMA, folded too: the start model plus the averaged adapter, not the final one
    ema = _tensors(out / "averaged-ema")
    final, start = _tensors(out), _tensors(tiny_llama)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ema[name], final[name]) and not torch.equal(ema[name], start[name])
    assert torch.equal(ema["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    # the EMA held fp32 copies of the adapter's parameters only
    trainable = sum(seen["params"][n].numel() for n in seen["trainable"])
    assert seen["averaged_bytes"] == {"ema": 4 * trainable}


class _StopError(Exception):
    pass


def _stop_at(step: int) -> Any:
    def on_row(row: dict[str, Any]) -> None:
        if row["step"] == step:
            raise _StopError

    return on_row


def _resumed(recipe: dict[str, Any], tmp_path: Path, name: str) -> Path:
    """Train `recipe` (4 steps, checkpoints every 2) into tmp_path/name, stopped at step 3
    (checkpoint 2 complete), then resumed."""
    out = tmp_path / name
    with pytest.raises(_StopError):
        train(recipe, out, on_row=_stop_at(3))
    assert (tmp_path / f"{name}.checkpoints" / "checkpoint-2" / "alloy-complete").is_file()
    assert not out.exists()
    train(recipe, out, resume=True)
    return out


def test_a_stopped_adapter_run_resumes_to_the_same_adapter_and_average(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    """LoRA with dropout and gradient accumulation, an EMA of the adapter, stopped after its
    step-2 checkpoint: resuming gives the uninterrupted run's adapter and EMA bit for bit."""
    recipe = _recipe(
        tiny_llama,
        data_dir,
        adapter={"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        averaging={"ema": {"decay": 0.8}},
        checkpoints={"every": 2},
        micro_batch_size=2,
        max_steps=4,
    )
    whole = tmp_path / "whole"
    train(recipe, whole)
    cut = _resumed(recipe, tmp_path, "cut")
    for folder in ("", "averaged-ema"):
        a, b = _tensors(whole / folder), _tensors(cut / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # the average holds the adapter's tensors only
    assert _tensors(whole / "averaged-ema").keys() == _tensors(whole).keys()
    assert (whole / "averaged-ema" / "adapter_config.json").is_file()


def test_galore_trains_differs_from_adamw_and_resumes(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Same start, same rows: the first loss (before any update) is AdamW's, then GaLore's
    low-rank updates give other weights; the loss falls; a stopped run resumes bit for bit
    (its optimizer state holds GaLore's projectors)."""
    galore = {"name": "galore_adamw", "rank": 2, "update_proj_gap": 2, "scale": 0.25}
    recipe = _recipe(
        tiny_llama, data_dir, adapter=None, optimizer=galore, max_steps=4, checkpoints={"every": 2}
    )
    plan = plan_training(load_train_recipe(recipe))
    assert plan.galore is not None and len(plan.galore.targets) == 14  # attn + mlp, no head
    assert "optimizer: GaLore rank 2 on 14 weight matrices" in plan.summary()
    result = train(recipe, tmp_path / "galore")
    adamw = train({**recipe, "optimizer": {"name": "adamw"}}, tmp_path / "adamw")
    losses = [r["loss"] for r in result.metrics]
    assert losses[0] == pytest.approx(adamw.metrics[0]["loss"], rel=1e-6)
    assert losses[-1] < losses[0]
    name = "model.layers.0.self_attn.q_proj.weight"
    g, a = _tensors(tmp_path / "galore"), _tensors(tmp_path / "adamw")
    assert not torch.allclose(g[name], a[name], atol=1e-4)
    cut = _tensors(_resumed(recipe, tmp_path, "cut"))
    assert all(torch.equal(g[k], cut[k]) for k in g)
