"""The static ViT: shapes, eager vs SDPA attention, measured FLOPs, save/load, bad input."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynets
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.models.vit import ViT, eager_attention

TINY = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def vit() -> ViT:
    torch.manual_seed(0)
    return dynets.create_model("vit_tiny", **TINY).eval()


def test_shapes_and_outputs(vit):
    x = torch.rand(4, 3, 16, 16)
    out = vit(x)
    assert isinstance(out, DynamicOutput) and out.logits.shape == (4, 10)
    assert torch.equal(out.flops, torch.full((4,), vit.full_cost(), dtype=torch.float64))
    assert vit.embed(x).shape == (4, 17, 32)
    vit.train()
    try:
        tr = vit(x)
        assert isinstance(tr, MultiExitOutput) and len(tr.exit_logits) == 1
        tr.logits.sum().backward()
        assert vit.cls_token.grad is not None
    finally:
        vit.zero_grad()
        vit.eval()


def test_eager_attention_equals_sdpa(vit):
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        fast = vit.forward_static(x)
        with eager_attention():
            slow = vit.forward_static(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_flops_are_measured_with_the_attention_core(vit):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eager_attention(), counter:
        vit.forward_static(torch.zeros(1, 3, 16, 16))
    assert vit.full_cost() == counter.get_total_flops()
    # the attention core grows quadratically: 2 * 2 * T^2 * dim more than the linear layers' growth
    a17, a9, a1 = vit.attn_cost(17), vit.attn_cost(9), vit.attn_cost(1)
    assert (a17 - a9) > (a9 - a1) > 0


def test_save_load_round_trip(vit, tmp_path):
    x = torch.rand(3, 3, 16, 16)
    dynets.save(vit, tmp_path / "vit")
    loaded = dynets.load(tmp_path / "vit")
    assert torch.equal(loaded(x).logits, vit(x).logits)


def test_bad_input(vit):
    with pytest.raises(ValueError, match="3 channels"):
        vit(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        vit(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        vit(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vit([[0.0]])
    empty = vit(torch.rand(0, 3, 16, 16))
    assert empty.logits.shape == (0, 10) and empty.flops.shape == (0,)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(image_size=30), "multiple of patch_size"),
        (dict(dim=33, heads=2), "multiple of heads"),
        (dict(num_classes=1), "num_classes"),
        (dict(bogus=1), "unknown keys"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        dynets.create_model("vit_tiny", **{**TINY, **kw})
