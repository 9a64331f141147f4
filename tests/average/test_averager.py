"""WeightAverager: parity with torch.optim.swa_utils.AveragedModel, fp32 shadow of bf16 models,
tied weights, LaWA, hand-derived goldens, buffers, placement and errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import AutoModelForCausalLM

from alloy.average import WeightAverager, staging
from alloy.errors import InputError, OutputExistsError
from alloy.lab.tiny import tiny_model, tiny_tokenizer


def _step(model: nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """A stand-in for an optimizer step: seeded noise on every parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)


def _scalar_model(value: float) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _run_scalar(values: list[float], **options: object) -> float:
    model = _scalar_model(values[0])
    average = WeightAverager(model, **options)  # type: ignore[arg-type]
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    return average.averaged_state_dict()["weight"].item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ema", "swa"])
def test_matches_averaged_model(arch: str, method: Any) -> None:
    """fp32 models, 6 random updates: the same fused lerps as AveragedModel, so equal."""
    model = tiny_model(arch, seed=3)
    options: dict[str, Any] = {"decay": 0.9} if method == "ema" else {}
    ours = WeightAverager(model, method=method, **options)
    reference = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(0.9) if method == "ema" else None
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        _step(model, generator)
        ours.update(model)
        reference.update_parameters(model)
    expected = reference.module.state_dict()
    got = ours.averaged_state_dict()
    assert list(got) == list(model.state_dict())
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert ours.count == 6


def test_bf16_model_keeps_an_fp32_average() -> None:
    """A bf16 model drifting steadily (0.0005 per step, 100 steps): our fp32 EMA equals the fp32
    recursion over the bf16 weights bit for bit. A bf16 EMA (AveragedModel on the bf16 model)
    at decay 0.999 stalls: an update moves s by 0.001 * (x - s) <= 5e-5, below half a bf16 ulp
    (2^-14 = 6.1e-5) of any |s| >= 2^-6, so most weights never leave their first value."""
    model = tiny_model("mistral", seed=5)  # bf16
    assert next(model.parameters()).dtype == torch.bfloat16
    ours = WeightAverager(model, method="ema", decay=0.999)
    naive = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    params = list(model.parameters())
    first = [p.detach().clone() for p in params]
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).sign()
                 for i, p in enumerate(params)]  # fmt: skip
    reference: list[torch.Tensor] = []
    for t in range(100):
        with torch.no_grad():
            for p, x0, d in zip(params, first, direction, strict=True):
                p.copy_(x0.float() + 0.0005 * t * d)  # rounded to bf16, as training would
        ours.update(model)
        naive.update_parameters(model)
        if t == 0:
            reference = [p.detach().float().clone() for p in params]
        else:
            for s, p in zip(reference, params, strict=True):
                s.lerp_(p.detach().float(), 1 - 0.999)
    names = [n for n, _ in model.named_parameters()]
    got = ours.averaged_state_dict()
    naive_state = naive.module.state_dict()
    stalled = total = 0
    error = displacement = 0.0
    for name, expected, x0 in zip(names, reference, first, strict=True):
        # our fp32 average, read back in bf16, is the fp32 recursion rounded once
        assert torch.equal(got[name], expected.to(torch.bfloat16)), name
        stalled += int((naive_state[name] == x0).sum())
        total += x0.numel()
        error += float(((naive_state[name].float() - expected) ** 2).sum())
        displacement += float(((expected - x0.float()) ** 2).sum())
    shadow = ours._shadow  # the exact fp32 state
    assert all(s.dtype == torch.float32 for s in shadow)
    assert all(torch.equal(s, r) for s, r in zip(shadow, reference, strict=True))
    assert stalled / total > 0.7  # the bf16 EMA is stuck at the first weights ...
    assert (error / displacement) ** 0.5 > 0.5  # ... so it misses most of the true movement


def test_tied_weights_are_averaged_once() -> None:
    model = tiny_model("qwen2", seed=1)  # tied, fp16
    embed = model.get_input_embeddings().weight
    assert embed is model.get_output_embeddings().weight
    ours = WeightAverager(model, method="swa")
    assert len(ours._shadow) == len(list(model.parameters()))  # one slot for the tied pair
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        _step(model, generator)
        ours.update(model)
    state = ours.averaged_state_dict()
    tied = [name for name in model.state_dict() if "embed_tokens" in name or "lm_head" in name]
    assert len(tied) == 2 and state[tied[0]] is state[tied[1]]
    assert state[tied[0]].dtype == torch.float16


def test_lawa_is_the_mean_of_the_latest_snapshots() -> None:
    model = tiny_model("mistral", seed=2)  # bf16: snapshots are kept in bf16
    ours = WeightAverager(model, method="lawa", k=3, every=2)
    generator = torch.Generator().manual_seed(4)
    snapshots = []
    for _ in range(11):
        _step(model, generator)
        if ours.update(model):
            snapshots.append({n: t.clone() for n, t in model.state_dict().items()})
    assert len(snapshots) == 5  # steps 2, 4, 6, 8, 10
    assert all(t.dtype == torch.bfloat16 for ring in ours._ring for t in ring)
    assert ours.nbytes == 3 * sum(p.numel() * 2 for p in model.parameters())
    got = ours.averaged_state_dict()
    for name in got:
        mean = sum(s[name].float() for s in snapshots[-3:]) / 3
        torch.testing.assert_close(got[name], mean.to(torch.bfloat16), rtol=0, atol=0)


