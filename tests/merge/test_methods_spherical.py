"""Hand-derived goldens for the spherical means ported from mergekit: multislerp and karcher.

Each derivation is in the docstring; the Gram-matrix route of alloy/merge/methods/_gram.py is
also checked against a direct whole-tensor computation and across block partitions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alloy.errors import InputError
from alloy.merge.blocks import run
from alloy.merge.registry import get_method

HALF = math.sqrt(0.5)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(name: str, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return get_method(name)(models, **params)  # type: ignore[arg-type]


# multislerp


def test_multislerp_orthogonal_pair() -> None:
    """v0 = [3, 0], v1 = [0, 4], weights 1, 1 -> 0.5, 0.5. u0 = [1, 0], u1 = [0, 1];
    m = [0.5, 0.5], direction [sqrt(1/2), sqrt(1/2)]; mean norm 0.5 * 3 + 0.5 * 4 = 3.5;
    theta = 3.5 * sqrt(1/2) * [1, 1] = [2.4749, 2.4749]."""
    out = merge("multislerp", [t(3, 0), t(0, 4)], weight=[1.0, 1.0])
    assert_close(out, t(3.5 * HALF, 3.5 * HALF))


def test_multislerp_with_base_interpolates_task_vectors() -> None:
    """base [1, 1]; models [4, 1], [1, 5] have the task vectors of the pair above, so
    theta = [1, 1] + [2.4749, 2.4749]."""
    out = merge("multislerp", [t(4, 1), t(1, 5)], base=t(1, 1), weight=[1.0, 1.0])
    assert_close(out, t(1 + 3.5 * HALF, 1 + 3.5 * HALF))


def test_multislerp_three_models_unequal_weights() -> None:
    """v = 2 e1, 2 e2, 2 e3, weights 1, 1, 2 -> 0.25, 0.25, 0.5; m = [0.25, 0.25, 0.5],
    |m| = sqrt(0.375); mean norm 2; theta = 2 m / |m| = [0.8165, 0.8165, 1.6330]."""
    out = merge("multislerp", [t(2, 0, 0), t(0, 2, 0), t(0, 0, 2)], weight=[1.0, 1.0, 2.0])
    scale = 2 / math.sqrt(0.375)
    assert_close(out, t(0.25 * scale, 0.25 * scale, 0.5 * scale))


def test_multislerp_unnormalised_weights_scale_the_norm() -> None:
    """normalize_weights false, weights 2, 2 on [3, 0], [0, 4]: the direction is unchanged
    ([1, 1] / sqrt 2), the norm is 2 * 3 + 2 * 4 = 14 -> [9.8995, 9.8995]."""
    out = merge("multislerp", [t(3, 0), t(0, 4)], weight=[2.0, 2.0], normalize_weights=False)
    assert_close(out, t(14 * HALF, 14 * HALF))


def test_multislerp_antipodal_pair_falls_back_to_linear() -> None:
    """[1, 0] and [-3, 0] with equal weights: the mean direction is 0, so two models take
    0.5 * [1, 0] + 0.5 * [-3, 0] = [-1, 0]."""
    out = merge("multislerp", [t(1, 0), t(-3, 0)], weight=[1.0, 1.0])
    assert_close(out, t(-1, 0))


def test_multislerp_degenerate_cases() -> None:
    """Three models whose directions cancel are an error; task vectors all zero give the base;
    weights summing to zero cannot be normalised."""
    with pytest.raises(InputError, match="mean of the models' directions is zero"):
        merge("multislerp", [t(1, 0), t(-1, 0), t(0, 0)], weight=[1.0, 1.0, 1.0])
    base = t(0.5, -2)
    out = merge("multislerp", [base.clone()] * 3, base=base, weight=[1.0, 2.0, 3.0])
    assert torch.equal(out, base)
    with pytest.raises(InputError, match="sum to zero"):
        merge("multislerp", [t(1, 0), t(0, 1)], weight=[1.0, -1.0])


def test_multislerp_matches_the_tangent_space_construction() -> None:
    """The closed form equals mergekit's construction written out on whole tensors: project
    the unit vectors onto the tangent space at the normalised mean, average, map back."""
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    flat = torch.stack(vectors).reshape(3, -1)
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + 1e-8)
    mean = (weights[:, None] * units).sum(0)
    mean = mean / mean.norm()
    tangent = (weights[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    length = tangent.norm() + 1e-8
    direction = mean * torch.cos(length) + tangent * torch.sin(length) / length
    expected = (direction * (norms.squeeze(1) * weights).sum()).reshape(7, 5)
    out = merge("multislerp", vectors, weight=weights.tolist())
    assert_close(out, expected)


# karcher


def test_karcher_circle_mean_is_the_mean_angle() -> None:
    """Unit vectors at angles 0, 0 and 90 degrees: on a circle the Karcher mean is the mean
    angle, 30 degrees (the normalised Euclidean mean would be atan(1/2) = 26.57 degrees);
    norms 1 -> theta = [cos 30, sin 30] = [0.8660, 0.5]."""
    out = merge("karcher", [t(1, 0), t(1, 0), t(0, 1)])
    assert_close(out, t(math.sqrt(3) / 2, 0.5))


def test_karcher_scales_to_the_mean_norm() -> None:
    """[2, 0], [1, 0], [0, 3]: the directions of the case above, mean norm (2 + 1 + 3) / 3 = 2,
    theta = 2 [cos 30, sin 30] = [1.7321, 1]."""
    out = merge("karcher", [t(2, 0), t(1, 0), t(0, 3)])
    assert_close(out, t(math.sqrt(3), 1.0))


def test_karcher_zero_model_counts_for_the_norm_only() -> None:
    """[2, 0], [0, 2], [0, 0]: the zero model has no direction (mean of the others: 45 degrees)
    but its norm 0 enters the mean norm (2 + 2 + 0) / 3 = 4/3 -> 4/3 [sqrt(1/2), sqrt(1/2)]."""
    out = merge("karcher", [t(2, 0), t(0, 2), t(0, 0)])
    assert_close(out, t(4 / 3 * HALF, 4 / 3 * HALF))


def test_karcher_iterations_reach_the_geodesic_mean_in_three_dimensions() -> None:
    """Directions e1, e2, e3 with one step allowed vs. many: by symmetry the mean is
    [1, 1, 1] / sqrt 3 either way; tilting e3 towards e1 breaks the symmetry, and the
    converged mean must have a zero mean log map (the Karcher condition)."""
    out = merge("karcher", [t(1, 0, 0), t(0, 1, 0), t(0, 0, 1)], max_iter=1)
    assert_close(out, t(1, 1, 1) / math.sqrt(3))
    units = [t(1, 0, 0), t(0, 1, 0), t(0.6, 0, 0.8)]
    mean = merge("karcher", units, max_iter=50, tol=1e-9).double()
    mean = mean / mean.norm()
    logs = []
    for u in units:
        u = u.double()
        cos = float(u @ mean)
        angle = math.acos(min(1.0, cos))
        logs.append(angle / math.sin(angle) * (u - cos * mean))
    assert float(torch.stack(logs).sum(0).norm()) < 1e-6


@pytest.mark.parametrize("name", ["multislerp", "karcher"])
def test_blocks_change_nothing(name: str) -> None:
    """The Gram matrix summed over row blocks gives the same result as one block."""
    spec = get_method(name)
    g = torch.Generator().manual_seed(1)
    models = [torch.randn(16, 4, generator=g) for _ in range(3)]
    params = {"weight": [0.3, 0.3, 0.4]} if name == "multislerp" else {}
    whole = run(spec.make(3, **params), models)
    blocked = run(spec.make(3, **params), models, block_elements=8)
    assert_close(blocked, whole)
