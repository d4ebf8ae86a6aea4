"""DynamicViT token pruning: the gathered inference equals the masked reference at the same kept
tokens, the sequence really shrinks, the keep ratio is a run-time knob, training and save/load."""

import pytest
import torch

import dynets
from dynets.core.outputs import MultiExitOutput
from dynets.spatial.plots import plot_kept_patches
from dynets.spatial.token_pruning import DynamicViT

TINY = dict(image_size=16, patch_size=4, dim=32, depth=4, heads=2, mlp_ratio=2.0, prune_after=(0, 1, 2))


@pytest.fixture(scope="module")
def model() -> DynamicViT:
    torch.manual_seed(0)
    return dynets.create_model("dynamicvit_tiny", **TINY).eval()


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_gathered_equals_masked_reference(model, rho):
    x = torch.rand(6, 3, 16, 16)
    out = model(x, keep_ratio=rho)
    kept = out.decisions["kept"]  # (B, S, N)
    # reference: every token computed, the SAME kept tokens applied as explicit attention masks
    masks = [kept[:, s].float() for s in range(kept.shape[1])]
    with torch.no_grad():
        ref, _, _ = model.forward_masked(x, torch.full((6,), rho), masks_given=masks)
        own, _, own_masks = model.forward_masked(x, torch.full((6,), rho), hard_topk=True)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)
    # and the masked path's own top-k picks the same tokens
    assert all(torch.equal(m.bool(), kept[:, s]) for s, m in enumerate(own_masks))
    torch.testing.assert_close(out.logits, own, atol=1e-5, rtol=1e-4)
    counts = model.keep_counts(rho)
    for s, k in enumerate(counts):
        idx = out.decisions[f"kept_idx_{s}"]
        assert idx.shape == (6, k) and torch.equal(kept[:, s].sum(1), torch.full((6,), k))
        assert bool((kept[:, s].gather(1, idx)).all())
        if s:  # stages are nested: a dropped token never comes back
            assert bool((kept[:, s] <= kept[:, s - 1]).all())


def test_token_multiple_rounds_the_sequence_lengths(model):
    # N = 16 patches; rho 0.7 gives 11, 8, 5 patches (sequences 12, 9, 6); rounded to multiples of 4:
    # 12, 8, 8 -> 11, 7, 7 patches (never more than the stage before)
    assert model.keep_counts(0.7) == [11, 8, 5] and model.keep_counts(0.7, 4) == [11, 7, 7]
    assert model.keep_counts(0.2, 4) == [3, 1, 1]  # sequences shorter than 4 are left as they are
    lengths = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for blk in model.blocks
    ]
    x = torch.rand(5, 3, 16, 16)
    try:
        out = model(x, keep_ratio=0.7, token_multiple=4)
    finally:
        for h in hooks:
            h.remove()
    assert lengths == [17, 12, 8, 8]  # block 3 runs on 8 tokens: stage 3 had nothing left to drop
    assert [out.decisions[f"kept_idx_{s}"].shape[1] for s in range(3)] == [11, 7, 7]
    # the gathered run still equals the masked reference with its own kept tokens
    masks = [out.decisions["kept"][:, s].float() for s in range(3)]
    with torch.no_grad():
        ref, _, _ = model.forward_masked(x, torch.full((5,), 0.7), masks_given=masks)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)
    assert float(out.flops[0]) == model.pruned_cost(0.7, 4) != model.pruned_cost(0.7)
    # the config knob does the same as the argument
    model.token_multiple = 4
    try:
        torch.testing.assert_close(model(x, keep_ratio=0.7).logits, out.logits)
    finally:
        model.token_multiple = 1
    for bad in (0, -16, 2.0, True):
        with pytest.raises(ValueError, match=r"token_multiple: expected an int >= 1"):
            model(x, keep_ratio=0.7, token_multiple=bad)


def test_input_order_and_batch_one(model):
    x = torch.rand(5, 3, 16, 16)
    out = model(x)
    for i in (0, 3):
        single = model(x[i : i + 1])
        torch.testing.assert_close(single.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(single.decisions["kept"], out.decisions["kept"][i : i + 1])


def test_sequence_really_shrinks_and_flops_fall(model):
    lengths = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for blk in model.blocks
    ]
    try:
        out = model(torch.rand(3, 3, 16, 16), keep_ratio=0.5)
    finally:
        for h in hooks:
            h.remove()
    k = model.keep_counts(0.5)  # after blocks 0, 1, 2
    assert lengths == [17, 1 + k[0], 1 + k[1], 1 + k[2]] and k[2] < k[1] < k[0] < 16
    static = model.full_cost()
    f5, f7 = float(out.flops[0]), model.pruned_cost(0.7)
    assert f5 < f7 < static
    # keep ratio 1 keeps everything: equal to the static ViT with the same weights, at its cost
    static_vit = dynets.models.vit.ViT(
        dynets.models.vit.ViTConfig(**{k: v for k, v in TINY.items() if k != "prune_after"})
    )
    static_vit.load_state_dict(model.state_dict(), strict=False)
    x = torch.rand(2, 3, 16, 16)
    full = model(x, keep_ratio=1.0)
    torch.testing.assert_close(full.logits, static_vit.eval()(x).logits)
    assert float(full.flops[0]) == static