def test_lawa_before_the_ring_is_full() -> None:
    assert _run_scalar([1.0, 2.0, 4.0], method="lawa", k=5) == pytest.approx(7 / 3)
    assert _run_scalar([1.0, 2.0, 4.0], method="lawa", k=2) == pytest.approx(3.0)


def test_scalar_goldens() -> None:
    """Models x = 1, 2, 4 in turn.

    swa: (1 + 2 + 4) / 3 = 7/3.
    ema decay 0.5, copy init: s1 = 1, s2 = 1.5, s3 = 2.75.
    ema decay 0.5 + warm-up: beta_1 = 2/11, beta_2 = 3/12: s1 = 1,
        s2 = 2/11 + 9/11 * 2 = 20/11, s3 = 1/4 * 20/11 + 3/4 * 4 = 38/11.
    ema decay 0.5 + bias correction: s = .5, 1.25, 2.625; 1 - .5^n = .5, .75, .875:
        2.625 / .875 = 3 (= (1*1 + 2*2 + 4*4) / (1 + 2 + 4): weights 1:2:4).
    ema decay 0.5 + warm-up + bias correction: beta = 1/10, 2/11, 1/4:
        s1 = .9, s2 = 2/11 * .9 + 9/11 * 2 = 1.8, s3 = .45 + 3 = 3.45;
        prod beta = 1/220, so 3.45 / (219/220) = 759/219.
    """
    values = [1.0, 2.0, 4.0]
    assert _run_scalar(values, method="swa") == pytest.approx(7 / 3)
    assert _run_scalar(values, method="ema", decay=0.5) == pytest.approx(2.75)
    assert _run_scalar(values, method="ema", decay=0.5, warmup=True) == pytest.approx(38 / 11)
    assert _run_scalar(values, method="ema", decay=0.5, bias_correction=True) == pytest.approx(3)
    got = _run_scalar(values, method="ema", decay=0.5, warmup=True, bias_correction=True)
    assert got == pytest.approx(759 / 219)
    # bias correction after one update returns that model exactly
    assert _run_scalar([3.0], method="ema", decay=0.999, bias_correction=True) == pytest.approx(3)


def test_start_and_every_select_the_steps() -> None:
    """start=3, every=2: steps 3, 5 are averaged out of 1..6 (values = step): (3 + 5) / 2."""
    model = _scalar_model(0.0)
    ours = WeightAverager(model, method="swa", start=3, every=2)
    taken = []
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
        taken.append(ours.update(model))
    assert taken == [False, False, True, False, True, False]
    assert ours.averaged_state_dict()["weight"].item() == 4.0
    # an explicit step (Trainer's global_step) overrides the counter
    assert ours.update(model, step=7) and ours.step == 7


def test_staging_in_chunks_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny staging budget splits every tensor into many chunks: same result bit for bit."""
    results = []
    for budget in (1 << 18, 37):
        monkeypatch.setitem(staging.STAGING_ELEMENTS, "cpu", budget)
        model = tiny_model("mistral", seed=8)
        ours = WeightAverager(model, method="ema", decay=0.8)
        generator = torch.Generator().manual_seed(9)
        for _ in range(3):
            _step(model, generator)
            ours.update(model)
        assert ours._stager._scratch[torch.device("cpu")].numel() <= budget
        results.append([s.clone() for s in ours._shadow])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("method", ["ema", "swa"])
def test_compiled_cast_and_lerp_equals_staging(method: str) -> None:
    """compile=True (torch.compile fusing the bf16 -> fp32 cast into the lerp) gives the staged
    result to fp32 rounding; if this machine cannot compile, the warning and fallback path run
    and the result is exactly the staged one."""
    results = []
    for compiled in (False, True):
        model = tiny_model("mistral", seed=8)
        ours = WeightAverager(model, method=method, compile=compiled)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(9)
        for _ in range(4):
            _step(model, generator)
            ours.update(model)
        if compiled and shutil.which("c++"):  # inductor compiles C++ on CPU
            assert ours._stager.compiled
        results.append([s.clone() for s in ours._shadow])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compile_default_depends_on_model_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=None: staging for small models (the tests' tiny ones), the fused compiled path
    once the low-precision parameters reach AUTO_COMPILE_ELEMENTS (and a compiler exists);
    never for fp32 models, LaWA or an offloaded average."""
    from alloy.average import averager as averager_module

    model = tiny_model("mistral", seed=8)  # bf16
    assert not WeightAverager(model, method="ema")._stager.compiled
    monkeypatch.setattr(averager_module, "AUTO_COMPILE_ELEMENTS", 1)
    has_compiler = shutil.which("c++") is not None or shutil.which("g++") is not None
    assert WeightAverager(model, method="ema")._stager.compiled == has_compiler
    assert not WeightAverager(model, method="ema", offload=True)._stager.compiled
    assert not WeightAverager(model, method="lawa")._stager.compiled
    assert not WeightAverager(model.float(), method="ema")._stager.compiled
    assert not WeightAverager(model, method="ema", compile=False)._stager.compiled


