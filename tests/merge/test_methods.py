"""Hand-computed golden values for every merge method, with each derivation in the docstring.

Random methods are checked on cases whose outcome does not depend on the draw (density 0 or 1),
or against the same generator's Bernoulli draw replayed with the same seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alloy.errors import InputError
from alloy.merge.registry import get_method

SQRT_HALF = math.sqrt(0.5)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(name: str, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return get_method(name)(models, **params)  # type: ignore[arg-type]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# linear


def test_linear_normalised_weights() -> None:
    """(1 * [1, 2, 3, 4] + 3 * [5, 6, 7, 8]) / 4 = [16, 20, 24, 28] / 4 = [4, 5, 6, 7]."""
    out = merge("linear", [t(1, 2, 3, 4), t(5, 6, 7, 8)], weight=[1.0, 3.0])
    assert_close(out, t(4, 5, 6, 7))


def test_linear_plain_weighted_sum() -> None:
    """normalize false: 0.5 * [2, -4, 6, 0] + 2 * [1, 1, -1, 3] = [1+2, -2+2, 3-2, 0+6]."""
    out = merge("linear", [t(2, -4, 6, 0), t(1, 1, -1, 3)], weight=[0.5, 2.0], normalize=False)
    assert_close(out, t(3, 0, 1, 6))


def test_linear_zero_weight_sum_is_an_input_error() -> None:
    with pytest.raises(InputError, match="sum to zero"):
        merge("linear", [t(1, 2), t(3, 4)], weight=[1.0, -1.0])


# task_arithmetic


def test_task_arithmetic_negation() -> None:
    """weight -1 forgets the task: tau = [2, 2, 1, 6] - [1, 2, 3, 4] = [1, 0, -2, 2];
    base - tau = [0, 2, 5, 2]."""
    out = merge("task_arithmetic", [t(2, 2, 1, 6)], base=t(1, 2, 3, 4), weight=[-1.0])
    assert_close(out, t(0, 2, 5, 2))


def test_task_arithmetic_weights_and_lambda() -> None:
    """tau0 = [2, 0, 2, 0], tau1 = [0, 1, 0, -1]; 0.5 tau0 + 2 tau1 = [1, 2, 1, -2];
    lambda 0.5 -> [0.5, 1, 0.5, -1]; plus base [1, -1, 0, 2] = [1.5, 0, 0.5, 1]."""
    base = t(1, -1, 0, 2)
    models = [t(3, -1, 2, 2), t(1, 0, 0, 1)]
    out = merge("task_arithmetic", models, base=base, weight=[0.5, 2.0], **{"lambda": 0.5})
    assert_close(out, t(1.5, 0, 0.5, 1))


def test_task_arithmetic_normalised() -> None:
    """Same task vectors, normalize: [1, 2, 1, -2] / (0.5 + 2) = [0.4, 0.8, 0.4, -0.8];
    plus base = [1.4, -0.2, 0.4, 1.2]."""
    base = t(1, -1, 0, 2)
    models = [t(3, -1, 2, 2), t(1, 0, 0, 1)]
    out = merge("task_arithmetic", models, base=base, weight=[0.5, 2.0], normalize=True)
    assert_close(out, t(1.4, -0.2, 0.4, 1.2))


# ties (and the sign election shared by the *_ties methods)

# Three models whose elections differ entry by entry; weights [1, 1, 0.5].
ELECT_BASE = t(0.5, -0.5, 1, 2)
ELECT_DELTAS = [t(1, 1, 2, -1), t(1, 1, -1, -2), t(-3, -5, 1, 4)]
ELECT_MODELS = [ELECT_BASE + d for d in ELECT_DELTAS]
ELECT_WEIGHTS = [1.0, 1.0, 0.5]
ELECT_EXPECTED = {
    "weighted_sum": t(1.5, -5.5, 1 + 5 / 3, 0.5),
    "sum": t(-2.5, -5.5, 1 + 5 / 3, 6),
    "count": t(1.5, 0.5, 1 + 5 / 3, 0.5),
}


def test_ties_trim_ties_go_to_the_lowest_index() -> None:
    """tau = [3, -3, 1, 3], density 0.5 keeps k = 2 entries; three magnitudes tie at 3, so
    indices 0 and 1 win: tau' = [3, -3, 0, 0]. One model: the elected signs are its own, the
    dropped entries agree with nothing (divisor 0 -> 1). Base [1, 1, 1, 1] -> [4, -2, 1, 1]."""
    base = t(1, 1, 1, 1)
    out = merge("ties", [base + t(3, -3, 1, 3)], base=base, weight=[1.0], density=[0.5])
    assert_close(out, t(4, -2, 1, 1))


@pytest.mark.parametrize("election", ["weighted_sum", "sum", "count"])
def test_ties_elections_differ(election: str) -> None:
    """Weighted vectors: A = [1, 1, 2, -1], B = [1, 1, -1, -2], C = 0.5 tau_C = [-1.5, -2.5,
    0.5, 2].

    weighted_sum: totals [0.5, -0.5, 1.5, -1] -> signs [+, -, +, -]; disjoint means
        [(1+1)/2, -2.5/0.5, (2+0.5)/1.5, (-1-2)/2] = [1, -5, 5/3, -1.5]
    sum (unweighted): totals [-1, -3, 2, 1] -> [-, -, +, +]; [-1.5/0.5, -5, 5/3, 2/0.5]
        = [-3, -5, 5/3, 4]
    count: signs (+,+,-), (+,+,-), (+,-,+), (-,-,+) -> [+, +, +, -]; [1, 1, 5/3, -1.5]
    plus base [0.5, -0.5, 1, 2].
    """
    out = merge("ties", ELECT_MODELS, base=ELECT_BASE, weight=ELECT_WEIGHTS, election=election)
    assert_close(out, ELECT_EXPECTED[election])


def test_ties_density_rescale_and_lambda() -> None:
    """tau0 = [4, -1, 2, 0.5], tau1 = [-1, 3, -2, 0], density 0.5 (k = 2), rescale density:
    tau0' = [4, 0, 2, 0] / 0.5 = [8, 0, 4, 0]; tau1' = [0, 3, -2, 0] / 0.5 = [0, 6, -4, 0].
    weights [1, 1]: totals [8, 6, 0, 0] -> all + (a zero total elects +); agreeing sums
    [8, 6, 4, 0]; normalize false, lambda 0.5 -> [4, 3, 2, 0]; base 0."""
    base = torch.zeros(4)
    out = merge(
        "ties",
        [t(4, -1, 2, 0.5), t(-1, 3, -2, 0)],
        base=base,
        weight=[1.0, 1.0],
        density=[0.5, 0.5],
        rescale=True,
        rescale_mode="density",
        normalize=False,
        **{"lambda": 0.5},
    )
    assert_close(out, t(4, 3, 2, 0))


# dare_linear / dare_ties


def test_dare_density_one_drops_nothing_and_draws_nothing() -> None:
    """density 1 keeps tau whole (no rescale, no draw): base + 2 tau = [1,2,3,4] + 2 [1,-1,0.5,0]
    = [3, 0, 4, 4]; the generator's state is untouched."""
    base = t(1, 2, 3, 4)
    generator = seeded(0)
    state = generator.get_state()
    for name in ("dare_linear", "dare_ties"):
        out = merge(name, [base + t(1, -1, 0.5, 0)], base=base, weight=[2.0], generator=generator)
        assert_close(out, t(3, 0, 4, 4))
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("rescale_mode", ["l1", "density"])
def test_dare_linear_replays_the_generator(rescale_mode: str) -> None:
    """The keep mask m is the generator's Bernoulli(0.5) draw, replayed with the same seed.
    tau = [1, 2, 3, 4, 5, 6] (L1 norm 21). "density": tau' = m * tau / 0.5; "l1":
    tau' = m * tau * 21 / sum(m * tau). Result base + tau'."""
    base = t(0.5, -0.5, 1, -1, 2, -2)
    tau = t(1, 2, 3, 4, 5, 6)
    mask = torch.bernoulli(torch.full((6,), 0.5), generator=seeded(1))
    assert 0 < mask.sum() < 6  # a partial mask, so the two modes differ
    kept = mask * tau
    scale = 2.0 if rescale_mode == "density" else 21.0 / float(kept.sum())
    out = merge(
        "dare_linear",
        [base + tau],
        base=base,
        weight=[1.0],
        density=[0.5],
        rescale_mode=rescale_mode,
        generator=seeded(1),
    )
    assert_close(out, base + kept * scale)


