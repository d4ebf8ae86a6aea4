"""Dynamic execution against the all-exits reference, costs, input checks, user-defined stages."""

import pytest
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.depth import EarlyExitNetwork, index_select_tree
from dynets.depth.learned import fit_learned_exits
from dynets.policies import ConfidencePolicy, EntropyPolicy, LearnedPolicy, NeverExitPolicy, PatiencePolicy


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.fixture(scope="module")
def model() -> EarlyExitNetwork:
    torch.manual_seed(0)
    m = create_model("ee_resnet", widths=(8, 16, 16), blocks=(1, 1, 2), exits=(0, 1, 2)).eval()
    _randomize_bn(m)
    # Scale the heads so exits disagree and confidences spread out.
    with torch.no_grad():
        for h in m.heads:
            h[-1].weight.mul_(8.0)
    return m


def _between(values: torch.Tensor, q: float) -> float:
    """A threshold at quantile q that falls midway between two observed values (no ties)."""
    v = values.detach().flatten().sort().values
    i = min(max(int(q * (v.numel() - 1)), 0), v.numel() - 2)
    return float((v[i] + v[i + 1]) / 2)


@torch.no_grad()
def _quantile_policy(model, x, q=(0.3, 0.5, 0.6)):
    ref = model.all_exit_logits(x)
    conf = [lg.softmax(-1).amax(-1) for lg in ref[:-1]]
    return ConfidencePolicy([_between(c, 1 - qq) for c, qq in zip(conf, q)])


@torch.no_grad()
def _reference(model, x, exit_index):
    """Independent reference: every exit on every sample, then pick each sample's chosen exit."""
    ref = model.all_exit_logits(x)
    return torch.stack([ref[k][i] for i, k in enumerate(exit_index.tolist())])


@torch.no_grad()
def _reference_exits(model, x, policy):
    """Hand-written per-sample loop: walk the exits of one sample until the policy says stop."""
    ref = model.all_exit_logits(x)
    K = len(ref)
    out = []
    for i in range(x.shape[0]):
        state = policy.init_state(1, x.device)
        k_done = K - 1
        for k in range(K - 1):
            learned = model.exit_predictors[k](ref[k][i : i + 1]) if policy.needs_learned else None
            stop, state = policy.step(k, ref[k][i : i + 1], state, learned)
            if bool(stop[0]):
                k_done = k
                break
        out.append(k_done)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["confidence", "entropy", "patience", "learned"])
