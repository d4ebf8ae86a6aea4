"""Exit heads: the fused inference chain equals the layers it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from dynets.depth.heads import FusedChain, HeadConfig, fuse_chain, make_head


@pytest.mark.parametrize("kind", ["conv", "linear", "mlp"])
def test_fused_chain_equals_the_head_before_and_after_bn_folding(kind):
    torch.manual_seed(0)
    head = make_head(HeadConfig(kind=kind, dropout=0.1), channels=8, spatial=8, num_classes=5)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    head.eval()
    x = torch.randn(3, 8, 8, 8)
    ref = head(x)
    for variant in (head, fuse(head)):  # as built (BN unfolded) and BN folded by torch.fx
        fused = fuse_chain(variant)
        assert isinstance(fused, FusedChain)
        assert "skip" not in fused.kinds  # dropout dropped at inference
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
        nhwc = copy.deepcopy(fused).to(memory_format=torch.channels_last)  # copies keep working
        torch.testing.assert_close(
            nhwc(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5
        )


def test_fuse_chain_leaves_other_modules_unchanged():
    odd = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.GELU())  # GELU is not a supported layer
    assert fuse_chain(odd) is odd
    block = nn.Conv2d(3, 3, 3)  # not a chain container
    assert fuse_chain(block) is block

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    traced = torch.fx.symbolic_trace(Residual())  # a graph that is not a straight chain
    assert fuse_chain(traced) is traced
