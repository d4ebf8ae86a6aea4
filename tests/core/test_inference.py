import copy

import pytest
import torch
from torch import fx, nn

from dynets.core.inference import DirectGraph, fold_and_lower, lower_to_functional
from dynets.depth.heads import HeadConfig, make_head


def _randomize_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["conv", "conv2", "linear", "mlp"])
def test_exit_heads_become_function_calls_with_the_same_outputs(kind):
    torch.manual_seed(0)
    head = make_head(HeadConfig(kind=kind), 16, 8, 10).eval()
    _randomize_bn(head)
    x = torch.randn(5, 16, 8, 8)
    fast = fold_and_lower(head)
    assert isinstance(fast, DirectGraph) and isinstance(fast.graph_module, fx.GraphModule)
    assert [n for n in fast.graph.nodes if n.op == "call_module"] == []  # every layer is a function
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded into the conv
    with torch.no_grad():
        assert torch.allclose(fast(x), head(x), atol=1e-5)
        xl = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(fast(xl), head(xl), atol=1e-5)
    # pool + flatten of the linear / conv heads became one mean over the map
    names = [getattr(n.target, "__name__", str(n.target)) for n in fast.graph.nodes]
    assert "flatten" not in names


def test_residual_stage_and_unknown_modules():
    from dynets.models.resnet import BasicBlock

    torch.manual_seed(0)
    stage = nn.Sequential(BasicBlock(8, 16, 2), nn.GELU(), nn.ReLU(inplace=True)).eval()
    _randomize_bn(stage)
    x = torch.randn(3, 8, 12, 12)
    fast = fold_and_lower(stage)
    kept = [n.target for n in fast.graph.nodes if n.op == "call_module"]
    assert kept == ["1"]  # GELU is not rewritten; it stays a module call
    with torch.no_grad():
        assert torch.allclose(fast(x), stage(x), atol=1e-5)


def test_untraceable_modules_are_returned_unchanged():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    m = Branchy()
    assert fold_and_lower(m) is m
    assert lower_to_functional(m) is m  # not a GraphModule: nothing to rewrite


class _WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.GELU()  # stays a module call
        self.register_buffer("shift", torch.tensor(0.5))
        self.scale = torch.tensor(2.0)  # a plain tensor attribute, fetched by get_attr

    def forward(self, x):
        return self.act(self.conv(x) * self.scale + self.shift)


def test_direct_graph_equals_the_graph_module_and_survives_copies_and_moves():
    torch.manual_seed(0)
    m = _WithConstant().eval()
    x = torch.randn(2, 3, 6, 6)
    fast = fold_and_lower(m)
    assert isinstance(fast, DirectGraph)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(fast(x), fast.graph_module(x))
        assert torch.allclose(fast(x), ref, atol=1e-6)
        twin = copy.deepcopy(fast)  # the copy reads its own weights, not the original's
        twin.graph_module.conv.weight.zero_()
        assert torch.allclose(fast(x), ref, atol=1e-6)
        assert torch.allclose(twin(x), twin.graph_module(x))
        fast.to(memory_format=torch.channels_last)  # tensors replaced: the namespace follows
        assert torch.allclose(fast(x), ref, atol=1e-5)
        loaded = fold_and_lower(_WithConstant().eval())
        loaded.load_state_dict(fast.state_dict())
        assert torch.allclose(loaded(x), ref, atol=1e-5)
    with pytest.raises(TypeError, match="GraphModule"):
        DirectGraph(nn.ReLU())
