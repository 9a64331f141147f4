"""The contract every registered merge method keeps, checked from its spec alone.

The matrix runs over `all_methods()`, so a new method file is covered without touching this
file: valid inputs are built from the method's spec (model counts, per-model and required shared
parameters), then the output must be finite, keep the inputs' shape and dtype, leave the inputs
alone, be reproducible under a seeded generator, and satisfy every property the method declares.
"""

from __future__ import annotations

import sys
import types
from typing import Annotated, Any

import pytest
import torch
from torch.testing import assert_close

from alloy.merge import registry
from alloy.merge.blocks import Elementwise
from alloy.merge.registry import REQUIRED, MethodSpec, all_methods, merge_method
from alloy.ranges import ANY

METHODS = all_methods()
NAMES = sorted(METHODS)

# Sensible values of known parameters; unknown ones fall back to their default (or 0.5).
PER_MODEL_VALUES: dict[str, list[float]] = {
    "weight": [0.7, 0.4, 1.1, 0.9],
    "density": [0.6, 0.8, 0.5, 0.7],
    "gamma": [0.05, 0.1, 0.02, 0.0],
    "epsilon": [0.1, 0.15, 0.2, 0.05],
    "scale": [0.5, 1.5, 2.0, 0.25],
}
REQUIRED_SHARED: dict[str, Any] = {"t": 0.3}
SHAPES = [(8, 6), (10,)]


def counts(spec: MethodSpec) -> list[int]:
    """The fewest models the method takes, and the most (or two more than the fewest)."""
    most = spec.max_models if spec.max_models is not None else spec.min_models + 2
    return sorted({spec.min_models, most})


def per_model_params(spec: MethodSpec, n: int) -> dict[str, list[float]]:
    params = {}
    for param in spec.params.values():
        if not param.per_model:
            continue
        if param.name in PER_MODEL_VALUES:
            values = PER_MODEL_VALUES[param.name]
            params[param.name] = [values[i % len(values)] for i in range(n)]
        else:
            default = 0.5 if param.required else param.default
            params[param.name] = [default] * n
    return params


def shared_params(spec: MethodSpec) -> dict[str, Any]:
    params = {}
    for param in spec.params.values():
        if param.per_model or not param.required:
            continue
        if param.name in REQUIRED_SHARED:
            params[param.name] = REQUIRED_SHARED[param.name]
        elif param.choices:
            params[param.name] = param.choices[0]
        else:
            fallback = {bool: False, int: 1, float: 0.5}
            assert param.kind in fallback, f"add a value for {spec.name}.{param.name}"
            params[param.name] = fallback[param.kind]
    return params


