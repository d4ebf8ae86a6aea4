"""EarlyExitMSDNet: multi-scale features, dynamic execution against the all-exits reference, costs, I/O."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model, list_models
from dynets.core.serialization import load, save
from dynets.models.msdnet import EarlyExitMSDNet, MSDHeadConfig, MSDNetConfig
from dynets.policies.exit_policies import ConfidencePolicy
from dynets.policies.replay import replay_exits


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and running statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small convs: intra-op threads add overhead here, and on a shared 2-core box they stall
    (measured 75 s for this file with 2 threads under load, 4 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> EarlyExitMSDNet:
    torch.manual_seed(0)
    m = create_model("msdnet")
    _randomize_bn(m)
    with torch.no_grad():  # sharper heads: confidences spread out, thresholds sit clear of every score
        for head in m.heads:
            head[-1].weight.mul_(10)
    return m.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _spread_policy(
    ref: list[torch.Tensor], levels: tuple[float, ...] = (0.8, 0.7, 0.6, 0.5)
) -> ConfidencePolicy:
    """Per-exit thresholds halfway between two neighbouring reference scores near the given quantiles,
    so samples leave at several exits and none sits on a threshold."""
    thresholds = []
    for k, q in enumerate(levels[: len(ref) - 1]):
        s = ref[k].softmax(-1).amax(-1).sort().values
        i = int(q * (len(s) - 1))
        thresholds.append(float(s[i] + s[i + 1]) / 2)
    return ConfidencePolicy(thresholds)


def test_registered():
    assert {"msdnet", "static_msdnet"} <= set(list_models("*msdnet*"))


def test_train_forward_returns_every_exit(model):
    model.train()
    try:
        out = model(torch.rand(4, 3, 32, 32))
    finally:
        model.eval()
    assert isinstance(out, MultiExitOutput)
    assert len(out.exit_logits) == model.num_exits == 5
    assert all(lg.shape == (4, 10) for lg in out.exit_logits)


def test_stages_carry_a_shrinking_list_of_scales(model):
    h = torch.rand(2, 3, 32, 32)
    lengths = []
    with torch.no_grad():
        for stage in model.stages:
            h = stage(h)
            assert isinstance(h, list)
            assert tuple(h[-1].shape[-2:]) == (8, 8)  # coarsest scale stays last
            sizes = [t.shape[-1] for t in h]
            assert sizes == [8 * 2 ** (len(h) - 1 - j) for j in range(len(h))]  # finest first, halving
            lengths.append(len(h))
    assert lengths[0] == 3 and lengths[-1] == 1
    assert lengths == sorted(lengths, reverse=True)


def test_dynamic_equals_all_exits_reference(model, x):
    with torch.no_grad():
        ref = model.all_exit_logits(x)
    policy = _spread_policy(ref)
    expected = replay_exits(policy, ref)
    assert len(expected.unique()) >= 3, f"samples should leave at several exits, got {expected.tolist()}"
    out = model(x, policy=policy)
    assert isinstance(out, DynamicOutput)
    assert torch.equal(out.exit_index, expected)
    want = torch.stack([ref[k][i] for i, k in enumerate(expected.tolist())])
    assert torch.allclose(out.logits, want, atol=1e-5)


def test_batch_of_one_and_empty_batch(model, x):
    with torch.no_grad():
        policy = _spread_policy(model.all_exit_logits(x))
    batched = model(x, policy=policy)
    for i in (0, 7, 23, 47):
        single = model(x[i : i + 1], policy=policy)
        assert torch.equal(single.exit_index, batched.exit_index[i : i + 1])
        assert torch.allclose(single.logits, batched.logits[i : i + 1], atol=1e-5)
    empty = model(x[:0], policy=policy)
    assert empty.logits.shape == (0, 10) and empty.exit_index.shape == (0,) and empty.flops.shape == (0,)


def test_flops_are_the_exit_costs(model, x):
    with torch.no_grad():
        policy = _spread_policy(model.all_exit_logits(x))
    out = model(x, policy=policy)
    costs = model.exit_costs()
    assert torch.equal(out.flops, costs[out.exit_index])
    assert bool((costs[1:] > costs[:-1]).all())
    assert 60e6 <= model.full_cost() <= 120e6  # the design target at 32x32: near ResNet-20's ~82 MFLOPs


def test_static_msdnet_shares_the_backbone(model):
    static = create_model("static_msdnet")
    assert static.num_exits == 1 and static.exit_stages == [len(static.stages) - 1]
    assert static.stages.state_dict().keys() == model.stages.state_dict().keys()
    assert static.full_cost() == model.full_cost()
    static.train()
    assert len(static(torch.rand(2, 3, 32, 32)).exit_logits) == 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=1, image_size=28, scales=3, blocks=3, layers_per_block=(1, 2, 1)),
        dict(image_size=16, scales=2, blocks=2, exits=(0,), head=MSDHeadConfig(kind="linear")),
        dict(image_size=8, scales=1, blocks=2, growth=4, reduction=1.0),
    ],
)
def test_other_sizes_and_options(kw):
    m = EarlyExitMSDNet(MSDNetConfig(**kw)).eval()
    c = m.config
    xs = torch.rand(3, c.in_channels, c.image_size, c.image_size)
    out = m(xs, policy=ConfidencePolicy(0.0))  # everyone leaves at the first exit
    assert out.logits.shape == (3, 10) and out.exit_index.tolist() == [0, 0, 0]
    with torch.no_grad():
        torch.testing.assert_close(out.logits, m.all_exit_logits(xs)[0])


def test_save_load_round_trip(model, x, tmp_path):
    with torch.no_grad():
        model.policy = _spread_policy(model.all_exit_logits(x))
    before = model(x)
    loaded = load(save(model, tmp_path / "msdnet"))
    after = loaded(x)
    assert isinstance(loaded, EarlyExitMSDNet) and loaded.config == model.config
    assert torch.equal(before.exit_index, after.exit_index)
    assert torch.equal(before.logits, after.logits)


@pytest.mark.parametrize(
    "field, value",
    [
        ("in_channels", 0),
        ("image_size", 30),
        ("num_classes", 1),
        ("blocks", 0),
        ("layers_per_block", 0),
        ("layers_per_block", (2, 2)),
        ("channels", 0),
        ("growth", -1),
        ("scales", 0),
        ("bottleneck", 0),
        ("reduction", 0.0),
        ("reduction", 1.5),
        ("exits", (4,)),
        ("mean", (0.5, 0.5)),
        ("std", (0.0,)),
        ("head", "conv"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MSDNetConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        create_model("msdnet", **{field: value})


def test_bad_head_kind():
    with pytest.raises(ValueError, match="head kind"):
        MSDHeadConfig(kind="bogus")
