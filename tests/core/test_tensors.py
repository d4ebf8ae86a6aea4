"""Tensor helpers of the dynamic executors: NHWC-keeping row selection, per-sample token selection
and the finite check."""

from __future__ import annotations

import torch

from dynets.core.tensors import all_finite, take_rows, take_tokens


def test_take_rows_keeps_channels_last_and_equals_index_select():
    x = torch.randn(9, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([7, 0, 3])
    y = take_rows(x, idx)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x.contiguous().index_select(0, idx))
    plain = torch.randn(6, 4)  # anything else: a plain index_select
    assert torch.equal(take_rows(plain, idx[1:]), plain[idx[1:]])
    assert take_rows(x, idx[:0]).shape == (0, 5, 4, 3)


def test_take_tokens_equals_a_per_sample_loop_and_carries_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, requires_grad=True)
    idx = torch.tensor([[0, 6, 2], [1, 1, 5], [3, 0, 4]])  # repeats and any order
    y = take_tokens(x, idx)
    assert y.shape == (3, 3, 4)
    for b in range(3):
        assert torch.equal(y[b], x[b, idx[b]])
    y.sum().backward()  # a repeated token gets the gradient of each copy
    assert x.grad[1, 1].eq(2).all() and x.grad[1, 0].eq(0).all()
    assert take_tokens(x.detach(), idx[:, :0]).shape == (3, 0, 4)


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
