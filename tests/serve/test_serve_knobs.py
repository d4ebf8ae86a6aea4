"""Operating points of knob families (block skipping, routing, Skip-RNN, frame skipping, ...) in the
server: the ladder calibrated on held-out data, saved and loaded, and a batch whose requests sit at
different levels answered as each sample run alone at its own level's knob setting."""

import math

import pytest
import torch

import dynets
from dynets.serve import InferenceServer, ServeConfig, ServedModel
from dynets.serve.batcher import Item
from dynets.serve.knobs import KnobSetting, build_knob_ladder, knob_for
from dynets.serve.ladder import Ladder, single_point_ladder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "skip_resnet":
        m = dynets.create_model(name, widths=(8, 8, 16), blocks=(3, 2, 2), image_size=16, num_classes=4)
        x = torch.rand(96, 3, 16, 16, generator=g)
    elif name == "routed_resnet":
        m = dynets.create_model(name, widths=(8, 8, 16), blocks=(1, 1, 2), image_size=16, num_classes=4)
        with torch.no_grad():  # a gate whose preference differs from input to input
            m.router.gate.net[-1].weight.mul_(50)
        x = torch.rand(96, 3, 16, 16, generator=g)
    elif name == "slimmable_resnet":
        m = dynets.create_model(name, widths=(8, 8, 16), blocks=(1, 1, 1), image_size=16, num_classes=4)
        x = torch.rand(96, 3, 16, 16, generator=g)
    elif name.endswith("_tiny"):  # DynamicViT, A-ViT, ToMe
        vit = dict(image_size=16, patch_size=4, dim=32, depth=4, heads=2, num_classes=4)
        extra = {"dynamicvit_tiny": dict(prune_after=(0, 2)), "avit_tiny": {}, "tome_vit_tiny": {}}[name]
        m = dynets.create_model(name, **vit, **extra)
        x = torch.rand(96, 3, 16, 16, generator=g)
    else:
        m = dynets.create_model(name, input_size=2, hidden=8, num_classes=4, seq_len=12)
        x = torch.randn(96, 12, 2, generator=g)
        if name == "frameskip_rnn":  # a policy that prefers long skips, more or less by input
            with torch.no_grad():
                m.skip_policy.weight.normal_(0, 2.0, generator=g)
                m.skip_policy.bias.copy_(torch.arange(m.config.max_skip + 1, dtype=torch.float32))
    return m.eval(), x, torch.randint(0, 4, (96,), generator=g)


@pytest.mark.parametrize(
    "name",
    [
        "skip_resnet",
        "routed_resnet",
        "skip_lstm",
        "frameskip_rnn",
        "slimmable_resnet",
        "dynamicvit_tiny",
        "avit_tiny",
        "tome_vit_tiny",
    ],
)
def test_knob_ladder_and_mixed_level_batches(name, tmp_path):
    model, x, y = _model(name)
    knob = knob_for(model)
    assert knob is not None and ServedModel(model).supports_policy
    ladder = build_knob_ladder(model, x, y, levels=5)
    ratios = ladder.cost_ratios
    # cost falls with the level; the top may pass 1 a little (the gates cost FLOPs too)
    assert len(ladder) >= 2 and all(a > b for a, b in zip(ratios, ratios[1:])) and ratios[0] <= 1.05
    for p in ladder.points:  # each point's setting reproduces the cost measured when it was fit
        assert isinstance(p.policy, KnobSetting) and p.policy.family == knob.family
        p.policy.apply(model)
        with torch.no_grad():
            assert float(model(x).flops.double().mean()) / float(model.full_cost()) == pytest.approx(
                p.cost_ratio
            )
    back = Ladder.load(ladder.save(tmp_path))
    assert [p.policy.to_dict() for p in back.points] == [p.policy.to_dict() for p in ladder.points]

    # a batch at mixed levels: one forward per level, each answer as the sample alone at its level
    server = InferenceServer(ServedModel(model), back, ServeConfig(warmup=False))
    levels = [i % len(back) for i in range(10)]
    items = [Item(x=x[i], future=None, enqueued=0.0, level=lv) for i, lv in enumerate(levels)]
    results = server.run_batch(items)
    for i, (r, lv) in enumerate(zip(results, levels)):
        back.points[lv].policy.apply(model)
        with torch.no_grad():
            ref = model(x[i : i + 1])
        assert r["level"] == lv and r["label"] == int(ref.logits.argmax(-1)[0])
        assert r["flops"] == pytest.approx(float(ref.flops[0]))
        assert r["cost_fraction"] == pytest.approx(float(ref.flops[0]) / float(model.full_cost()))


def test_knob_single_point_and_bad_input():
    model, x, y = _model("routed_resnet")
    model.set_cost_penalty(0.25)
    ladder = single_point_ladder(model)
    assert ladder.points[0].policy.to_dict() == {"kind": "knob", "family": "route", "value": 0.25}
    assert math.isnan(ladder.points[0].cost_ratio) and not ladder.movable
    with pytest.raises(ValueError, match="knob family"):
        KnobSetting("bogus", 0.5)
    with pytest.raises(ValueError, match="finite number"):
        KnobSetting("route", float("nan"))
    with pytest.raises(ValueError, match="finite number or a list"):
        KnobSetting("width", [])
    with pytest.raises(ValueError, match="non-zero numbers of inputs and labels"):
        build_knob_ladder(model, x, y[:3])
    with pytest.raises(ValueError, match="run-time knob"):
        build_knob_ladder(dynets.create_model("static_gru", input_size=2), x, y)


def test_served_knob_model_from_a_directory_with_calibration_data(tmp_path):
    """`dynets serve DIR --calibration-data digits` path: a saved skip_resnet on the embedded digits."""
    from dynets.core.serialization import save
    from dynets.serve.launch import build_server

    torch.manual_seed(0)
    m = dynets.create_model("skip_resnet", in_channels=1, image_size=8, widths=(8, 8, 16), blocks=(2, 2, 2))
    save(m.eval(), tmp_path / "skip")
    server = build_server(str(tmp_path / "skip"), ServeConfig(warmup=False), calibration_data="digits")
    assert server.ladder.source == "calibrated" and server.ladder.movable
    assert all(p.policy.family == "skip" for p in server.ladder.points)
    assert server.budget_level(0.5) == server.ladder.level_for_budget(0.5) > 0
