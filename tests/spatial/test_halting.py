"""A-ViT halting: the packed execution equals the dense masked reference and a per-sample loop,
halted tokens really leave (fewer token-rows through the MLPs), FLOPs follow the active counts."""

import pytest
import torch

import dynets
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.spatial.halting import HaltingViT
from dynets.spatial.plots import plot_halting_depth

TINY = dict(
    image_size=16, patch_size=4, dim=32, depth=4, heads=2, mlp_ratio=2.0, gate_scale=4.0, gate_center=1.0
)


@pytest.fixture(scope="module")
def model() -> HaltingViT:
    torch.manual_seed(0)
    m = dynets.create_model("avit_tiny", **TINY).eval()
    with torch.no_grad():  # make the halting channel depend on the input, so depths vary
        m.patch_embed.weight[0].mul_(20)
        m.blocks[0].attn.proj.weight[0].normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(8, 3, 16, 16)


def test_packed_equals_dense_reference(model, x):
    out = model(x)
    assert isinstance(out, DynamicOutput)
    depth = out.decisions["depth"]
    assert depth.shape == (8, 17)
    assert len(torch.unique(depth[:, 1:])) >= 3, "the test needs tokens that halt at different blocks"
    assert len(torch.unique(depth[:, 0])) >= 2, "the test needs samples that stop at different blocks"
    with torch.no_grad():
        ref = model.forward_dense(x, model.threshold)
    assert torch.equal(ref["depth"], depth)
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=1e-4)
    assert bool((depth[:, 1:] <= depth[:, :1]).all()), "no token runs past its sample's class token"


def test_per_sample_loop_equals_batch(model, x):
    out = model(x)
    for i in range(x.shape[0]):
        one = model(x[i : i + 1])
        torch.testing.assert_close(one.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(one.decisions["depth"], out.decisions["depth"][i : i + 1])
        assert torch.equal(one.flops, out.flops[i : i + 1])


def test_flops_follow_active_tokens_and_compute_falls(model, x):
    rows = []
    hooks = [
        blk.mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])) for blk in model.blocks
    ]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    depth = out.decisions["depth"]
    T, L = depth.shape[1], model.config.depth
    # the MLPs saw exactly the active tokens, block by block (packed: no padding rows)
    assert rows == [int((depth > layer).sum()) for layer in range(len(rows))]
    assert sum(rows) < x.shape[0] * T * L
    for b in range(x.shape[0]):
        expect = model.embed_cost() + model.head_cost()
        expect += sum(model.block_cost(int((depth[b] > layer).sum())) for layer in range(L))
        assert float(out.flops[b]) == expect
    assert bool((out.flops < model.full_cost()).all())


def test_threshold_knob(model, x):
    lo = model(x, threshold=0.5).decisions["depth"].float().mean()
    hi = model(x, threshold=1.0).decisions["depth"].float().mean()
    assert lo <= hi
    for bad in (0.0, 1.5, -1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            model(x, threshold=bad)
    with pytest.raises(ValueError, match="target_depth"):
        dynets.create_model("avit_tiny", **{**TINY, "target_depth": 9.0})
    with pytest.raises(ValueError, match="distr_weight: expected a finite number >= 0, got -1"):
        dynets.create_model("avit_tiny", **{**TINY, "distr_weight": -1})


@pytest.mark.parametrize("threshold", [1e-4, 1.0])
def test_extreme_thresholds_match_the_dense_reference(model, x, threshold):
    """Every sample stopping after its first block (a tiny threshold), or running nearly every block
    (1.0): the packed path still equals the dense reference."""
    out = model(x, threshold=threshold)
    with torch.no_grad():
        ref = model.forward_dense(x, threshold)
    assert torch.equal(out.decisions["depth"], ref["depth"])
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=1e-4)
    if threshold < 0.01:
        assert bool((out.decisions["depth"] == 1).all())
        expect = model.embed_cost() + model.head_cost() + model.block_cost(model.num_patches + 1)
        assert bool((out.flops == expect).all())


def test_training_losses(model, x):
    teacher = dynets.create_model("vit_tiny", **{k: v for k, v in TINY.items() if not k.startswith("gate")})
    student = (
        HaltingViT.from_static(teacher.eval(), gate_scale=4.0, gate_center=1.0).set_teacher(teacher).train()
    )
    out = student(x)
    assert isinstance(out, MultiExitOutput) and torch.isfinite(out.aux["loss"])
    (out.logits.logsumexp(-1).mean() + out.aux["loss"]).backward()
    assert student.blocks[0].mlp[0].weight.grad is not None


def test_bad_input_empty_batch_and_round_trip(model, x, tmp_path):
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 16, 16), float("nan")))
    empty = model(torch.rand(0, 3, 16, 16))
    assert empty.logits.shape == (0, 10) and empty.decisions["depth"].shape == (0, 17)
    dynets.save(model, tmp_path / "avit")
    loaded = dynets.load(tmp_path / "avit")
    a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.decisions["depth"], b.decisions["depth"])


def test_depth_png(model, x, tmp_path):
    assert plot_halting_depth(x, model(x).decisions["depth"], tmp_path / "depth.png").stat().st_size > 0


@pytest.mark.parametrize("bucket", [1, 3, 8, 1000])
def test_attention_buckets_change_nothing(model, x, bucket):
    """Grouping the live samples by active count for the attention core is an execution detail:
    every bucket width gives the dense reference's outputs and decisions."""
    with torch.no_grad():
        ref = model.forward_dense(x, model.threshold)
    groups_seen = []
    orig = model._attention_groups
    model.attn_bucket = bucket
    seen_counts = []

    def record(sid, counts):
        seen_counts.append(counts.clone())
        groups_seen.append(orig(sid, counts))
        return groups_seen[-1]

    model._attention_groups = record
    try:
        out = model(x)
    finally:
        del model.attn_bucket, model._attention_groups
    assert torch.equal(out.decisions["depth"], ref["depth"])
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=1e-4)
    n_groups = max(len(g) for g in groups_seen)
    if bucket == 1:
        assert n_groups > 1, "the test needs live samples with different active counts"
    if bucket == 1000:
        assert n_groups == 1
    for counts, groups in zip(seen_counts, groups_seen):
        assert sum(g[2] for g in groups) == counts.numel(), "every live sample is in one group"
        grouped = []
        for _, _, n, L, bias in groups:  # each sample is padded by less than one bucket
            c = torch.full((n,), L) if bias is None else (bias[:, 0, 0] == 0).sum(-1)
            assert bool((L - c < bucket).all())
            grouped.append(c)
        assert sorted(torch.cat(grouped).tolist()) == sorted(counts.tolist())
