"""Glance and focus: the dynamic run equals the reference (glance on all, focus on all, then
select), only unsure samples are focused, FLOPs per sample, crops, training, save/load."""

import pytest
import torch

import dynets
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.policies import ConfidencePolicy
from dynets.spatial.glance import GlanceFocusNet
from dynets.spatial.plots import plot_glance_focus

TINY = dict(
    image_size=16,
    glance_size=8,
    patch_size=10,
    patch_grid=2,
    widths=(8, 16),
    glance_blocks=(1, 1),
    focus_blocks=(1, 1),
)


@pytest.fixture(scope="module")
def model() -> GlanceFocusNet:
    torch.manual_seed(0)
    m = dynets.create_model("glance_focus", **TINY)
    m.train()
    with torch.no_grad():  # settle BatchNorm statistics so logits are varied, then evaluate
        for _ in range(3):
            m(torch.rand(16, 3, 16, 16))
        m.glance_head.weight.mul_(30)
    return m.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(10, 3, 16, 16)


def _median_confidence(model, x):
    with torch.no_grad():
        return float(model.all_exit_logits(x)[0].softmax(-1).amax(-1).median())


def test_dynamic_equals_reference(model, x):
    thr = _median_confidence(model, x)
    out = model(x, threshold=thr)
    assert isinstance(out, DynamicOutput)
    focused = out.decisions["focused"]
    assert 0 < int(focused.sum()) < x.shape[0], "the test needs both glanced-only and focused samples"
    with torch.no_grad():
        g, f = model.all_exit_logits(x)  # reference: glance on all, focus on all, then select
        conf = g.softmax(-1).amax(-1)
        choice = model.select(model.run_glance(x)[0])
    assert torch.equal(focused, conf < thr)
    torch.testing.assert_close(out.logits, torch.where(focused[:, None], f, g), atol=1e-5, rtol=1e-4)
    assert torch.equal(out.exit_index, focused.long())
    patch = out.decisions["patch"]
    assert torch.equal(patch[focused], model.pos[choice[focused]]) and bool((patch[~focused] == -1).all())
    costs = model.exit_costs()
    assert costs[0] < costs[1] and torch.equal(out.flops, costs[focused.long()])


def test_only_unsure_samples_are_focused(model, x):
    thr = _median_confidence(model, x)
    rows = []
    hook = model.focus.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        out = model(x, threshold=thr)
    finally:
        hook.remove()
    assert rows == [int(out.decisions["focused"].sum())]
    assert not model(x, threshold=0.0).decisions["focused"].any()  # everyone stops after the glance
    for i in (0, 7):  # batch of one equals its row
        one = model(x[i : i + 1], threshold=thr)
        torch.testing.assert_close(one.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)


def test_crops(model, x):
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    crops = model.crops(x, idx)
    assert crops.shape == (10, 3, 10, 10)
    for b in range(10):
        r, c = model.pos[idx[b]].tolist()
        assert torch.equal(crops[b], x[b, :, r : r + 10, c : c + 10])
    assert model.pos.tolist() == [[0, 0], [0, 6], [6, 0], [6, 6]]


def test_training_reaches_the_selector(x):
    torch.manual_seed(2)
    m = dynets.create_model("glance_focus", **TINY).train()
    out = m(x)
    assert isinstance(out, MultiExitOutput) and len(out.exit_logits) == 2
    out.exit_logits[1].logsumexp(-1).mean().backward()  # the focus loss trains the patch selector
    assert m.selector[0].weight.grad is not None and m.selector[0].weight.grad.abs().sum() > 0


def test_calibration_tools_work(model, x):
    from dynets.bench.evaluate import collect
    from dynets.policies.calibration import calibrate

    data = type("D", (), {"x": x, "y": torch.randint(0, 10, (10,))})()
    outs = collect(model, data)
    cal = calibrate(
        "confidence", outs.exit_logits, outs.labels, outs.exit_costs, 0.8, full_cost=model.full_cost()
    )
    assert isinstance(cal.policy, ConfidencePolicy)


def test_bad_input_and_round_trip(model, x, tmp_path):
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 16, 16), float("nan")))
    empty = model(torch.rand(0, 3, 16, 16))
    assert empty.logits.shape == (0, 10) and empty.decisions["patch"].shape == (0, 2)
    with pytest.raises(ValueError, match="patch_size"):
        dynets.create_model("glance_focus", **{**TINY, "patch_size": 20})
    model.policy = ConfidencePolicy(_median_confidence(model, x))
    dynets.save(model, tmp_path / "gf")
    loaded = dynets.load(tmp_path / "gf")
    assert loaded.policy.thresholds == model.policy.thresholds
    a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.decisions["patch"], b.decisions["patch"])
    path = plot_glance_focus(x, a.decisions["focused"], a.decisions["patch"], 10, tmp_path / "gf.png")
    assert path.stat().st_size > 0
