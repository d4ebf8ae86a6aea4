"""Slimmable networks: narrow widths are real narrower layers, the per-sample width chooser equals
the all-widths reference in input order, width groups run as sub-batches, FLOPs, sandwich training,
BN recalibration, budget calibration, save/load and bad input."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynets.width.slimmable as slim
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.train import TrainConfig
from dynets.width.slimmable import (
    SlimmableConv2d,
    WidthPolicy,
    calibrate_width_policy,
    recalibrate_bn,
    train_slimmable,
)

SMALL = dict(widths=(8, 16, 16), blocks=(1, 1, 1), image_size=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("slimmable_resnet", **SMALL).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        m.fc.weight.mul_(20)  # confidences spread out
    return m


@pytest.fixture(scope="module")
def x():
    return torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _policy_at_quantiles(model, x, qs=(0.7, 0.5, 0.25)):
    conf = model.forward_width(x, 0).softmax(-1).amax(-1).sort().values
    idx = [int(q * (len(conf) - 2)) for q in qs]
    return WidthPolicy([float(conf[i] + conf[i + 1]) / 2 for i in idx])  # midway: no sample at a boundary


def test_narrow_width_runs_narrow_weights(model, x, monkeypatch):
    shapes = []
    real = F.conv2d
    monkeypatch.setattr(
        slim.F, "conv2d", lambda inp, w, *a: (shapes.append(tuple(w.shape)), real(inp, w, *a))[1]
    )
    with torch.no_grad():
        model.forward_width(x[:2], 0)
    assert shapes[0] == (2, 3, 3, 3)  # stem: 8 channels at width 0.25
    assert all(s[0] <= 4 and s[1] <= 4 for s in shapes[1:])  # 16 * 0.25
    # a slimmable conv at width wi is exactly a smaller nn.Conv2d holding the first channels
    conv = SlimmableConv2d(8, 12, 3, 1, 1, width_mults=(0.5, 1.0), bias=True)
    small = nn.Conv2d(4, 6, 3, 1, 1)
    with torch.no_grad():
        small.weight.copy_(conv.weight[:6, :4])
        small.bias.copy_(conv.bias[:6])
        inp = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(conv(inp, 0), small(inp))
        assert conv(inp, 0).shape == (2, 6, 5, 5)


def test_width_chooser_equals_reference_in_input_order(model, x):
    policy = _policy_at_quantiles(model, x)
    out = model(x, policy)
    assert isinstance(out, DynamicOutput)
    index = out.decisions["width_index"]
    assert torch.bincount(index, minlength=4).min() > 0  # every width is used
    assert torch.equal(out.decisions["width"], torch.tensor(model.width_mults)[index])
    with torch.no_grad():
        ref = torch.stack(model.all_width_logits(x), 1)  # (B, K, C): every sample at every width
    picked = ref[torch.arange(32), index]
    torch.testing.assert_close(out.logits, picked, atol=1e-5, rtol=1e-5)
    for i in range(0, 32, 7):  # per-sample loop (batch size 1 path)
        one = model(x[i : i + 1], policy)
        torch.testing.assert_close(one.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)
        assert one.decisions["width_index"][0] == index[i]


def test_width_groups_run_as_sub_batches_and_flops(model, x, monkeypatch):
    policy = _policy_at_quantiles(model, x)
    calls = []
    real = model.forward_width
    monkeypatch.setattr(
        model, "forward_width", lambda t, wi: (calls.append((t.shape[0], wi)), real(t, wi))[1]
    )
    out = model(x, policy)
    index = out.decisions["width_index"]
    counts = torch.bincount(index, minlength=4).tolist()
    assert calls == [(32, 0)] + [(counts[k], k) for k in range(1, 4) if counts[k]]
    c = model.width_costs()
    expected = torch.where(index > 0, c[0] + c[index], c[0])
    assert torch.equal(out.flops, expected)
    assert c[0] < c[1] < c[2] < c[3] and model.full_cost() == float(c[3])
    # a fixed width costs exactly that width, for every sample
    fixed = model(x, width=0.5)
    assert torch.equal(fixed.flops, c[1].repeat(32)) and torch.all(fixed.decisions["width"] == 0.5)


@pytest.mark.parametrize("batch_size", [1, 5, 8, 32, 64])
def test_run_pooled_equals_the_reference_and_runs_full_batches(model, x, batch_size, monkeypatch):
    policy = _policy_at_quantiles(model, x)
    with torch.no_grad():
        ref = torch.stack(model.all_width_logits(x), 1)  # (B, K, C): every sample at every width
    per_batch = [model(x[i : i + batch_size], policy) for i in range(0, 32, batch_size)]
    calls = []
    real = model.forward_width
    monkeypatch.setattr(
        model, "forward_width", lambda t, wi: (calls.append((t.shape[0], wi)), real(t, wi))[1]
    )
    out = model.run_pooled(x, batch_size, policy)
    index = torch.cat([o.decisions["width_index"] for o in per_batch])
    assert torch.equal(out.decisions["width_index"], index)
    assert torch.equal(out.decisions["width"], torch.tensor(model.width_mults)[index])
    assert torch.equal(out.flops, torch.cat([o.flops for o in per_batch]))
    torch.testing.assert_close(out.logits, ref[torch.arange(32), index], atol=1e-5, rtol=1e-5)
    counts = torch.bincount(index, minlength=4).tolist()
    for k in range(1, 4):  # each wider width: full batches, then one flushed remainder
        sizes = [n for n, wi in calls if wi == k]
        assert sum(sizes) == counts[k]
        assert all(n >= batch_size for n in sizes[:-1]) and len(sizes) <= max(1, -(-counts[k] // batch_size))


def test_run_pooled_bad_input(model, x):
    with pytest.raises(ValueError, match="batch_size"):
        model.run_pooled(x, 0)
    with pytest.raises(TypeError, match="WidthPolicy"):
        model.run_pooled(x, 8, policy=0.5)
    with pytest.raises(ValueError):
        model.run_pooled(x[:, :2], 8)


def test_sandwich_label_loss_returns_every_width_as_an_exit(x):
    torch.manual_seed(0)
    m = create_model("slimmable_resnet", **SMALL, sandwich_random=1).train()
    assert m.sandwich_loss == "label"  # the default
    out = m(x)
    assert isinstance(out, MultiExitOutput) and "loss" not in out.aux
    widths = out.aux["widths"]
    assert widths[0] == 0 and widths[-1] == 3 and len(widths) == 3 and len(out.exit_logits) == 3
    m.eval()
    with torch.no_grad():  # exit k is width widths[k] (train-mode BN: compare in eval on the same weights)
        ref = m.all_width_logits(x)
    m.train()
    for module in m.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    torch.manual_seed(0)
    again = m(x)
    for k, wi in enumerate(again.aux["widths"]):
        torch.testing.assert_close(again.exit_logits[k], ref[wi], atol=1e-5, rtol=1e-5)
    # the train loop's multi-exit loss reaches every width's own BN
    m.train()
    m.zero_grad()
    out = m(x)
    sum(F.cross_entropy(z, torch.zeros(32, dtype=torch.long)) for z in out.exit_logits).backward()
    for wi in out.aux["widths"]:
        assert m.stem_bn.bn[wi].weight.grad is not None


def test_sandwich_training_and_validation_outputs(x):
    torch.manual_seed(0)
    m = create_model("slimmable_resnet", **SMALL, sandwich_random=1, sandwich_loss="distill").train()
    out = m(x)
    assert isinstance(out, MultiExitOutput) and len(out.exit_logits) == 1
    assert out.aux["widths"][0] == 0 and out.aux["widths"][-1] == 3 and len(out.aux["widths"]) == 3
    (F.cross_entropy(out.logits, torch.zeros(32, dtype=torch.long)) + out.aux["loss"]).backward()
    assert m.stem_bn.bn[0].weight.grad is not None and m.stem_bn.bn[3].weight.grad is not None
    m.eval()
    m.training = True  # the train loop's validation: every width, largest last
    val = m(x)
    assert len(val.exit_logits) == 4 and "loss" not in val.aux


def test_train_slimmable_and_recalibrate_bn(x):
    torch.manual_seed(0)
    m = create_model("slimmable_resnet", **SMALL, switchable_bn=False)
    assert not any(p.requires_grad for p in m.stem_bn.bn.parameters())  # shared affine, private stats
    data = SimpleNamespace(x=x, y=torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2)))
    train_slimmable(m, data, TrainConfig(epochs=1, batch_size=16, progress=False), recalibrate=0)
    before = m.stem_bn.bn[1].running_mean.clone()
    untouched = m.stem_bn.bn[0].running_mean.clone()
    recalibrate_bn(m, x, 0.5)
    with torch.no_grad():
        stem = m.stem_conv(m.normalize(x), 1)  # (B, 4, H, W) at width 0.5
    torch.testing.assert_close(m.stem_bn.bn[1].running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert not torch.equal(before, m.stem_bn.bn[1].running_mean)
    assert torch.equal(untouched, m.stem_bn.bn[0].running_mean) and not m.training


def test_calibration_meets_the_budget(model, x):
    m = create_model("slimmable_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(3))
    for budget in (0.4, 0.8):
        cal = calibrate_width_policy(m, x, budget, val_y=y)
        flops = float(m(x).flops.mean())
        assert flops == pytest.approx(cal.val_flops)
        assert abs(flops - budget * m.full_cost()) / m.full_cost() < 0.05
    with pytest.raises(ValueError, match="budget"):
        calibrate_width_policy(m, x, 0.01)


def test_save_load_round_trip(model, x, tmp_path):
    model.width_policy = _policy_at_quantiles(model, x)
    ref = model(x)
    save(model, tmp_path / "slim")
    back = load(tmp_path / "slim")
    assert back.width_policy.thresholds == model.width_policy.thresholds
    out = back(x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.flops, ref.flops)
    assert torch.equal(out.decisions["width"], ref.decisions["width"])


def test_bad_input(model):
    with pytest.raises(ValueError, match="width: 0.3 is not available"):
        model(torch.rand(2, 3, 16, 16), width=0.3)
    with pytest.raises(ValueError, match=r"width_mults: expected multipliers in \(0, 1\]"):
        create_model("slimmable_resnet", width_mults=(0.5, 1.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        create_model("slimmable_resnet", width_mults=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"threshold: expected a value in \[0, 1\]"):
        WidthPolicy([0.5, 1.2])
    with pytest.raises(ValueError, match="sandwich_loss: expected one of .*'label'.*got 'kd'"):
        create_model("slimmable_resnet", sandwich_loss="kd")
    with pytest.raises(ValueError, match="expected 1 or 3 thresholds"):
        model(torch.rand(2, 3, 16, 16), WidthPolicy([0.9, 0.8]))
    with pytest.raises(ValueError, match="input: expected shape"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="finite"):
        model(torch.full((2, 3, 16, 16), float("inf")))
    empty = model(torch.rand(0, 3, 16, 16))
    assert (
        empty.logits.shape == (0, 10) and empty.flops.shape == (0,) and empty.decisions["width"].shape == (0,)
    )


@pytest.mark.parametrize("switchable", [True, False])
def test_init_from_static_reproduces_it_at_full_width(x, switchable):
    torch.manual_seed(0)
    static = create_model("static_resnet", **SMALL).eval()
    with torch.no_grad():
        for mod in static.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.weight.uniform_(0.5, 1.5)
    m = create_model("slimmable_resnet", **SMALL, switchable_bn=switchable).init_from_static(static).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x, width=1.0).logits, static.forward_static(x), atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_result(model, x):
    m = create_model("slimmable_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    policy = _policy_at_quantiles(m, x)
    ref = m(x, policy)
    m.to(memory_format=torch.channels_last)
    out = m(x.contiguous(memory_format=torch.channels_last), policy)
    assert torch.equal(out.decisions["width_index"], ref.decisions["width_index"])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