def tensors(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n fine-tuned-like models near it (non-trivial, deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    models = [base + 0.1 * torch.randn(shape, generator=generator, dtype=dtype) for _ in range(n)]
    return base, models


def run(
    spec: MethodSpec,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    seed: int = 123,
    **params: Any,
) -> torch.Tensor:
    params = {**per_model_params(spec, len(models)), **shared_params(spec), **params}
    if spec.base != "none":
        params["base"] = base
    return spec(models, generator=torch.Generator().manual_seed(seed), **params)


def with_property(prop: str) -> list[str]:
    return [name for name in NAMES if prop in METHODS[name].properties]


def bases(spec: MethodSpec, base: torch.Tensor) -> list[torch.Tensor | None]:
    """The base arguments a method can be called with."""
    return {"required": [base], "optional": [base, None], "none": [None]}[spec.base]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_output_is_finite_keeps_shape_and_dtype(
    name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    spec = METHODS[name]
    for n in counts(spec):
        base, models = tensors(n, shape, dtype)
        copies = [base.clone()] + [m.clone() for m in models]
        for base_arg in bases(spec, base):
            out = run(spec, models, base_arg)
            assert out.shape == base.shape and out.dtype == dtype, (n, base_arg is None)
            assert torch.isfinite(out).all(), (n, base_arg is None)
        for before, after in zip(copies, [base, *models], strict=True):
            assert torch.equal(before, after), "a method modified its inputs"


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name: str) -> None:
    spec = METHODS[name]
    for n in counts(spec):
        base, models = tensors(n, (8, 6), torch.float32)
        for base_arg in bases(spec, base):
            first = run(spec, models, base_arg, seed=7)
            assert torch.equal(first, run(spec, models, base_arg, seed=7))


@pytest.mark.parametrize("name", with_property("idempotent"))
def test_idempotent(name: str) -> None:
    """Copies of one tensor, base included, merge to that tensor."""
    spec = METHODS[name]
    for n in counts(spec):
        tensor, _ = tensors(0, (8, 6), torch.float32, seed=n)
        for base_arg in bases(spec, tensor.clone()):
            out = run(spec, [tensor.clone() for _ in range(n)], base_arg)
            assert_close(out, tensor, msg=lambda m, n=n: f"{n} models: {m}")


@pytest.mark.parametrize("name", with_property("base_fixed_point"))
def test_base_fixed_point(name: str) -> None:
    """Models equal to the base merge to the base."""
    spec = METHODS[name]
    assert spec.base != "none", f"{name} declares base_fixed_point but takes no base"
    for n in counts(spec):
        base, _ = tensors(0, (8, 6), torch.float32, seed=n)
        out = run(spec, [base.clone() for _ in range(n)], base)
        assert_close(out, base)


@pytest.mark.parametrize("name", with_property("order_invariant"))
def test_order_invariant(name: str) -> None:
    """Permuting the models together with their per-model parameters keeps the result."""
    spec = METHODS[name]
    n = counts(spec)[-1]
    assert n >= 2, f"{name} takes one model; order invariance says nothing"
    base, models = tensors(n, (8, 6), torch.float32)
    params = per_model_params(spec, n)
    reference = run(spec, models, base, **params)
    for order in (list(reversed(range(n))), [*range(1, n), 0]):
        permuted = {key: [values[i] for i in order] for key, values in params.items()}
        out = run(spec, [models[i] for i in order], base, **permuted)
        assert_close(out, reference, msg=lambda m, order=order: f"order {order}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_documented(name: str) -> None:
    """What `alloy methods` shows: a summary, a reference and a line for every parameter."""
    spec = METHODS[name]
    assert spec.summary and spec.reference.startswith("https://")
    assert set(spec.properties) <= set(registry.PROPERTIES)
    undocumented = [p.name for p in spec.params.values() if not p.doc]
    assert not undocumented, f"{name}: no Args line for {undocumented}"


# The registry's own checks, on throw-away functions that never stay registered.


def _probe_module(monkeypatch: pytest.MonkeyPatch, stem: str) -> str:
    """A fake method module `alloy_probe.<stem>` whose docstring cites https://example.org."""
    module_name = f"alloy_probe.{stem}"
    module = types.ModuleType(module_name, "A probe, https://example.org")
    monkeypatch.setitem(sys.modules, module_name, module)
    return module_name


def test_registry_rejects_a_duplicate_name() -> None:
    def linear(*, weight: Annotated[list[float], ANY]) -> Elementwise:
        """Another linear."""
        return Elementwise(lambda block: block.models[0])

    linear.__module__ = METHODS["linear"].fn.__module__
    original = registry.METHODS["linear"]
    register = merge_method(
        base="none", reference=original.reference, per_model={"weight": REQUIRED}
    )
    with pytest.raises(ValueError, match="registered twice"):
        register(linear)
    assert registry.METHODS["linear"] is original


def test_registry_rejects_a_number_parameter_without_a_range(monkeypatch: Any) -> None:
    def bare(*, weight: list[float], scale: float = 1.0) -> Elementwise:
        """A method whose scale has no declared range."""
        return Elementwise(lambda block: block.models[0])

    bare.__module__ = _probe_module(monkeypatch, "bare")
    register = merge_method(
        base="none", reference="https://example.org", per_model={"weight": REQUIRED}
    )
    with pytest.raises(ValueError, match="declares no range"):
        register(bare)
    assert "bare" not in registry.METHODS


def test_registry_rejects_an_unannotated_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(*, alpha=0.5) -> Elementwise:
        """A probe."""
        return Elementwise(lambda block: block.models[0] * alpha)

    probe.__module__ = _probe_module(monkeypatch, "probe")
    try:
        with pytest.raises(ValueError, match="'alpha' has no type annotation"):
            merge_method(base="required", reference="https://example.org")(probe)
    finally:
        registry.METHODS.pop("probe", None)


def test_registry_accepts_and_describes_a_valid_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same probe, annotated, registers; then it is removed again."""

    def probe(
        *, share: Annotated[list[float], ANY], alpha: Annotated[float, ANY] = 0.5
    ) -> Elementwise:
        """A probe."""
        return Elementwise(lambda block: block.models[0] * alpha)

    probe.__module__ = _probe_module(monkeypatch, "probe")
    try:
        merge_method(base="required", reference="https://example.org", per_model={"share": 1.0})(
            probe
        )
        spec = registry.METHODS["probe"]
        assert spec.params["share"].per_model and spec.params["alpha"].default == 0.5
        again = merge_method(
            base="required", reference="https://example.org", per_model={"share": 1.0}
        )
        with pytest.raises(ValueError, match="registered twice"):
            again(probe)
    finally:
        registry.METHODS.pop("probe", None)
    assert "probe" not in all_methods()


@pytest.mark.parametrize("shape", [(40, 6), (37,), (5, 4, 3)], ids=str)
@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS[n].random])
def test_blocking_does_not_change_the_result(
    name: str, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming over many tiny blocks (reduction passes, tie quotas carried across blocks)
    equals one block. Values are rounded to bfloat16 so magnitudes tie often."""
    from alloy.merge import blocks

    spec = METHODS[name]
    n = max(spec.min_models, 2) if spec.max_models is None else spec.max_models
    base, models = tensors(n, shape, torch.float32, seed=4)
    base, models = base.bfloat16().float(), [m.bfloat16().float() for m in models]
    results = []
    for size in (1 << 30, 7):
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", size)
        for extra in ({}, {"rescale": True} if "rescale" in spec.params else {}):
            results.append(run(spec, models, base, **extra))
    half = len(results) // 2
    for whole, streamed in zip(results[:half], results[half:], strict=True):
        assert_close(streamed, whole, rtol=1e-6, atol=1e-6)
