"""HyperLinear / HyperConv2d (batched einsums) vs per-sample loops with the weights built
independently from the parameters, forward and gradients; the hyper_mlp zoo model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.params.hypernet import HyperConv2d, HyperLinear

torch.set_num_threads(1)


def _randomize(layer: torch.nn.Module) -> torch.nn.Module:
    """U (and the bias generator) start at zero; give them values so the per-sample part matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("U", "bias_U"):
                p.normal_(0, 0.5)
    return layer


def _loop_linear(layer: HyperLinear, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    outs = []
    for i in range(x.shape[0]):
        z = layer.hyper(ctx[i : i + 1])[0]  # (r,)
        w = layer.weight + layer.U @ torch.diag(z) @ layer.V  # W0 + U diag(z) V
        b = layer.bias + (layer.bias_U @ z if layer.bias_U is not None else 0)
        outs.append(x[i] @ w.T + b)
    return torch.stack(outs)


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("with_context", [False, True])
def test_hyper_linear_equals_per_sample_loop(seq, with_context):
    torch.manual_seed(0)
    layer = _randomize(HyperLinear(6, 5, context_features=3 if with_context else None, rank=4, hidden=8))
    ref = copy.deepcopy(layer)
    x = torch.randn(7, 4, 6) if seq else torch.randn(7, 6)
    ctx = torch.randn(7, 3) if with_context else (x.mean(1) if seq else x)
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = layer(x, ctx if with_context else None)
    ctx_r = ctx if with_context else (xr.mean(1) if seq else xr)
    yr = _loop_linear(ref, xr, ctx_r)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    assert layer.last_code.shape == (7, 4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, p), pr in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_hyper_linear_generate_matches_forward_with_bmm():
    torch.manual_seed(0)
    layer = _randomize(HyperLinear(6, 5, rank=3))
    x = torch.randn(4, 6)
    w, b = layer.generate(x)
    assert w.shape == (4, 5, 6) and b.shape == (4, 5)
    torch.testing.assert_close(torch.bmm(w, x[:, :, None])[..., 0] + b, layer(x), rtol=1e-5, atol=1e-6)
    fresh = HyperLinear(6, 5, rank=3)  # U = 0 at initialisation: every sample sees W0
    torch.testing.assert_close(fresh(x), F.linear(x, fresh.weight, fresh.bias))
    nob = _randomize(HyperLinear(6, 5, bias=False))
    torch.testing.assert_close(
        torch.bmm(nob.generate(x)[0], x[:, :, None])[..., 0], nob(x), rtol=1e-5, atol=1e-6
    )
    assert layer(x[:0]).shape == (0, 5)


def test_hyper_linear_bad_input():
    layer = HyperLinear(6, 5, context_features=3)
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(2, 6))
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(2, 6), torch.randn(3, 3))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(2, 7), torch.randn(2, 3))
    with pytest.raises(ValueError, match="rank"):
        HyperLinear(6, 5, rank=0)


def test_hyper_conv_equals_per_sample_loop():
    torch.manual_seed(0)
    conv = _randomize(HyperConv2d(4, 5, 3, stride=2, padding=1, rank=3, hidden=8))
    ref = copy.deepcopy(conv)
    x = torch.randn(5, 4, 9, 9, requires_grad=True)
    y = conv(x)
    xr = x.detach().clone().requires_grad_(True)
    outs = []
    for i in range(5):
        z = ref.hyper(xr[i : i + 1].mean((2, 3)))[0]
        w = ref.weight + torch.einsum("or,r,rikl->oikl", ref.U, z, ref.V)
        outs.append(F.conv2d(xr[i : i + 1], w, ref.bias, 2, 1))
    yr = torch.cat(outs)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ref.generate(xr.mean((2, 3)))[0],
        conv.weight + torch.einsum("or,r,rikl->oikl", conv.U, conv.hyper(x.mean((2, 3)))[0], conv.V),
    )
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for p, pr in zip(conv.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="input"):
        conv(torch.randn(2, 3, 9, 9))


@pytest.mark.parametrize(
    "kw", [dict(image_size=8, hidden=32, rank=4), dict(input_size=10, hidden=16, rank=2)]
)
def test_hyper_mlp_round_trip_per_sample_and_bad_input(kw, tmp_path):
    torch.manual_seed(0)
    m = create_model("hyper_mlp", num_classes=3, **kw).eval()
    _randomize(m.hyper)
    x = torch.rand(5, *m.input_shape)
    out = m(x)
    assert isinstance(out, DynamicOutput) and out.logits.shape == (5, 3)
    assert out.decisions["hyper_code"].shape == (5, kw["rank"])
    assert torch.equal(out.flops, torch.full((5,), m.full_cost(), dtype=torch.float64)) and m.full_cost() > 0
    one = torch.cat([m(x[i : i + 1]).logits for i in range(5)])
    torch.testing.assert_close(out.logits, one, rtol=1e-5, atol=1e-6)
    save(m, tmp_path / "h")
    back = load(tmp_path / "h")
    assert torch.equal(back(x).logits, out.logits)
    assert torch.equal(back(x).decisions["hyper_code"], out.decisions["hyper_code"])
    empty = m(x[:0])
    assert empty.logits.shape == (0, 3) and empty.flops.shape == (0,)
    with pytest.raises(ValueError, match="input"):
        m(torch.rand(5, 11))
    bad = x.clone()
    bad.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(bad)
    m.train()
    tr = m(x)
    assert isinstance(tr, MultiExitOutput) and tr.aux["loss"].dim() == 0
    F.cross_entropy(tr.logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert m.hyper.hyper[0].weight.grad.abs().sum() > 0