def test_dare_is_deterministic_per_seed() -> None:
    """Same seed, same drop; another seed draws another mask (checked on 64 entries)."""
    base = torch.zeros(64)
    models = [torch.linspace(-1, 1, 64), torch.linspace(2, -2, 64)]
    for name in ("dare_linear", "dare_ties"):
        kwargs = {"base": base, "weight": [1.0, 0.5], "density": [0.5, 0.5]}
        first = merge(name, models, generator=seeded(11), **kwargs)
        again = merge(name, models, generator=seeded(11), **kwargs)
        other = merge(name, models, generator=seeded(12), **kwargs)
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


def test_dare_ties_density_zero_and_one() -> None:
    """Model A has density 1 (kept whole), model B density 0 (dropped entirely; L1 rescale
    skipped on a zero vector): the election sees only A, so the result is base + w_A tau_A =
    [1, 1, 1, 1] + 0.5 [2, -4, 6, 0] = [2, -1, 4, 1]."""
    base = t(1, 1, 1, 1)
    models = [base + t(2, -4, 6, 0), base + t(-9, 9, -9, 9)]
    out = merge(
        "dare_ties", models, base=base, weight=[0.5, 3.0], density=[1.0, 0.0], generator=seeded(0)
    )
    assert_close(out, t(2, -1, 4, 1))