def test_compile_failure_falls_back_to_staging() -> None:
    """A compiler error on the first update warns once, writes nothing, and staging does the
    update: the result equals the plain staged average exactly."""
    results = []
    for broken in (False, True):
        model = tiny_model("mistral", seed=8)
        ours = WeightAverager(model, method="ema", decay=0.9)
        if broken:

            def fail(*args: object) -> None:
                raise RuntimeError("no C++ compiler")

            ours._stager._compiled = fail
        generator = torch.Generator().manual_seed(9)
        for step in range(3):
            _step(model, generator)
            if broken and step == 1:
                with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
                    ours.update(model)
            else:
                ours.update(model)
        assert not ours._stager.compiled
        results.append([s.clone() for s in ours._shadow])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_new_parameter_storage_is_picked_up() -> None:
    """The staging plan is cached per storage: parameters given new storage (`.data = ...`,
    as `model.to()` does) are read from their new storage."""
    model = tiny_model("mistral", seed=3)
    ours = WeightAverager(model, method="swa")
    ours.update(model)
    before = {name: t.float() for name, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.data = (p.data.float() + 1).to(torch.bfloat16)
    ours.update(model)
    after = {name: t.float() for name, t in model.state_dict().items()}
    for name, tensor in ours.averaged_state_dict().items():
        expected = ((before[name] + after[name]) / 2).to(torch.bfloat16)
        assert torch.equal(tensor, expected), name


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("average_buffers", [False, True])
def test_buffers_follow_averaged_model(average_buffers: bool) -> None:
    """Floating buffers (BatchNorm statistics) as AveragedModel(use_buffers=...); the integer
    num_batches_tracked is the model's current one."""
    torch.manual_seed(0)
    model = _Net().train()
    ours = WeightAverager(model, method="ema", decay=0.7, average_buffers=average_buffers)
    reference = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(0.7), use_buffers=average_buffers
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(16, 4, generator=generator))  # moves the running statistics
        _step(model, generator)
        ours.update(model)
        reference.update_parameters(model)
    got = ours.averaged_state_dict()
    for name, tensor in reference.module.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    tracked = "body.1.num_batches_tracked"
    assert got[tracked].item() == model.state_dict()[tracked].item() == 4


def test_trainable_only_skips_frozen_parameters() -> None:
    model = _scalar_model(1.0)
    model.bias = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    ours = WeightAverager(model, method="swa", trainable_only=True)
    assert len(ours._shadow) == 1
    for value in (1.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(value * 10)
        ours.update(model)
    state = ours.averaged_state_dict()
    assert state["weight"].item() == 2.0 and state["bias"].item() == 30.0  # bias: current


def test_copy_to_and_offload() -> None:
    model = tiny_model("gpt2", seed=4)
    ours = WeightAverager(model, method="ema", decay=0.5, offload=True)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        _step(model, generator)
        ours.update(model)
    assert all(s.device.type == "cpu" for s in ours._shadow)
    expected = ours.averaged_state_dict()
    target = tiny_model("gpt2", seed=99)
    ours.copy_to(target)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert ours.averaged_state_dict()["lm_head.weight"] is not ours._shadow[0]  # no aliasing


def test_save_pretrained_writes_a_loadable_model(tmp_path: Path) -> None:
    model = tiny_model("qwen2", seed=6)
    ours = WeightAverager(model, method="ema", decay=0.5)
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        _step(model, generator)
        ours.update(model)
    tokenizer_folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tokenizer_folder)
    out = ours.save_pretrained(model, tmp_path / "avg", tokenizer=tokenizer_folder)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float16
    expected = ours.averaged_state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(OutputExistsError):
        ours.save_pretrained(model, out)
    ours.save_pretrained(model, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg", "tok"]  # no temporaries left


def test_option_errors_are_reported_together() -> None:
    model = _scalar_model(1.0)
    with pytest.raises(InputError) as info:
        WeightAverager(model, method="swa", decay=0.9, k=0, every=0)
    text = str(info.value)
    assert "decay: applies to method 'ema' only" in text
    assert "k: applies to method 'lawa' only" in text
    assert "every: must be at least 1" in text
    with pytest.raises(InputError, match="did you mean 'ema'"):
        WeightAverager(model, method="emaa")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"must be in \[0, 1\)"):
        WeightAverager(model, method="ema", decay=1.0)


def test_usage_errors() -> None:
    model = _scalar_model(1.0)
    ours = WeightAverager(model, method="ema", start=5)
    ours.update(model)
    with pytest.raises(InputError, match="no model has been averaged yet"):
        ours.averaged_state_dict()
    with pytest.raises(InputError, match="does not have the tensors"):
        ours.update(nn.Linear(2, 2), step=5)
    frozen = _scalar_model(1.0).requires_grad_(False)
    with pytest.raises(InputError, match="no floating parameters"):
        WeightAverager(frozen, method="swa", trainable_only=True)
