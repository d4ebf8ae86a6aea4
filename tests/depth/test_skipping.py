"""Block skipping: dynamic execution against run-everything-and-select and per-sample references,
skipped blocks really not run, FLOPs as the sum of units, budget training, calibration, save/load."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.depth.skipping import SkipNetwork, SkipPolicy, calibrate_skip_threshold, mean_flops
from dynets.train import TrainConfig, train

SMALL = dict(widths=(8, 8, 16), blocks=(3, 2, 2), image_size=16)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@torch.no_grad()
def _spread_gates(model: SkipNetwork, x: torch.Tensor, seed: int = 0) -> None:
    """Gates whose probabilities spread over (0, 1) across the samples of x (boundary at the median)."""
    g = torch.Generator().manual_seed(seed)
    h, gi = model.stem(x), 0
    for i, block in enumerate(model.blocks):
        if model.gated[i]:
            lin = model.gates[gi].net[-1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            proj = h.mean(dim=(2, 3)) @ lin.weight[0]
            scale = 3.0 / proj.std()
            lin.weight.mul_(scale)
            lin.bias.fill_(-float(proj.median()) * scale)
            gi += 1
        h = block(h)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model(x) -> SkipNetwork:
    torch.manual_seed(0)
    m = create_model("skip_resnet", **SMALL).eval()
    with torch.no_grad():
        _randomize_bn(m)
    _spread_gates(m, x)
    return m


@torch.no_grad()
def _run_all_and_select(model: SkipNetwork, x: torch.Tensor, blocks_run: torch.Tensor) -> torch.Tensor:
    """Independent reference: every block on every sample, keep block(h) where the decision says run."""
    h = model.stem(x)
    gi = 0
    for i, block in enumerate(model.blocks):
        out = block(h)
        if model.gated[i]:
            out = torch.where(blocks_run[:, gi].view(-1, 1, 1, 1), out, h)
            gi += 1
        h = out
    return model.head(h)


def test_dynamic_equals_reference_in_input_order(model, x):
    out = model(x, SkipPolicy(0.5))
    assert isinstance(out, DynamicOutput)
    run = out.decisions["blocks_run"]
    assert run.shape == (24, model.num_gated) and run.dtype == torch.bool
    assert 0.1 < run.float().mean() < 0.9  # the test really exercises mixed decisions
    assert len({tuple(r) for r in run.tolist()}) > 2
    torch.testing.assert_close(out.logits, _run_all_and_select(model, x, run), atol=1e-5, rtol=1e-5)
    # per-sample loop (batch size 1 takes its own code path): same logits and decisions
    for i in range(0, 24, 5):
        one = model(x[i : i + 1], SkipPolicy(0.5))
        torch.testing.assert_close(one.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(one.decisions["blocks_run"][0], run[i])


def test_decisions_follow_the_gates(model, x):
    out = model(x, SkipPolicy(0.5), record=True)
    probs = out.record["gate_probs"]
    assert torch.equal(out.decisions["blocks_run"], probs >= 0.5)
    assert torch.equal(
        model(x, 0.0).decisions["blocks_run"], torch.ones(24, model.num_gated, dtype=torch.bool)
    )


def test_skipped_blocks_are_not_run(model, x):
    rows = [0] * len(model.blocks)
    hooks = [
        b.register_forward_hook(lambda m, inp, o, i=i: rows.__setitem__(i, rows[i] + inp[0].shape[0]))
        for i, b in enumerate(model.blocks)
    ]
    try:
        run = model(x, SkipPolicy(0.5)).decisions["blocks_run"]
    finally:
        for h in hooks:
            h.remove()
    expected, gi = [], 0
    for i in range(len(model.blocks)):
        if model.gated[i]:
            expected.append(int(run[:, gi].sum()))
            gi += 1
        else:
            expected.append(24)
    assert rows == expected and sum(rows) < 24 * len(model.blocks)


def test_flops_are_the_sum_of_units_run(model, x):
    u = model.unit_costs()
    out = model(x, SkipPolicy(0.5))
    run = out.decisions["blocks_run"]
    gated_costs = [c for c, g in zip(u["blocks"], model.gated) if g]
    ungated = sum(c for c, g in zip(u["blocks"], model.gated) if not g)
    for b in range(24):
        ran = sum(c for c, r in zip(gated_costs, run[b].tolist()) if r)
        assert float(out.flops[b]) == u["stem"] + sum(u["gates"]) + ungated + ran + u["head"]
    # the backbone's cost is the static ResNet's, measured independently
    static = create_model("static_resnet", **SMALL)
    assert model.full_cost() == static.full_cost()
    assert float(model(x, 0.0).flops[0]) == model.full_cost() + sum(u["gates"])


def test_init_from_static_reproduces_it(model, x):
    static = create_model("static_resnet", **SMALL).eval()
    with torch.no_grad():
        _randomize_bn(static, seed=3)
    skip = create_model("skip_resnet", **SMALL).init_from_static(static).eval()
    with torch.no_grad():
        torch.testing.assert_close(skip(x, 0.0).logits, static.forward_static(x), atol=1e-5, rtol=1e-5)


def test_training_output_and_validation_mode(model, x):
    m = create_model("skip_resnet", **SMALL)
    m.load_state_dict(model.state_dict())
    m.train()
    out = m(x)
    assert isinstance(out, MultiExitOutput) and out.aux["loss"].requires_grad
    (out.logits.logsumexp(-1).mean() + out.aux["loss"]).backward()
    assert all(g.net[-1].weight.grad is not None for g in m.gates)
    m.eval()
    m.training = True  # the train loop's validation: layers in eval, root flag on
    val = m(x)
    assert "loss" not in val.aux
    torch.testing.assert_close(val.logits, m.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_budget_loss_moves_execute_rate_to_target():
    torch.manual_seed(0)
    m = create_model(
        "skip_resnet", widths=(8, 8, 8), blocks=(3, 3, 3), image_size=8, budget_target=0.2, budget_weight=10.0
    )
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(x=torch.rand(64, 3, 8, 8, generator=g), y=torch.randint(0, 10, (64,), generator=g))

    def rate() -> float:
        m.eval()
        return mean_flops(m, data.x, SkipPolicy(0.5))[1]

    before = rate()
    train(m, data, TrainConfig(epochs=6, batch_size=32, lr=0.05, optimizer="adamw", progress=False))
    after = rate()
    assert before > 0.9 and after < 0.5, (before, after)


def test_calibration_meets_the_budget(model, x):
    m = create_model("skip_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    lo = m.min_cost() / m.full_cost()
    budget = lo + 0.5 * (1 - lo)
    cal = calibrate_skip_threshold(m, x, budget)
    assert m.skip_policy is cal.policy
    flops = float(m(x).flops.mean())
    assert flops == pytest.approx(cal.val_flops)
    assert abs(flops - budget * m.full_cost()) / m.full_cost() < 0.08
    with pytest.raises(ValueError, match="budget"):
        calibrate_skip_threshold(m, x, lo / 2)


def test_save_load_round_trip(model, x, tmp_path):
    m = create_model("skip_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    m.skip_policy = SkipPolicy(0.37)
    ref = m(x)
    save(m, tmp_path / "skip")
    back = load(tmp_path / "skip")
    assert back.skip_policy.thresholds == [0.37]
    out = back(x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.flops, ref.flops)
    assert torch.equal(out.decisions["blocks_run"], ref.decisions["blocks_run"])


def test_bad_input(model):
    with pytest.raises(ValueError, match="input: expected shape"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="finite"):
        model(torch.full((2, 3, 16, 16), float("nan")))
    empty = model(torch.rand(0, 3, 16, 16))
    assert empty.logits.shape == (0, 10) and empty.flops.shape == (0,)
    assert empty.decisions["blocks_run"].shape == (0, model.num_gated)
    with pytest.raises(ValueError, match=r"threshold: expected a value in \[0, 1\]"):
        SkipPolicy(1.5)
    with pytest.raises(ValueError, match="threshold"):
        model(torch.rand(2, 3, 16, 16), -0.1)
    with pytest.raises(ValueError, match="tau"):
        create_model("skip_resnet", tau=0.0)
    with pytest.raises(ValueError, match="budget_target"):
        create_model("skip_resnet", budget_target=1.5)
    with pytest.raises(ValueError, match="identity"):
        SkipNetwork(
            nn.Identity(), [nn.Conv2d(3, 4, 1)], nn.Flatten(), [True], input_shape=(3, 4, 4), num_classes=2
        )


def test_channels_last_gives_the_same_result(model, x):
    m = create_model("skip_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    ref = m(x, SkipPolicy(0.5))
    m.to(memory_format=torch.channels_last)
    out = m(x.contiguous(memory_format=torch.channels_last), SkipPolicy(0.5))
    run = out.decisions["blocks_run"]
    # NHWC convolutions round differently, which may flip a gate sitting right at the threshold
    assert (run == ref.decisions["blocks_run"]).float().mean() > 0.9
    torch.testing.assert_close(out.logits, _run_all_and_select(m, x, run), atol=1e-5, rtol=1e-5)


def test_batch_one_path_runs_only_the_chosen_blocks(model, x):
    batched = model(x, SkipPolicy(0.5))
    calls = [0] * len(model.blocks)
    hooks = [
        b.register_forward_hook(lambda m, inp, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, b in enumerate(model.blocks)
    ]
    try:
        for i in range(0, 24, 3):
            calls[:] = [0] * len(model.blocks)
            one = model(x[i : i + 1], SkipPolicy(0.5))
            run = one.decisions["blocks_run"][0].tolist()
            assert run == batched.decisions["blocks_run"][i].tolist()
            it = iter(run)
            assert calls == [int(next(it)) if g else 1 for g in model.gated]
            assert float(one.flops[0]) == float(batched.flops[i])
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_one_gate_logit_equals_the_gate(model, x, channels_last):
    m = create_model("skip_resnet", **SMALL).eval()
    m.load_state_dict(model.state_dict())
    xs = x[:4]
    if channels_last:
        m.to(memory_format=torch.channels_last)
        xs = xs.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for i in range(4):
            h, gates = m.stem(xs[i : i + 1]), iter(m.gates)
            for block, gated in zip(m.blocks, m.gated):
                if gated:  # every gate, on the features it sees (each stage's channels and size)
                    gate = next(gates)
                    assert gate.logit_one(h) == pytest.approx(float(gate(h)), abs=1e-5)
                h = block(h)
            # the cached tiled weight follows the weights when they change
            gate, h = m.gates[0], m.stem(xs[i : i + 1])
            before, b0 = gate.logit_one(h), float(gate.net[-1].bias)
            gate.net[-1].bias.add_(1.0)
            gate.net[-1].weight.mul_(2.0)
            assert gate.logit_one(h) == pytest.approx(2 * before - b0 + 1.0, abs=1e-4)
            gate.net[-1].weight.div_(2.0)
            gate.net[-1].bias.sub_(1.0)
            assert gate.logit_one(h) == pytest.approx(before, abs=1e-5)