def test_keep_ratio_knob_and_errors(model):
    model.keep_ratio = 0.5
    assert model.config.keep_ratio == 0.5
    model.keep_ratio = 0.7
    for bad in (0, 0.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="keep_ratio"):
            model(torch.rand(1, 3, 16, 16), keep_ratio=bad)
    with pytest.raises(ValueError, match="keep_ratio"):
        dynets.create_model("dynamicvit_tiny", **{**TINY, "keep_ratio": 0.0})
    with pytest.raises(ValueError, match="prune_after"):
        dynets.create_model("dynamicvit_tiny", **{**TINY, "prune_after": (2, 1)})
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match=r"predictor_lr_scale: expected a number > 0, got"):
            dynets.create_model("dynamicvit_tiny", **{**TINY, "predictor_lr_scale": bad})


def test_predictor_lr_scale_puts_the_predictors_in_their_own_group():
    assert dynets.create_model("dynamicvit_tiny", **TINY).lr_scales() == {}
    m = dynets.create_model("dynamicvit_tiny", **{**TINY, "predictor_lr_scale": 10.0})
    scales = m.lr_scales()
    assert set(scales) == set(m.predictors.parameters()) and set(scales.values()) == {10.0}
    from dynets.train.loop import _param_groups

    groups = _param_groups(m, list(m.parameters()), 1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_bad_input_and_empty_batch(model):
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 16, 16), float("nan")))
    empty = model(torch.rand(0, 3, 16, 16))
    assert empty.logits.shape == (0, 10) and empty.flops.shape == (0,)
    assert empty.decisions["kept"].shape == (0, 3, 16)


@pytest.mark.parametrize("selection", ["gumbel", "gumbel_topk"])
def test_training_masks_attention_and_reaches_the_predictors(selection):
    torch.manual_seed(1)
    teacher = dynets.create_model("vit_tiny", **{k: v for k, v in TINY.items() if k != "prune_after"}).eval()
    model = DynamicViT.from_static(
        teacher, prune_after=(0, 1, 2), train_keep_ratios=(0.5, 0.7), train_selection=selection
    )
    model.set_teacher(teacher).train()
    if selection == "gumbel_topk":  # exactly the inference counts, sampled
        with torch.no_grad():
            _, _, masks = model.forward_masked(torch.rand(3, 3, 16, 16), torch.full((3,), 0.5))
        assert [int(m[0].sum()) for m in masks] == model.keep_counts(0.5)
        model.freeze_backbone()
    out = model(torch.rand(4, 3, 16, 16))
    assert isinstance(out, MultiExitOutput) and out.aux["loss"].dim() == 0
    (out.logits.logsumexp(-1).mean() + out.aux["loss"]).backward()
    # the straight-through decisions get gradient through the masked attention and the ratio loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictors[0].out.parameters())
    assert not any(p.grad is not None for p in teacher.parameters())
    if selection == "gumbel_topk":  # a frozen backbone gets no gradient, the predictors do
        assert model.blocks[0].mlp[0].weight.grad is None and model.patch_embed.weight.grad is None
    assert "_teacher" not in "".join(model.state_dict())


def test_save_load_round_trip(model, tmp_path):
    x = torch.rand(4, 3, 16, 16)
    model.keep_ratio = 0.5
    try:
        ref = model(x)
        dynets.save(model, tmp_path / "dvit")
        loaded = dynets.load(tmp_path / "dvit")
        assert loaded.keep_ratio == 0.5
        out = loaded(x)
        assert torch.equal(out.logits, ref.logits) and torch.equal(
            out.decisions["kept"], ref.decisions["kept"]
        )
    finally:
        model.keep_ratio = 0.7


def test_kept_patches_png(model, tmp_path):
    x = torch.rand(3, 3, 16, 16)
    path = plot_kept_patches(x, model(x).decisions["kept"], tmp_path / "kept.png")
    assert path.stat().st_size > 0
