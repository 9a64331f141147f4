"""Radix rank selection against the definition: a stable sort's first k entries."""

from __future__ import annotations

import pytest
import torch

from alloy.merge.methods._ranks import RankSelect, largest_mask, select, smallest_mask


def _expected(values: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    order = torch.sort(values, descending=descending, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def _cases(size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randint(0, 4, (size,), generator=generator).float(),  # heavy ties
        (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16).float().abs(),
        torch.rand(size, generator=generator),
        torch.rand(size, generator=generator, dtype=torch.float64),  # 4 radix passes
        torch.randint(0, 3, (size,), generator=generator).double(),
    ]


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1000, 100_003])
def test_masks_match_a_stable_sort(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    for values in _cases(size, generator):
        for k in sorted({0, 1, size // 3, size // 2, size - 1, size}):
            for descending, mask_of in ((True, largest_mask), (False, smallest_mask)):
                got = mask_of(values, k)
                assert int(got.sum()) == k
                assert torch.equal(got, _expected(values, k, descending)), (size, k, descending)


def test_thresholds_equal_kthvalue_on_extremes() -> None:
    """Zeros, subnormals, infinities and huge values all order correctly by their bits."""
    values = torch.tensor([0.0, 1e-45, 1e-38, 0.5, 1.0, 3e38, float("inf"), 0.5, 0.0])
    n = values.numel()
    for dtype in (torch.float32, torch.float64):
        typed = values.to(dtype)
        chosen = select(typed, list(range(1, n + 1)))
        for k in range(1, n + 1):
            expected = torch.kthvalue(typed, n - k + 1).values
            assert chosen.threshold[k - 1] == expected, (dtype, k)
            assert chosen.greater[k - 1] == int((typed > expected).sum())
            assert chosen.equal[k - 1] == int((typed == expected).sum())


def _streamed(values: torch.Tensor, ranks: list[int], block: int) -> RankSelect:
    """RankSelect fed `values` in blocks, skipping the second pass when it finished early."""
    chosen = RankSelect(ranks, values.dtype, numel=values.numel())
    for step in range(chosen.passes):
        if step and chosen.finished_early:
            break
        for start in range(0, values.numel(), block):
            chosen.reduce(step, values[start : start + block])
        chosen.end(step)
    return chosen


@pytest.mark.parametrize(("skewed", "extreme"), [(False, False), (True, False), (False, True)])
def test_one_pass_window_equals_two_pass_selection(skewed: bool, extreme: bool) -> None:
    """The first block predicts where each threshold lies. For ranks in the bulk of shuffled
    data the prediction holds and one pass suffices; when the first block is unrepresentative
    (its values far above the rest), or for extreme ranks (the maximum, the near-minimum), the
    window misses and the second pass runs. Either way the answer is kthvalue's."""
    generator = torch.Generator().manual_seed(3)
    values = (torch.randn(50_000, generator=generator) * 0.02).abs()
    if skewed:
        values[:5_000] += 100.0
    n = values.numel()
    ranks = [n // 10, n // 3, n // 2, 9 * n // 10] + ([1, n - 1] if extreme else [])
    chosen = _streamed(values, ranks, block=5_000)
    assert chosen.finished_early is not (skewed or extreme)
    for j, rank in enumerate(ranks):
        expected = torch.kthvalue(values, n - rank + 1).values
        assert chosen.threshold[j] == expected, rank
        assert chosen.greater[j] == int((values > expected).sum())
        assert chosen.equal[j] == int((values == expected).sum())