@pytest.mark.parametrize("election", ["weighted_sum", "sum", "count"])
def test_dare_ties_elections_without_drop(election: str) -> None:
    """density 1: DARE-TIES is the TIES election case above (normalize true)."""
    out = merge(
        "dare_ties",
        ELECT_MODELS,
        base=ELECT_BASE,
        weight=ELECT_WEIGHTS,
        election=election,
        normalize=True,
        generator=seeded(0),
    )
    assert_close(out, ELECT_EXPECTED[election])


# breadcrumbs / breadcrumbs_ties


def test_breadcrumbs_rank_window() -> None:
    """tau = [0.1, -5, 2, -0.3, 1, 3], n = 6, density 0.5 -> target 3, gamma 0.2 -> top
    int(1.2) = 1 dropped, bottom 6 - 3 - 1 = 2 dropped. Ascending |tau|: i0, i3, i4, i2, i5,
    i1: keep i4, i2, i5 -> tau' = [0, 0, 2, 0, 1, 3]; weight 2 -> base + [0, 0, 4, 0, 2, 6]."""
    base = t(1, 1, 1, 1, 1, 1)
    tau = t(0.1, -5, 2, -0.3, 1, 3)
    out = merge("breadcrumbs", [base + tau], base=base, weight=[2.0], density=[0.5], gamma=[0.2])
    assert_close(out, base + t(0, 0, 4, 0, 2, 6))


def test_breadcrumbs_outlier_cut_shrinks_to_keep_density() -> None:
    """gamma 0.9 asks for int(5.4) = 5 outliers, but target 3 leaves room for only 3: bottom
    max(0, 6 - 3 - 5) = 0, so the 3 smallest stay: i0, i3, i4 -> [0.1, 0, 0, -0.3, 1, 0].
    density 1 keeps tau whole whatever gamma is (mergekit)."""
    base = torch.zeros(6)
    tau = t(0.1, -5, 2, -0.3, 1, 3)
    out = merge("breadcrumbs", [tau], base=base, weight=[1.0], density=[0.5], gamma=[0.9])
    assert_close(out, t(0.1, 0, 0, -0.3, 1, 0))
    whole = merge("breadcrumbs", [tau], base=base, weight=[1.0], density=[1.0], gamma=[0.5])
    assert_close(whole, tau)


def test_breadcrumbs_ties_versus_linear() -> None:
    """n = 4, density 0.5 (target 2), gamma 0.25 (top 1), bottom 4 - 2 - 1 = 1.
    A = [4, -1, 2, 0.5]: ascending i3, i1, i2, i0 -> A' = [0, -1, 2, 0].
    B = [-1, 3, -2, 6]: ascending i0, i2, i1, i3 -> B' = [0, 3, -2, 0].
    weights [1, 2]: A' = [0, -1, 2, 0], 2B' = [0, 6, -4, 0].
    linear: sum = [0, 5, -2, 0].
    ties: totals [0, 5, -2, 0] -> signs [+, +, -, +]; agreeing [0, 6, -4, 0] (normalize false).
    """
    base = t(1, -1, 2, 0)
    models = [base + t(4, -1, 2, 0.5), base + t(-1, 3, -2, 6)]
    kwargs = {"base": base, "weight": [1.0, 2.0], "density": [0.5, 0.5], "gamma": [0.25, 0.25]}
    assert_close(merge("breadcrumbs", models, **kwargs), base + t(0, 5, -2, 0))
    assert_close(merge("breadcrumbs_ties", models, **kwargs), base + t(0, 6, -4, 0))