def test_dynamic_equals_all_exits_reference(model, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(37, 3, 32, 32, generator=g)
    if kind == "confidence":
        policy = _quantile_policy(model, x)
    elif kind == "entropy":
        ref = model.all_exit_logits(x)
        h_norm = [1 - EntropyPolicy().score(lg) for lg in ref[:-1]]  # normalised entropy per exit
        policy = EntropyPolicy([_between(h, q) for h, q in zip(h_norm, (0.3, 0.5, 0.6))])
    elif kind == "patience":
        policy = PatiencePolicy(1)
    else:
        y = torch.randint(0, 10, (37,), generator=g)
        fit_learned_exits(model, model.all_exit_logits(x), y, steps=20)
        scores = model.learned_scores(model.all_exit_logits(x))
        policy = LearnedPolicy([_between(scores[:, k], 0.5) for k in range(scores.shape[1])])
    out = model(x, policy=policy)
    assert isinstance(out, DynamicOutput)
    expected_exits = _reference_exits(model, x, policy)
    assert torch.equal(out.exit_index, expected_exits)
    assert torch.allclose(out.logits, _reference(model, x, out.exit_index), atol=1e-5)
    if kind != "patience":  # patience with 3 exits on random weights may agree nowhere; others must mix
        assert out.exit_index.unique().numel() >= 2


@pytest.mark.parametrize("kind", ["confidence", "patience"])
@pytest.mark.parametrize("batch_size", [1, 7, 16])
def test_pooled_throughput_mode_equals_reference(model, kind, batch_size):
    """Survivors pooled across batches: the same exits as the per-sample loop, the logits of the
    all-exits reference, input order, exact FLOPs; and stages really run on pooled batches."""
    x = torch.rand(45, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy = _quantile_policy(model, x) if kind == "confidence" else PatiencePolicy(1)
    seen: list[int] = []
    hook = model.stages[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        out = model.run_pooled(x, batch_size, policy=policy)
    finally:
        hook.remove()
    assert torch.equal(out.exit_index, _reference_exits(model, x, policy))
    assert torch.allclose(out.logits, _reference(model, x, out.exit_index), atol=1e-5)
    assert torch.equal(out.flops, model.exit_costs()[out.exit_index])
    n_last = int((out.exit_index == model.num_exits - 1).sum())
    assert sum(seen) == n_last  # the last stage ran exactly on the samples that reached it
    if batch_size > 1 and n_last >= 2 * batch_size:  # pooled: fewer, fuller batches than per-batch runs
        assert len(seen) <= -(-n_last // batch_size) + 1
    empty = model.run_pooled(x[:0], batch_size, policy=policy)
    assert empty.logits.shape == (0, 10) and empty.flops.numel() == 0
    with pytest.raises(ValueError, match="batch_size"):
        model.run_pooled(x, 0, policy=policy)


def test_results_follow_input_order(model):
    x = torch.rand(24, 3, 32, 32)
    policy = _quantile_policy(model, x)
    perm = torch.randperm(24)
    a, b = model(x, policy=policy), model(x[perm], policy=policy)
    assert torch.equal(a.exit_index[perm], b.exit_index)
    assert torch.allclose(a.logits[perm], b.logits, atol=1e-5)


def test_batch_of_one_matches_batched(model):
    x = torch.rand(12, 3, 32, 32)
    policy = _quantile_policy(model, x)
    batched = model(x, policy=policy)
    for i in range(12):
        single = model(x[i : i + 1], policy=policy)
        assert int(single.exit_index) == int(batched.exit_index[i])
        assert torch.allclose(single.logits[0], batched.logits[i], atol=1e-5)
        assert float(single.flops) == float(batched.flops[i])


def test_flops_are_the_sum_of_units_run(model):
    x = torch.rand(30, 3, 32, 32)
    for policy in (_quantile_policy(model, x), PatiencePolicy(1)):
        out = model(x, policy=policy)
        u = model.unit_costs()
        for k, f in zip(out.exit_index.tolist(), out.flops.tolist()):
            stage = model.exit_stages[k]
            assert f == sum(u["stages"][: stage + 1]) + sum(u["heads"][: k + 1])
    full = model(x, policy=NeverExitPolicy())
    assert torch.all(full.exit_index == model.num_exits - 1)
    assert full.flops[0] == sum(model.unit_costs()["stages"]) + sum(model.unit_costs()["heads"])


def test_unit_costs_match_flop_counter_formula():
    lin = EarlyExitNetwork(
        [nn.Linear(10, 20), nn.Sequential(nn.ReLU(), nn.Linear(20, 20))],
        [nn.Linear(20, 3), nn.Linear(20, 3)],
        [0, 1],
        input_shape=(10,),
        num_classes=3,
    )
    u = lin.unit_costs()
    assert u["stages"] == [2 * 10 * 20, 2 * 20 * 20]
    assert u["heads"] == [2 * 20 * 3, 2 * 20 * 3]
    assert lin.full_cost() == 2 * 10 * 20 + 2 * 20 * 20 + 2 * 20 * 3


def test_user_defined_stages_train_and_dynamic():
    torch.manual_seed(0)
    net = EarlyExitNetwork(
        [
            nn.Sequential(nn.Linear(6, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        ],
        [nn.Linear(16, 4), nn.Linear(16, 4)],
        [1, 2],
        input_shape=(6,),
        num_classes=4,
    )
    x = torch.randn(9, 6)
    net.train()
    out = net(x)
    assert isinstance(out, MultiExitOutput) and len(out.exit_logits) == 2
    net.eval()
    dyn = net(x, policy=ConfidencePolicy(0.3))
    assert dyn.logits.shape == (9, 4)


def test_empty_batch_returns_empty_output(model):
    out = model(torch.zeros(0, 3, 32, 32))
    assert out.logits.shape == (0, 10) and out.exit_index.numel() == 0 and out.flops.numel() == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 1, 32, 32), r"expected shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
        (torch.zeros(2, 3, 28, 28), r"expected shape"),
        (torch.zeros(3, 32, 32), r"expected shape"),
        (torch.full((2, 3, 32, 32), float("nan")), r"NaN or inf"),
        (torch.full((2, 3, 32, 32), float("inf")), r"NaN or inf"),
    ],
)
def test_bad_inputs_fail_clearly(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_integer_input_rejected(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_training_mode_returns_every_exit(model):
    model.train()
    try:
        out = model(torch.rand(4, 3, 32, 32))
    finally:
        model.eval()
    assert isinstance(out, MultiExitOutput) and len(out.exit_logits) == model.num_exits


def test_index_select_tree_nested():
    t = {"a": [torch.arange(5), (torch.arange(5) * 2,)]}
    r = index_select_tree(t, torch.tensor([4, 0]))
    assert r["a"][0].tolist() == [4, 0] and r["a"][1][0].tolist() == [8, 0]
    with pytest.raises(TypeError, match="cannot compact"):
        index_select_tree(3, torch.tensor([0]))


def test_bad_construction():
    with pytest.raises(ValueError, match="last exit must follow the last stage"):
        EarlyExitNetwork(
            [nn.Identity(), nn.Identity()], [nn.Identity()], [0], input_shape=(2,), num_classes=2
        )
    with pytest.raises(ValueError, match="strictly increasing"):
        EarlyExitNetwork(
            [nn.Identity(), nn.Identity()],
            [nn.Identity(), nn.Identity()],
            [1, 1],
            input_shape=(2,),
            num_classes=2,
        )


def test_optimize_for_inference_matches_and_is_inference_only(model, tmp_path):
    x = torch.rand(20, 3, 32, 32)
    policy = _quantile_policy(model, x)
    fast = model.optimize_for_inference()
    a, b = model(x, policy=policy), fast(x, policy=policy)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.flops, b.flops)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(model.forward_static(x), fast.forward_static(x), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.stages.modules())
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        fast.train()
    from dynets.core.serialization import save

    with pytest.raises(TypeError, match="optimize_for_inference"):
        save(fast, tmp_path / "fast")


def test_freeze_backbone_trains_only_the_exits():
    from dynets.train import TrainConfig, train

    torch.manual_seed(0)
    kw = dict(widths=(8, 8, 16), blocks=(1, 1, 1))
    static = create_model("static_resnet", **kw).eval()
    _randomize_bn(static)
    ee = create_model("ee_resnet", exits=(0, 1), **kw).freeze_backbone(static)
    before = {k: v.clone() for k, v in ee.stages.state_dict().items()}
    heads_before = [h.state_dict()["1.weight"].clone() for h in ee.heads[:-1] if "1.weight" in h.state_dict()]

    class Data:
        x = torch.rand(64, 3, 32, 32)
        y = torch.randint(0, 10, (64,))

    train(ee, Data(), TrainConfig(epochs=1, batch_size=32, progress=False))
    after = ee.stages.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics unchanged
    assert any(not torch.equal(a, h.state_dict()["1.weight"]) for a, h in zip(heads_before, ee.heads[:-1]))
    ee.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ee.all_exit_logits(x)[-1], static.forward_static(x), atol=1e-6)
