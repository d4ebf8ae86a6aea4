"""Tensor helpers of the dynamic executors: NHWC-keeping row selection and the finite check."""

from __future__ import annotations

import torch

from dynets.core.tensors import all_finite, take_rows


def test_take_rows_keeps_channels_last_and_equals_index_select():
    x = torch.randn(9, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([7, 0, 3])
    y = take_rows(x, idx)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x.contiguous().index_select(0, idx))
    plain = torch.randn(6, 4)  # anything else: a plain index_select
    assert torch.equal(take_rows(plain, idx[1:]), plain[idx[1:]])
    assert take_rows(x, idx[:0]).shape == (0, 5, 4, 3)


def test_all_finite_is_exact_even_when_the_fast_sum_overflows():
    assert all_finite(torch.zeros(0, 3))
    assert all_finite(torch.randn(4, 3))
    assert all_finite(torch.full((8,), 3e38))  # finite values whose float32 sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5)
        x[2] = bad
        assert not all_finite(x)
    pair = torch.tensor([float("inf"), -float("inf")])  # sums to NaN, but is not finite either
    assert not all_finite(pair)
