"""Routers: routed execution vs every-branch-on-every-sample references, sub-batch execution (hook
counts), the run-time cost bias and its calibration, Gumbel training on a toy problem, and the
routed_resnet zoo model (save/load, decisions, bad input)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.routing.router import BranchRouter, PoolGate, RoutingTree, calibrate_route_bias, set_cost_penalty

torch.set_num_threads(1)


def _branches(d_in: int = 8, d_out: int = 5) -> list[nn.Module]:
    """Three branches of increasing cost, same output shape."""
    return [
        nn.Linear(d_in, d_out),
        nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out)),
        nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, d_out)),
    ]


def _router(**kw) -> BranchRouter:
    torch.manual_seed(0)
    r = BranchRouter(_branches(), gate=PoolGate(8, 3, hidden=0), sample_shape=(8,), **kw)
    with torch.no_grad():
        r.gate.net[0].weight.mul_(10)  # spread the routes over all branches
    return r.eval()


def _count_calls(modules) -> list[list[int]]:
    sizes: list[list[int]] = [[] for _ in modules]
    for k, m in enumerate(modules):
        m.register_forward_hook(lambda mod, inp, out, k=k: sizes[k].append(inp[0].shape[0]))
    return sizes


def test_branch_router_equals_reference_and_runs_sub_batches():
    r = _router()
    x = torch.randn(40, 8)
    with torch.no_grad():
        logits = r.gate(x) + r.route_bias
        every = torch.stack([b(x) for b in r.branches], 1)  # (B, n, out): every branch on every sample
    want_branch = logits.argmax(-1)
    assert want_branch.unique().numel() == 3
    sizes = _count_calls(r.branches)
    with torch.no_grad():
        out = r(x)
    assert torch.equal(out.branch, want_branch) and out.branch.dtype == torch.int64
    torch.testing.assert_close(out.output, every[torch.arange(40), want_branch], rtol=1e-5, atol=1e-6)
    counts = torch.bincount(want_branch, minlength=3).tolist()
    assert sizes == [[c] for c in counts]  # each branch ran once, on its own sub-batch only
    costs = [measure_flops(b, x[:1]) for b in r.branches]
    gate = measure_flops(r.gate, x[:1])
    assert costs[0] < costs[1] < costs[2]
    want_flops = torch.tensor([gate + costs[k] for k in want_branch.tolist()], dtype=torch.float64)
    assert out.flops.dtype == torch.float64 and torch.equal(out.flops, want_flops)


def test_branch_router_batch_one_empty_and_unused_branch():
    r = _router()
    x = torch.randn(12, 8)
    with torch.no_grad():
        full = r(x)
        for i in range(12):  # batch 1 takes its own path: the same answer
            one = r(x[i : i + 1])
            assert one.branch.item() == full.branch[i].item()
            torch.testing.assert_close(one.output[0], full.output[i], rtol=1e-5, atol=1e-6)
        empty = r(x[:0])
        assert empty.output.shape == (0, 5) and empty.branch.shape == (0,) and empty.flops.shape == (0,)
        r.route_bias.copy_(torch.tensor([0.0, 0.0, -1e4]))  # branch 2 never chosen: never run
        sizes = _count_calls(r.branches)
        out = r(x)
    assert not sizes[2] and sum(s[0] for s in sizes if s) == 12
    assert (out.branch != 2).all()


def test_cost_penalty_and_calibration():
    r = _router()
    x = torch.randn(300, 8)

    class Wrap(nn.Module):  # a "model" around the router: DynamicOutput with per-sample flops
        def __init__(self):
            super().__init__()
            self.r = r

        def forward(self, x):
            o = self.r(x)
            return DynamicOutput(o.output, flops=o.flops + 100.0)

    model = Wrap().eval()
    set_cost_penalty(model, 1e3)
    assert (model.r(x).branch == 0).all()  # everyone on the cheapest branch
    set_cost_penalty(model, -1e3)
    assert (model.r(x).branch == 2).all()
    most = float(model(x).flops.mean())
    for budget in (0.3, 0.6, 0.9):
        res = calibrate_route_bias(model, x, budget, batch_size=64)
        assert res["met"] and res["mean_flops"] <= budget * most + 1e-6
        assert res["max_flops"] == pytest.approx(most)
        assert float(model(x).flops.mean()) == pytest.approx(res["mean_flops"])  # the penalty is set
        assert float(r.cost_penalty) == pytest.approx(res["penalty"])
        # tight: a slightly smaller penalty spends more than the budget
        set_cost_penalty(model, res["penalty"] - 1e-3 * max(1.0, abs(res["penalty"])))
        assert float(model(x).flops.mean()) > budget * most
    with pytest.raises(ValueError, match="budget"):
        calibrate_route_bias(model, x, 0.0)
    with pytest.raises(ValueError, match="BranchRouter or RoutingTree"):
        calibrate_route_bias(nn.Linear(8, 2), x, 0.5)


def test_training_mixture_forward_value_and_gate_gradient():
    r = _router(budget=0.2, balance_weight=0.1)
    r.train()
    r.generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8)
    out = r(x)
    with torch.no_grad():
        every = torch.stack([b(x) for b in r.branches], 1)
    # hard Gumbel sample: the forward value is exactly the chosen branch's output
    torch.testing.assert_close(out.output, every[torch.arange(32), out.branch], rtol=1e-5, atol=1e-6)
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    (out.output.sum() + out.aux_loss).backward()
    assert r.gate.net[0].weight.grad.abs().sum() > 0


def test_budget_term_pushes_toward_the_cheap_branch():
    r = _router(budget=0.1)
    r.train()
    logits = torch.zeros(16, 3, requires_grad=True)
    probs = logits.softmax(-1)
    rel = r.costs()["branches"] / r.costs()["branches"].max()
    loss = r._aux_loss(probs, probs.argmax(-1), rel)
    loss.backward()
    g = logits.grad.sum(0)
    assert g[2] > 0 > g[0]  # descending lowers the dear branch's logit, raises the cheap one's


class _Const(nn.Module):
    def __init__(self, cls: int) -> None:
        super().__init__()
        self.register_buffer("v", F.one_hot(torch.tensor(cls), 2).float() * 6 - 3)

    def forward(self, x):
        return self.v.expand(x.shape[0], -1)


def test_gumbel_training_learns_to_route_a_separable_input():
    torch.manual_seed(0)
    r = BranchRouter([_Const(0), _Const(1)], gate=PoolGate(2, 2, hidden=0), tau=1.0)
    r.generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    r.train()
    for _ in range(150):
        x = torch.randn(128, 2)
        y = (x[:, 0] > 0).long()  # class 1 must go to branch 1
        loss = F.cross_entropy(r(x).output, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r.eval()
    x = torch.randn(1000, 2)
    with torch.no_grad():
        acc = (r(x).branch == (x[:, 0] > 0).long()).double().mean()
    assert acc > 0.95


# ----------------------------------------------------------------------------------- the tree
def _tree(**kw) -> RoutingTree:
    torch.manual_seed(1)
    widths = {0: 6, 1: 8, 2: 32}

    def node(level, pos):
        return nn.Sequential(
            nn.Linear(6, widths[(level + pos) % 3]), nn.ReLU(), nn.Linear(widths[(level + pos) % 3], 6)
        )

    def gate(level, pos):
        g = PoolGate(6, 2, hidden=0)
        with torch.no_grad():
            g.net[0].weight.mul_(10)
        return g

    tree = RoutingTree.build(2, node, gate, sample_shape=(6,), **kw).eval()
    with torch.no_grad():  # centre each gate on a reference batch so that every leaf gets samples
        h = [tree.nodes[0](torch.randn(200, 6))]
        for i, g in enumerate(tree.gates):
            h += [tree.nodes[2 * i + 1](h[i]), tree.nodes[2 * i + 2](h[i])]
            d = g(h[i])
            g.net[0].bias[1] -= (d[:, 1] - d[:, 0]).median()
    return tree


def _walk(tree: RoutingTree, x1: torch.Tensor):
    """Per-sample reference: one sample down the tree, batch 1, no routing machinery."""
    node, h, path, flops = 0, tree.nodes[0](x1), [], measure_flops(tree.nodes[0], x1)
    for _ in range(tree.depth):
        logits = tree.gates[node](h) + tree.route_bias[node]
        flops += measure_flops(tree.gates[node], h)
        bit = int(logits.argmax(-1))
        path.append(bit)
        node = 2 * node + 1 + bit
        flops += measure_flops(tree.nodes[node], h)
        h = tree.nodes[node](h)
    return h[0], path, flops


def test_routing_tree_equals_per_sample_walk_and_runs_node_sub_batches():
    tree = _tree()
    x = torch.randn(30, 6)
    sizes = _count_calls(tree.nodes)
    with torch.no_grad():
        out = tree(x)
        batched = [list(s) for s in sizes]  # the calls of the routed pass only
        ref = [_walk(tree, x[i : i + 1]) for i in range(30)]
    assert out.path.shape == (30, 2) and out.path.dtype == torch.int64
    assert out.path.tolist() == [p for _, p, _ in ref]
    assert len({tuple(p) for _, p, _ in ref}) >= 3  # several leaves in use
    torch.testing.assert_close(out.output, torch.stack([h for h, _, _ in ref]), rtol=1e-5, atol=1e-6)
    assert out.flops.tolist() == [float(f) for _, _, f in ref]
    assert out.branch.tolist() == [2 * p[0] + p[1] for _, p, _ in ref]
    # node i ran once, on exactly the samples whose path passes through it (batched call only)
    through = [30] + [0] * 6
    for p in out.path.tolist():
        through[1 + p[0]] += 1
        through[3 + 2 * p[0] + p[1]] += 1
    assert [s[0] if s else 0 for s in batched] == through
    assert all(len(s) <= 1 for s in batched)
    empty = tree(x[:0])
    assert empty.output.shape == (0, 6) and empty.path.shape == (0, 2)


def test_routing_tree_training_bias_and_calibration():
    tree = _tree(budget=0.3, balance_weight=0.1)
    tree.train()
    tree.generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6)
    out = tree(x)
    assert out.probs.shape == (20, 4)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(20))
    (out.output.sum() + out.aux_loss).backward()
    assert all(g.net[0].weight.grad.abs().sum() > 0 for g in tree.gates)
    tree.eval()
    paths = tree.costs()["paths"]
    tree.set_cost_penalty(1e4)
    with torch.no_grad():
        assert (tree(x).flops == paths.min()).all()  # every sample on the cheapest path

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = tree

        def forward(self, x):
            return DynamicOutput(self.t(x).output, flops=self.t(x).flops)

    res = calibrate_route_bias(Wrap(), torch.randn(100, 6), 0.7, iters=20)
    assert res["met"] and res["fraction"] <= 0.7


def test_router_bad_settings():
    with pytest.raises(ValueError, match="tau"):
        BranchRouter(_branches(), in_channels=8, tau=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        BranchRouter(_branches()[:1], in_channels=8)
    with pytest.raises(ValueError, match="in_channels"):
        BranchRouter(_branches())
    with pytest.raises(ValueError, match="budget"):
        BranchRouter(_branches(), in_channels=8, budget=1.5)
    with pytest.raises(ValueError, match="nodes"):
        RoutingTree([nn.Identity()] * 4, [nn.Identity()])
    with pytest.raises(ValueError, match="gate"):
        BranchRouter(_branches(), gate=nn.Linear(8, 2))(torch.randn(3, 8))


# ------------------------------------------------------------------------------ routed_resnet
SMALL = dict(widths=(8, 8, 16), blocks=(1, 1, 2), image_size=16, num_classes=4)


def _routed():
    torch.manual_seed(0)
    m = create_model("routed_resnet", **SMALL)
    with torch.no_grad():
        m.router.gate.net[-1].weight.mul_(50)
    return m.eval()


def test_routed_resnet_dynamic_equals_branch_reference(tmp_path):
    m = _routed()
    x = torch.rand(24, 3, 16, 16)
    with torch.no_grad():  # a bias that splits this batch between the branches
        d = m.router.gate(m.trunk(x)).diff(dim=-1).median()
        m.router.route_bias.copy_(torch.stack([d, torch.zeros(())]))
    out = m(x)
    assert isinstance(out, DynamicOutput) and out.logits.shape == (24, 4)
    b = out.decisions["branch"]
    assert 6 <= int(b.sum()) <= 18
    ref = torch.stack([m.forward_branch(x, 0), m.forward_branch(x, 1)], 1)[torch.arange(24), b]
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.flops, m.branch_costs()[b])
    assert m.branch_costs()[0] < m.branch_costs()[1] == m.full_cost()
    save(m, tmp_path / "routed")
    back = load(tmp_path / "routed")
    again = back(x)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.decisions["branch"], b)
    m.set_cost_penalty(1e4)  # the run-time knob survives save/load
    save(m, tmp_path / "routed")
    back = load(tmp_path / "routed")
    assert (back(x).decisions["branch"] == 0).all() and float(back.router.cost_penalty) == 1e4


def test_routed_resnet_training_output_and_bad_input():
    m = _routed().train()
    x = torch.rand(8, 3, 16, 16)
    out = m(x)
    assert isinstance(out, MultiExitOutput) and out.logits.shape == (8, 4)
    assert out.aux["loss"].dim() == 0 and out.aux["branch"].shape == (8,)
    # supervise_branches: each branch's own logits on every sample come first, the routed output last
    assert len(out.exit_logits) == 3
    ref = torch.stack(out.exit_logits[:2], 1)[torch.arange(8), out.aux["branch"]]
    torch.testing.assert_close(out.logits, ref)
    (F.cross_entropy(out.logits, torch.zeros(8, dtype=torch.long)) + out.aux["loss"]).backward()
    assert m.router.gate.net[0].weight.grad.abs().sum() > 0
    m.eval()
    empty = m(x[:0])
    assert (
        empty.logits.shape == (0, 4) and empty.flops.shape == (0,) and empty.decisions["branch"].shape == (0,)
    )
    with pytest.raises(ValueError, match="input"):
        m(torch.rand(2, 1, 16, 16))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(bad)
    torch.manual_seed(0)
    plain = create_model("routed_resnet", **SMALL, supervise_branches=False).train()
    assert len(plain(x).exit_logits) == 1
    with pytest.raises(ValueError, match="routed_groups"):
        create_model("routed_resnet", routed_groups=4)
    with pytest.raises(ValueError, match="tau"):
        create_model("routed_resnet", **SMALL, tau=0.0)
