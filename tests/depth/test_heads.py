import pytest
import torch
from torch import nn

from dynets.core.cost import measure_flops
from dynets.depth.heads import HeadConfig, make_head


@pytest.mark.parametrize("spatial, stride", [(16, 2), (4, 1)])
def test_head_kinds_shapes_and_costs(spatial, stride):
    x = torch.randn(3, 32, spatial, spatial)
    flops = {}
    for kind in ("linear", "mlp", "conv", "conv2"):
        head = make_head(HeadConfig(kind=kind), 32, spatial, 10).eval()
        with torch.no_grad():
            assert head(x).shape == (3, 10)
        flops[kind] = measure_flops(head, x[:1])
    convs = [m for m in make_head(HeadConfig(kind="conv2"), 32, spatial, 10) if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(stride, stride), (1, 1)]  # downsample once, then refine
    assert flops["linear"] < flops["conv"] < flops["conv2"]
    # the second conv runs on the first one's output map
    out = (spatial + stride - 1) // stride
    assert flops["conv2"] - flops["conv"] == 2 * 32 * 32 * 9 * out * out


def test_unknown_head_kind_names_the_choices():
    with pytest.raises(ValueError, match="'conv2'.*got 'bogus'"):
        HeadConfig(kind="bogus")
