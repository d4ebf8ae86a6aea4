"""Channel and head gating: grouped execution equals the dense masked reference in input order,
only the kept groups are computed, FLOPs as the sum of kept units, training gradients, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynets.width.gating as gating
from dynets.width.gating import ChannelGatedConv, GatedMultiheadAttention


def _spread(gate: nn.Module, seed: int = 0) -> None:
    """Large random gate weights, so samples keep different groups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin = gate.net[-1]
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 5)
        lin.bias.zero_()


def _conv_block(next_conv: bool = True, **kw) -> ChannelGatedConv:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    nxt = nn.Conv2d(16, 12, 3, 1, 1, bias=True) if next_conv else None
    m = ChannelGatedConv(nn.Conv2d(8, 16, 3, 2, 1, bias=False), bn, nxt, groups=4, **kw).eval()
    _spread(m.gate)
    return m


@torch.no_grad()
def _dense_reference(m: ChannelGatedConv, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    y = torch.relu(m.bn(m.conv(x)))
    y = y * keep.float().repeat_interleave(m.gate.group_size, dim=1)[:, :, None, None]
    return m.next_conv(y) if m.next_conv is not None else y


@pytest.fixture(scope="module")
def x():
    return torch.randn(20, 8, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("next_conv", [True, False])
@pytest.mark.parametrize("kw", [dict(k=2), dict(threshold=0.5)])
def test_channel_gating_equals_masked_reference(x, next_conv, kw):
    m = _conv_block(next_conv, **kw)
    r = m(x)
    assert r.keep.shape == (20, 4) and r.keep.dtype == torch.bool
    if "k" in kw:
        assert torch.all(r.keep.sum(1) == 2)
    assert len({tuple(k) for k in r.keep.tolist()}) > 2  # samples differ
    torch.testing.assert_close(r.out, _dense_reference(m, x, r.keep), atol=1e-5, rtol=1e-5)
    # per-sample loop: same output and decisions
    for i in range(0, 20, 6):
        one = m(x[i : i + 1])
        assert torch.equal(one.keep[0], r.keep[i])
        torch.testing.assert_close(one.out[0], r.out[i], atol=1e-5, rtol=1e-5)


def test_only_kept_channel_groups_are_computed(x, monkeypatch):
    m = _conv_block(True, k=1)
    m.unit_costs(tuple(x.shape[1:]))  # FLOP measurement (batch 1) happens once, before counting
    calls = []
    real = F.conv2d
    monkeypatch.setattr(
        gating.F,
        "conv2d",
        lambda inp, w, *a: (calls.append((inp.shape[0], *w.shape[:2])), real(inp, w, *a))[1],
    )
    r = m(x)
    first = [c for c in calls if c[2] == 8]  # gated conv: (rows, out channels of a group, 8 in)
    second = [c for c in calls if c[1] == 12]  # next conv: (rows, 12 out, in channels of a group)
    assert all(c[1] == 4 for c in first) and all(c[2] == 4 for c in second)
    assert sum(c[0] for c in first) == int(r.keep.sum()) == 20  # k=1: each sample computes one group
    assert sum(c[0] for c in second) == 20


def test_channel_gating_flops(x):
    m = _conv_block(True, threshold=0.5)
    r = m(x)
    gate, group = m.unit_costs(tuple(x.shape[1:]))
    assert torch.equal(r.flops, gate + r.keep.sum(1).double() * group)
    assert 4 * group == m.full_cost(tuple(x.shape[1:]))  # the groups partition the dense convs
    m.gate.set_threshold(0.0)
    assert torch.all(m(x).flops == gate + m.full_cost(tuple(x.shape[1:])))


def test_channel_gating_training_gradients(x):
    m = _conv_block(True, k=2).train()
    r = m(x)
    assert torch.all(r.keep.sum(1) == 2)
    (r.out.square().mean() + r.probs.mean()).backward()
    assert m.gate.net[-1].weight.grad.abs().sum() > 0 and m.conv.weight.grad is not None


def _reference_attention(a: GatedMultiheadAttention, x, keep, pad=None):
    B, T, D = x.shape
    with torch.no_grad():
        q, k, v = a.qkv(x).view(B, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if pad is None else ~pad[:, None, None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # torch's own attention
        att = att * keep.float()[:, :, None, None]
        return a.proj(att.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("kw", [dict(k=2), dict(threshold=0.5, pool="mean")])
def test_head_gating_equals_reference(kw, monkeypatch):
    torch.manual_seed(0)
    a = GatedMultiheadAttention(16, 4, **kw).eval()
    _spread(a.gate)
    x = torch.randn(12, 6, 16)
    pad = torch.zeros(12, 6, dtype=torch.bool)
    pad[::3, 4:] = True
    a.unit_costs(6)  # FLOP measurement (batch 1) happens once, before counting
    heads = []
    real = a._head
    monkeypatch.setattr(a, "_head", lambda xs, h, m: (heads.append((xs.shape[0], h)), real(xs, h, m))[1])
    for p in (None, pad):
        heads.clear()
        r = a(x, key_padding_mask=p)
        assert len({tuple(k) for k in r.keep.tolist()}) > 2
        torch.testing.assert_close(r.out, _reference_attention(a, x, r.keep, p), atol=1e-5, rtol=1e-5)
        assert sum(n for n, _ in heads) == int(r.keep.sum())  # each head ran on its samples only
        assert all(n == int(r.keep[:, h].sum()) for n, h in heads)
        gate, head = a.unit_costs(6)
        assert torch.equal(r.flops, gate + r.keep.sum(1).double() * head)
    one = a(x[5:6])
    torch.testing.assert_close(one.out[0], a(x).out[5], atol=1e-5, rtol=1e-5)


def test_head_gating_training():
    torch.manual_seed(0)
    a = GatedMultiheadAttention(16, 4, k=3).train()
    r = a(torch.randn(5, 7, 16))
    assert torch.all(r.keep.sum(1) == 3)
    r.out.square().mean().backward()
    assert a.gate.net[-1].weight.grad.abs().sum() > 0


def test_empty_batch_and_bad_input():
    m = _conv_block(True, k=2)
    r = m(torch.randn(0, 8, 8, 8))
    assert r.out.shape == (0, 12, 4, 4) and r.flops.shape == (0,)
    with pytest.raises(ValueError, match="input: expected a \\(B, C, H, W\\) tensor with 8 channels"):
        m(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="finite"):
        m(torch.full((2, 8, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 4\]"):
        ChannelGatedConv(nn.Conv2d(8, 16, 3), groups=4, k=5)
    with pytest.raises(ValueError, match="divisor of out_channels"):
        ChannelGatedConv(nn.Conv2d(8, 15, 3), groups=4, k=1)
    with pytest.raises(ValueError, match="exactly one of k"):
        ChannelGatedConv(nn.Conv2d(8, 16, 3), groups=4)
    with pytest.raises(ValueError, match=r"threshold: expected a value in \[0, 1\]"):
        ChannelGatedConv(nn.Conv2d(8, 16, 3), groups=4, threshold=1.5)
    with pytest.raises(ValueError, match="tau"):
        GatedMultiheadAttention(16, 4, k=1, tau=0.0)
    with pytest.raises(ValueError, match="divisor of dim"):
        GatedMultiheadAttention(16, 5, k=1)
    with pytest.raises(ValueError, match="16 channels"):
        GatedMultiheadAttention(16, 4, k=1)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="top-k"):
        m.gate.set_threshold(0.5)