# della / della_linear


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_epsilon_out_of_bounds(name: str) -> None:
    """density 0.5 ± epsilon 0.5 reaches 0 and 1: an InputError naming both."""
    with pytest.raises(InputError, match="epsilon"):
        merge(
            name,
            [t(1, 2, 3, 4)],
            base=torch.zeros(4),
            weight=[1.0],
            density=[0.5],
            epsilon=[0.5],
            generator=seeded(0),
        )


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_density_bounds_skip_the_draw(name: str) -> None:
    """density 1 keeps tau = [1, -2, 3, 0] whole, density 0 drops it: with weights [1, 1]
    and epsilon 0.9 (which would be out of bounds in between) the result is base + tau."""
    base = t(2, 2, 2, 2)
    models = [base + t(1, -2, 3, 0), base + t(5, 5, 5, 5)]
    out = merge(
        name,
        models,
        base=base,
        weight=[1.0, 1.0],
        density=[1.0, 0.0],
        epsilon=[0.9, 0.9],
        generator=seeded(0),
    )
    assert_close(out, t(3, 0, 5, 2))


def test_della_keep_probabilities_by_rank() -> None:
    """Per row, rank r (0 = smallest |tau|) of n keeps with p = density - eps + 2 eps r/(n-1).
    tau = [[1, -4, 2], [-3, 0.5, 6]], density 0.5, eps 0.3 -> p in {0.2, 0.5, 0.8}:
    row 0 ranks [0, 2, 1] -> p = [0.2, 0.8, 0.5]; row 1 ranks [1, 0, 2] -> p = [0.5, 0.2, 0.8].
    The mask is the same generator's draw with these p; rescale l1 multiplies by
    |tau|_1 / |m tau|_1 = 16.5 / sum|m tau|. della_linear, weight 1: base + tau'."""
    base = torch.zeros(2, 3)
    tau = torch.tensor([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]])
    probs = torch.tensor([[0.2, 0.8, 0.5], [0.5, 0.2, 0.8]])
    mask = torch.bernoulli(probs, generator=seeded(5))
    assert 0 < mask.sum() < 6
    kept = mask * tau
    expected = kept * (16.5 / float(kept.abs().sum()))
    out = merge(
        "della_linear",
        [tau],
        base=base,
        weight=[1.0],
        density=[0.5],
        epsilon=[0.3],
        generator=seeded(5),
    )
    assert_close(out, expected)


# slerp


def test_slerp_endpoints() -> None:
    """t = 0 gives the base, t = 1 the model (sin(Omega) / sin(Omega) = 1)."""
    base, model = t(1, -2, 0.5, 3), t(-1, 0.5, 2, 1)
    assert_close(merge("slerp", [model], base=base, t=0.0), base)
    assert_close(merge("slerp", [model], base=base, t=1.0), model)


def test_slerp_orthogonal_halfway() -> None:
    """The 2x2 tensors flatten to [2, 0, 0, 0] and [0, 0, 0, 3]: orthogonal, Omega = pi/2.
    t = 0.5: both coefficients sin(pi/4) / sin(pi/2) = sqrt(1/2), applied to the unnormalised
    tensors -> [[2 sqrt(1/2), 0], [0, 3 sqrt(1/2)]]."""
    base = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    model = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    out = merge("slerp", [model], base=base, t=0.5)
    assert_close(out, torch.tensor([[2 * SQRT_HALF, 0.0], [0.0, 3 * SQRT_HALF]]))


def test_slerp_sixty_degrees() -> None:
    """Unit vectors at Omega = pi/3, t = 0.5: coefficients sin(pi/6) / sin(pi/3) = 1/sqrt(3);
    [1, 0, 0, 0] / sqrt(3) + [1/2, sqrt(3)/2, 0, 0] / sqrt(3) = [sqrt(3)/2, 1/2, 0, 0], the unit
    vector at 30 degrees."""
    model = t(0.5, math.sqrt(3) / 2, 0, 0)
    out = merge("slerp", [model], base=t(1, 0, 0, 0), t=0.5)
    assert_close(out, t(math.sqrt(3) / 2, 0.5, 0, 0))


def test_slerp_near_parallel_falls_back_to_linear() -> None:
    """model = 2 base (cosine 1 > 0.9995): (1 - 0.25) base + 0.25 (2 base) = 1.25 base.
    model = -base (cosine -1, |cos| > 0.9995 too): 0.5 base - 0.5 base = 0."""
    base = t(1, 2, 3, 4)
    assert_close(merge("slerp", [2 * base], base=base, t=0.25), 1.25 * base)
    assert_close(merge("slerp", [-base], base=base, t=0.5), torch.zeros(4))


# nuslerp


