"""ToMe merging: r = 0 is the static ViT; merging is a size-weighted average, proportional
attention makes a merged duplicate weigh what its copies did; the sequence shrinks; save/load."""

import pytest
import torch

import dynets
from dynets.core.outputs import DynamicOutput
from dynets.models.vit import Attention
from dynets.spatial.merging import bipartite_merge, merge_schedule, tome, tome_cost, tome_forward
from dynets.spatial.plots import plot_merged_groups

TINY = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return dynets.create_model("vit_tiny", **TINY).eval()


def test_r0_equals_static_vit(vit):
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        logits, owner = tome_forward(vit, x, 0)
    assert torch.equal(logits, vit.forward_static(x))
    assert torch.equal(owner, torch.arange(17).expand(4, 17))
    m = tome(vit, 0)
    assert torch.equal(m(x).logits, vit(x).logits) and float(m(x).flops[0]) == vit.full_cost()


def test_merge_is_a_size_weighted_average():
    torch.manual_seed(2)
    x, size = torch.randn(3, 9, 5), torch.randint(1, 4, (3, 9)).float()
    metric = torch.randn(3, 9, 4)
    new_x, new_size, newpos = bipartite_merge(x, size, metric, 3)
    assert new_x.shape == (3, 6, 5) and newpos.shape == (3, 9)
    for b in range(3):  # per-sample loop: each new token is the size-weighted mean of its old tokens
        assert int(newpos[b, 0]) == 0  # the class token stays first and alone
        assert int((newpos[b] == 0).sum()) == 1
        for j in range(6):
            members = (newpos[b] == j).nonzero().squeeze(1)
            w = size[b, members]
            torch.testing.assert_close(new_size[b, j], w.sum())
            torch.testing.assert_close(new_x[b, j], (x[b, members] * w[:, None]).sum(0) / w.sum())
        # the merged-away tokens are A tokens (even positions) merged into B tokens (odd positions)
        merged = [i for i in range(0, 9, 2) if int((newpos[b] == newpos[b, i]).sum()) > 1]
        assert len(merged) == 3


def test_many_sources_into_one_destination_and_gradients():
    torch.manual_seed(4)
    B, T, D = 2, 11, 6
    x, size = torch.randn(B, T, D, requires_grad=True), torch.randint(1, 5, (B, T)).float()
    metric = torch.randn(B, T, 3)
    metric[:, 1::2] = -metric[:, ::2].mean(1, keepdim=True)  # every B token alike, far from the A tokens
    metric[:, 3] = metric[:, ::2].mean(1)  # ... but token 3, which every A token picks
    new_x, new_size, newpos = bipartite_merge(x, size, metric, 4)
    for b in range(B):
        members = (newpos[b] == newpos[b, 3]).nonzero().squeeze(1)
        assert len(members) == 5  # token 3 and the four A tokens merged into it
        w = size[b, members]
        torch.testing.assert_close(new_x[b, newpos[b, 3]], (x[b, members] * w[:, None]).sum(0) / w.sum())
    new_x.sum().backward()  # differentiable: each old token's gradient is its weight in its group
    share = size / new_size.gather(1, newpos)
    torch.testing.assert_close(x.grad, share[..., None].expand(B, T, D))


def test_proportional_attention_counts_a_merged_duplicate_twice():
    torch.manual_seed(3)
    attn = Attention(8, 2)
    x = torch.randn(1, 5, 8)
    x[0, 3] = x[0, 1]  # token 3 duplicates token 1
    full = attn(x)
    merged = x[:, [0, 1, 2, 4]]
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    out = attn(merged, bias=size.log()[:, None, None, :])
    torch.testing.assert_close(out, full[:, [0, 1, 2, 4]], atol=1e-6, rtol=1e-5)


def test_sequence_shrinks_and_flops_fall(vit):
    m = tome(vit, 3)
    m(torch.rand(1, 3, 16, 16))  # measures the unit costs (which runs blocks) before hooking
    seen = []
    hooks = [blk.mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for blk in m.blocks]
    try:
        out = m(torch.rand(2, 3, 16, 16), record=True)
    finally:
        for h in hooks:
            h.remove()
    assert merge_schedule(17, 3, 3) == [3, 3, 3] and seen == [14, 11, 8]
    assert isinstance(out, DynamicOutput) and torch.all(out.flops == tome_cost(vit, 3))
    assert tome_cost(vit, 5) < tome_cost(vit, 3) < vit.full_cost()
    assert out.decisions["tokens"].tolist() == [[14, 11, 8]] * 2
    owner = out.decisions["owner"]
    assert owner.shape == (2, 17) and int(owner.max()) == 7 and bool((owner[:, 0] == 0).all())
    assert merge_schedule(17, 4, 100) == [8, 4, 2, 1]  # never below the class token plus one


def test_batch_order_knob_errors_and_round_trip(vit, tmp_path):
    m = tome(vit, 4)
    x = torch.rand(5, 3, 16, 16)
    out = m(x)
    for i in (0, 4):
        torch.testing.assert_close(m(x[i : i + 1]).logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
    m.merge_r = 2
    torch.testing.assert_close(m(x).logits, m(x, r=2).logits)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="r: expected"):
            m(x, r=bad)
    with pytest.raises(ValueError, match="channels"):
        m(torch.rand(1, 1, 16, 16))
    empty = m(torch.rand(0, 3, 16, 16), record=True)
    assert empty.logits.shape == (0, 10) and empty.decisions["owner"].shape == (0, 17)
    dynets.save(m, tmp_path / "tome")
    loaded = dynets.load(tmp_path / "tome")
    assert loaded.merge_r == 2 and torch.equal(loaded(x).logits, m(x).logits)
    assert (
        plot_merged_groups(x, m(x, record=True).decisions["owner"], tmp_path / "groups.png").stat().st_size
        > 0
    )


def test_token_multiple_merges_onto_multiples(vit):
    # 65 tokens, r = 8 per block: the pace 57, 49, 41, 33, 25, 17 rounded to multiples of 16 -> merge
    # in blocks 1, 3, 5 only (65 -> 48 -> 32 -> 17: at most 15 merges from 32, the class token stays)
    assert merge_schedule(65, 6, 8, 16) == [0, 17, 0, 16, 0, 15]
    assert merge_schedule(65, 6, 10, 16) == [17, 0, 16, 0, 15, 8]
    assert merge_schedule(65, 6, 8, 1) == merge_schedule(65, 6, 8) == [8] * 6
    # pace 14, 11, 8 -> 16 (merging 1 < 4 / 2: skipped), 12, 8
    assert merge_schedule(17, 3, 3, 4) == [0, 5, 4]
    m = tome(vit, 3)
    m(torch.rand(1, 3, 16, 16))  # unit costs measured before hooking
    seen = []
    hooks = [blk.mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for blk in m.blocks]
    x = torch.rand(2, 3, 16, 16)
    try:
        out = m(x, token_multiple=4, record=True)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [17, 12, 8] and out.decisions["tokens"].tolist() == [[17, 12, 8]] * 2
    logits, owner = tome_forward(vit, x, 3, multiple=4)
    assert torch.equal(out.logits, logits) and torch.equal(out.decisions["owner"], owner)
    assert float(out.flops[0]) == tome_cost(vit, 3, 4) != tome_cost(vit, 3)
    m.config.token_multiple = 4  # the config knob does what the argument does
    assert torch.equal(m(x).logits, logits)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="token_multiple: expected an int >= 1"):
            m(x, token_multiple=bad)
