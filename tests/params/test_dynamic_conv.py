"""DynamicConv2d (one grouped convolution over the batch) vs a per-sample loop of F.conv2d with the
independently aggregated kernel, forward and gradients; bad input; the dyconv_resnet zoo model."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.params.dynamic_conv import DynamicConv2d

torch.set_num_threads(1)

CASES = [  # kernel, stride, padding, dilation, bias
    (3, 1, 1, 1, True),
    (3, 2, 0, 1, False),
    (3, 1, 2, 2, True),
    ((1, 3), (2, 1), (0, 1), 1, True),
]


def _loop_reference(conv: DynamicConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample on its own: attention from its pooled input, kernel = sum_k a_k W_k, F.conv2d."""
    outs, atts = [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        a = torch.softmax(conv.gate(xi.mean((2, 3))) / conv.temperature, -1)[0]  # (K,)
        w = (a[:, None, None, None, None] * conv.kernels).sum(0)  # kernels: (K, Cout, Cin, kh, kw)
        b = (a[:, None] * conv.bias).sum(0) if conv.bias is not None else None
        outs.append(F.conv2d(xi, w, b, conv.stride, conv.padding, conv.dilation))
        atts.append(a)
    return torch.cat(outs), torch.stack(atts)


@pytest.mark.parametrize("kernel, stride, padding, dilation, bias", CASES)
def test_grouped_equals_per_sample_loop_forward_and_backward(kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = DynamicConv2d(6, 5, kernel, stride, padding, dilation, bias=bias, num_experts=3, temperature=0.7)
    with torch.no_grad():
        conv.gate[-1].weight.mul_(5)  # attention far from uniform
    ref_conv = copy.deepcopy(conv)
    x = torch.randn(7, 6, 9, 10, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = conv(x)
    yr, ar = _loop_reference(ref_conv, xr)
    assert y.shape == yr.shape
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.last_attention, ar.detach())
    assert conv.last_attention.shape == (7, 3)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, p), pr in zip(conv.named_parameters(), ref_conv.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_batch_one_and_empty():
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 6, 3, padding=1)
    x = torch.randn(5, 4, 8, 8)
    y = conv(x)
    torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv(x[2:3]), y[2:3], rtol=1e-5, atol=1e-6)
    assert conv(x[:0]).shape == (0, 6, 8, 8)
    s = DynamicConv2d(4, 6, 3, stride=2)
    assert s(x).shape == (5, 6, 3, 3) and s(x[:0]).shape == (0, 6, 3, 3)


def test_flops_are_one_conv_plus_the_kernel_mixing():
    conv = DynamicConv2d(8, 16, 3, padding=1, bias=False, num_experts=4, reduction=2)
    x1 = torch.randn(1, 8, 8, 8)
    static = measure_flops(torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), x1)
    mixing = 2 * 4 * 16 * 8 * 9  # (1, K) @ (K, Cout*Cin*k*k)
    gate = 2 * 8 * 4 + 2 * 4 * 4
    assert measure_flops(conv, x1) == static + mixing + gate


def test_bad_input_and_settings():
    conv = DynamicConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="input"):
        conv(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="input"):
        conv(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="temperature"):
        DynamicConv2d(4, 6, 3, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        conv.temperature = -1.0
    with pytest.raises(ValueError, match="groups"):
        DynamicConv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match="num_experts"):
        DynamicConv2d(4, 6, 3, num_experts=0)


SMALL = dict(widths=(8, 8, 16), blocks=(1, 1, 1), image_size=16, num_classes=4, dynamic_groups=(0, 1, 2))


def test_dyconv_resnet_equals_per_sample_runs_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = create_model("dyconv_resnet", **SMALL).eval()
    for conv in m.dynamic_convs:
        with torch.no_grad():
            conv.gate[-1].weight.mul_(5)
    x = torch.rand(6, 3, 16, 16)
    out = m(x)
    assert isinstance(out, DynamicOutput) and out.logits.shape == (6, 4)
    att = out.decisions["kernel_attention"]
    assert att.shape == (6, 6, 4)  # 3 blocks x 2 convs, 4 experts
    torch.testing.assert_close(att.sum(-1), torch.ones(6, 6))
    one = torch.cat([m(x[i : i + 1]).logits for i in range(6)])  # per-sample reference
    torch.testing.assert_close(out.logits, one, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.flops, torch.full((6,), m.full_cost(), dtype=torch.float64))
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)  # as the train loop does
    xl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(xl).logits, out.logits, rtol=1e-4, atol=1e-5)
    save(m, tmp_path / "dy")
    back = load(tmp_path / "dy")
    again = back(x)
    assert torch.equal(again.logits, out.logits)
    assert torch.equal(again.decisions["kernel_attention"], att)
    m.set_temperature(2.0)
    save(m, tmp_path / "dy2")
    assert load(tmp_path / "dy2").dynamic_convs[0].temperature == 2.0


def test_dyconv_resnet_training_cost_and_bad_input():
    torch.manual_seed(0)
    m = create_model("dyconv_resnet", **SMALL).train()
    x = torch.rand(4, 3, 16, 16)
    out = m(x)
    assert isinstance(out, MultiExitOutput) and out.logits.shape == (4, 4) and out.aux["loss"].dim() == 0
    F.cross_entropy(out.logits, torch.arange(4)).backward()
    assert all(
        c.weight.grad.abs().sum() > 0 and c.gate[0].weight.grad.abs().sum() > 0 for c in m.dynamic_convs
    )
    m.eval()
    empty = m(x[:0])
    assert empty.logits.shape == (0, 4) and empty.flops.shape == (0,)
    with pytest.raises(ValueError, match="input"):
        m(torch.rand(2, 1, 16, 16))
    bad = x.clone()
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        m(bad)
    with pytest.raises(ValueError, match="temperature"):
        create_model("dyconv_resnet", temperature=0.0)
    with pytest.raises(ValueError, match="dynamic_groups"):
        create_model("dyconv_resnet", dynamic_groups=(5,))


def test_default_dyconv_resnet_costs_under_5_percent_more_than_the_static_one():
    dy, st = create_model("dyconv_resnet"), create_model("static_resnet")
    assert st.full_cost() < dy.full_cost() < 1.05 * st.full_cost()