def test_nuslerp_without_base() -> None:
    """weights [1, 2] -> t = 2/3; orthogonal unit vectors, Omega = pi/2:
    sin(pi/6) [1, 0, 0, 0] + sin(pi/3) [0, 1, 0, 0] = [1/2, sqrt(3)/2, 0, 0]."""
    out = merge("nuslerp", [t(1, 0, 0, 0), t(0, 1, 0, 0)], base=None, weight=[1.0, 2.0])
    assert_close(out, t(0.5, math.sqrt(3) / 2, 0, 0))


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    """tau0 = [2, 0, 0, 0], tau1 = [0, 2, 0, 0]; weights [2, 1] -> t = 1/3, Omega = pi/2:
    sin(pi/3) tau0 + sin(pi/6) tau1 = [sqrt(3), 1, 0, 0]; plus base [1, 1, 1, 1]."""
    base = t(1, 1, 1, 1)
    models = [base + t(2, 0, 0, 0), base + t(0, 2, 0, 0)]
    out = merge("nuslerp", models, base=base, weight=[2.0, 1.0])
    assert_close(out, t(1 + math.sqrt(3), 2, 1, 1))


def test_nuslerp_rows_columns_and_flattened() -> None:
    """m0 = [[1, 0], [0, 2]], m1 = [[0, 1], [0, 2]], equal weights -> t = 1/2.
    rows (flatten false): row 0 orthogonal units -> sqrt(1/2) [1, 1]; row 1 colinear -> linear
    [0, 2]. Columns (row_wise) of the transposes give the transposed result.
    flattened: [1, 0, 0, 2] . [0, 1, 0, 2] = 4, norms sqrt(5): cos = 0.8, sin = 0.6,
    sin(Omega/2) = sqrt((1 - 0.8)/2) = sqrt(0.1): result sqrt(0.1)/0.6 (m0 + m1)."""
    m0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    m1 = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    rows = torch.tensor([[SQRT_HALF, SQRT_HALF], [0.0, 2.0]])
    kwargs = {"base": None, "weight": [1.0, 1.0], "nuslerp_flatten": False}
    assert_close(merge("nuslerp", [m0, m1], **kwargs), rows)
    columns = merge("nuslerp", [m0.T, m1.T], nuslerp_row_wise=True, **kwargs)
    assert_close(columns, rows.T)
    flat = merge("nuslerp", [m0, m1], base=None, weight=[1.0, 1.0])
    assert_close(flat, math.sqrt(0.1) / 0.6 * (m0 + m1))


# model_stock


def test_model_stock_two_models() -> None:
    """tau0 = [1, 0, 0, 0], tau1 = [3, 4, 0, 0]: cos = 3 / 5 = 0.6, N = 2:
    t = 2 * 0.6 / (1 + 0.6) = 0.75. Result t mean + (1 - t) base = base + 0.75 mean(tau)
    = base + 0.75 [2, 2, 0, 0] = base + [1.5, 1.5, 0, 0]."""
    base = t(1, -1, 2, 0.5)
    models = [base + t(1, 0, 0, 0), base + t(3, 4, 0, 0)]
    assert_close(merge("model_stock", models, base=base), t(2.5, 0.5, 2, 0.5))


def test_model_stock_opposite_task_vectors_keep_the_base() -> None:
    """tau1 = -tau0: cos = -1, denominator 1 + (2 - 1)(-1) = 0 -> t = 0 -> the base."""
    base = t(1, -1, 2, 0.5)
    models = [base + t(1, 2, 0, 0), base - t(1, 2, 0, 0)]
    assert_close(merge("model_stock", models, base=base), base)


def test_model_stock_filter_wise() -> None:
    """Three models on a 2x3 tensor, one t per row.
    row 0: tau = [1, 0, 0], [0, 2, 0], [0, 0, 3]: all cosines 0 -> t = 0 -> base row.
    row 1: tau = [1, 1, 0] three times: cos = 1 -> t = 3 / (1 + 2) = 1 -> the models' mean
    = base row + [1, 1, 0]."""
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    row1 = [1.0, 1.0, 0.0]
    deltas = [
        torch.tensor([[1.0, 0.0, 0.0], row1]),
        torch.tensor([[0.0, 2.0, 0.0], row1]),
        torch.tensor([[0.0, 0.0, 3.0], row1]),
    ]
    out = merge("model_stock", [base + d for d in deltas], base=base, filter_wise=True)
    assert_close(out, torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 6.0]]))


# passthrough


def test_passthrough_scale() -> None:
    """0.5 * [2, -4, 6, 1] = [1, -2, 3, 0.5]; the default scale 1 copies."""
    model = t(2, -4, 6, 1)
    assert_close(merge("passthrough", [model], scale=[0.5]), t(1, -2, 3, 0.5))
    assert_close(merge("passthrough", [model]), model)
