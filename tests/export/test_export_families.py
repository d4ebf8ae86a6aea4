"""Export of block skipping, routing, dynamic-parameter, mixture-of-experts, recurrent (skip-update,
ACT, frame skipping) and token-halting models: the exported runtime takes the same per-sample
decisions as the eager model, returns its logits (up to float rounding) and the same per-sample
FLOPs, at batch 1, in batches that split, and for an empty batch."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

import dynets
from dynets.depth.skipping import SkipPolicy
from dynets.export import (
    GlanceRuntime,
    RouteRuntime,
    SingleRuntime,
    SkipRNNRuntime,
    SkipRuntime,
    WidthRuntime,
    export_model,
    load_runtime,
)
from dynets.export.runtime import ACTRuntime, FrameSkipRuntime, HaltingViTRuntime, MoERuntime
from dynets.policies import ConfidencePolicy, EntropyPolicy
from dynets.serve.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def between(values: torch.Tensor) -> float:
    """A threshold in the widest gap near the middle of `values`, so float noise cannot flip a
    decision and both sides are non-empty."""
    v = values.flatten().sort().values
    lo, hi = v.numel() // 4, 3 * v.numel() // 4
    i = lo + int(torch.argmax(v[lo + 1 : hi + 1] - v[lo:hi])) + 1
    return float((v[i - 1] + v[i]) / 2)


@pytest.fixture(scope="module")
def skipnet():
    torch.manual_seed(0)
    m = dynets.create_model("skip_resnet", widths=(8, 16, 32), image_size=16).eval()
    with torch.no_grad():
        for g in m.gates:  # spread the gates' probabilities, so thresholds split the batch
            g.net[-1].weight.normal_(0, 3.0)
            g.net[-1].bias.zero_()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    probs = m(x, policy=SkipPolicy(0.0), record=True).record["gate_probs"]
    m.skip_policy = SkipPolicy([between(probs[:, j]) for j in range(probs.shape[1])])
    return m, x


@pytest.fixture(scope="module")
def routed():
    torch.manual_seed(0)
    m = dynets.create_model("routed_resnet", widths=(8, 16, 32), image_size=16).eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m.router.gate(m.trunk(x))
    rel = m.router.costs()["branches"]
    rel = (rel / rel.max()).float()
    # the penalty at which half the batch switches: gap_i = (l1 - l0) / (rel1 - rel0)
    m.set_cost_penalty(between((logits[:, 1] - logits[:, 0]) / (rel[1] - rel[0])))
    return m, x


def check_skip(rt, model, x, policy=None) -> None:
    ref = model(x, policy=policy)
    got = rt.run(x.numpy(), None if policy is None else {"threshold": policy.to_dict()["threshold"]})
    np.testing.assert_array_equal(got["blocks_run"], ref.decisions["blocks_run"].numpy())
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_skip_export_runs_each_block_on_the_rows_its_gate_passes(skipnet, tmp_path, fmt):
    model, x = skipnet
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, SkipRuntime)
    ref = model(x)
    run = ref.decisions["blocks_run"]
    assert run.any() and not run.all()  # the thresholds split the batch: a real test of the split
    check_skip(rt, model, x)
    check_skip(rt, model, x[:1])
    check_skip(rt, model, x, SkipPolicy(0.0))  # a threshold changed at run time: every block runs
    check_skip(rt, model, x, SkipPolicy(1.0))
    empty = rt.run(np.zeros((0, 3, 16, 16), np.float32))
    assert empty["logits"].shape == (0, 10) and empty["blocks_run"].shape == (0, model.num_gated)
    with pytest.raises(ValueError, match=r"skip threshold: expected a value in \[0, 1\]"):
        rt.run(x.numpy(), {"threshold": 1.5})


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_route_export_runs_each_branch_on_its_own_rows(routed, tmp_path, fmt):
    model, x = routed
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, RouteRuntime)
    for xb in (x, x[:1], x[5:6]):
        ref = model(xb)
        got = rt.run(xb.numpy())
        np.testing.assert_array_equal(got["branch"], ref.decisions["branch"].numpy())
        np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    assert 0 < got_share(rt, x) < 1
    # the run-time knob: a large penalty sends everyone down the cheap branch, as in the eager model
    cheap = rt.run(x.numpy(), {"penalty": 1e6})
    assert (cheap["branch"] == int(model.router.costs()["branches"].argmin())).all()
    assert rt.run(np.zeros((0, 3, 16, 16), np.float32))["logits"].shape == (0, 10)
    with pytest.raises(ValueError, match="penalty: expected a finite number"):
        rt.run(x.numpy(), {"penalty": float("nan")})


def got_share(rt, x) -> float:
    return float(rt.run(x.numpy())["branch"].mean())


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_width_export_runs_each_width_on_the_rows_the_chooser_sends(tmp_path, fmt):
    torch.manual_seed(0)
    model = dynets.create_model("slimmable_resnet", widths=(8, 16, 32), image_size=16).eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        conf = model.forward_width(x, 0).softmax(-1).amax(-1)
    v = conf.sort().values  # two thresholds in gaps of the confidences: three width groups
    t = [float((v[15] + v[16]) / 2), float((v[7] + v[8]) / 2)]
    model.width_policy = type(model.width_policy)([t[0], t[1], 0.0])
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, WidthRuntime)
    for xb, pol in ((x, None), (x[:1], None), (x, {"thresholds": [1.0]})):
        ref = model(xb, policy=None if pol is None else type(model.width_policy)(pol["thresholds"]))
        got = rt.run(xb.numpy(), pol)
        np.testing.assert_array_equal(got["width_index"], ref.decisions["width_index"].numpy())
        np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    assert len(set(rt.run(x.numpy())["width_index"].tolist())) == 3
    with pytest.raises(ValueError, match="width policy: expected 1 or 3 thresholds"):
        rt.run(x.numpy(), {"thresholds": [0.5, 0.5]})


@pytest.mark.parametrize(
    ("name", "fmt"), [("hyper_mlp", "onnx"), ("hyper_mlp", "torch"), ("dyconv_resnet", "torch")]
)
def test_dynamic_parameter_models_export_as_one_graph(tmp_path, name, fmt):
    torch.manual_seed(0)
    kw = {"widths": (8, 16, 32), "image_size": 16} if name == "dyconv_resnet" else {}
    model = dynets.create_model(name, **kw).eval()
    x = torch.rand(9, *model.input_shape, generator=torch.Generator().manual_seed(3))
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, SingleRuntime)
    for xb in (x, x[:1]):
        ref = model(xb)
        got = rt.run(xb.numpy())
        np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    assert rt.run(np.zeros((0, *model.input_shape), np.float32))["logits"].shape == (0, 10)


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_token_pruning_and_merging_export_as_one_graph_with_the_kept_tokens(tmp_path, fmt):
    torch.manual_seed(0)
    small = {"dim": 48, "heads": 3, "image_size": 16}
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    dvit = dynets.create_model("dynamicvit_tiny", **small).eval()
    dvit.keep_ratio, dvit.token_multiple = 0.5, 4  # sequence lengths rounded to multiples of 4
    rt = load_runtime(export_model(dvit, tmp_path / "d", format=fmt))
    ref, got = dvit(x), rt.run(x.numpy())
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    for s in range(len(dvit.predictors)):  # each sample's own kept patches, as the eager model chose
        np.testing.assert_array_equal(got[f"kept_idx_{s}"], ref.decisions[f"kept_idx_{s}"].numpy())
    assert rt.manifest["settings"] == {"keep_ratio": 0.5, "token_multiple": 4}
    assert got["kept_idx_0"].shape[1] == 7  # 8 patches -> a sequence of 9, rounded to 8
    tvit = dynets.create_model("tome_vit_tiny", merge_r=4, token_multiple=4, **small).eval()
    rt = load_runtime(export_model(tvit, tmp_path / "t", format=fmt))
    ref, got = tvit(x), rt.run(x.numpy())
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    assert rt.manifest["settings"] == {"merge_r": 4, "token_multiple": 4}
    with pytest.raises(ValueError, match="has no run-time policy"):
        rt.run(x.numpy(), {"keep_ratio": 0.7})


@pytest.mark.parametrize(
    ("cell", "fmt"), [("skip_lstm", "onnx"), ("skip_gru", "onnx"), ("skip_lstm", "torch")]
)
def test_skip_rnn_export_updates_only_the_rows_the_gate_lets_through(tmp_path, cell, fmt):
    torch.manual_seed(0)
    model = dynets.create_model(cell, input_size=3, hidden=16, num_classes=4, seq_len=12).eval()
    with torch.no_grad():  # a gate that skips some steps of some sequences
        model.gate.weight.normal_(0, 2.0)
        model.gate.bias.fill_(-0.5)
    x = torch.randn(7, 12, 3, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([12, 5, 9, 12, 1, 7, 12])
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, SkipRNNRuntime)
    for xb, ln, thr in ((x, None, None), (x, lengths, None), (x[:1], None, None), (x, None, 0.9)):
        ref = model(xb, ln, threshold=thr)
        got = rt.run(
            xb.numpy(), None if thr is None else {"threshold": thr}, None if ln is None else ln.numpy()
        )
        np.testing.assert_array_equal(got["updated"], ref.decisions["updated"].numpy())
        np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    upd = rt.run(x.numpy())["updated"]
    assert upd.any() and not upd.all()  # some steps skipped: the split is exercised
    assert rt.run(x.numpy(), {"threshold": 0.0})["updated"].all()  # threshold 0: every step updates
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.fill_(-200.0)  # a saturated gate: Δũ = 0
    rt = load_runtime(export_model(model, tmp_path / "saturated", format=fmt))
    assert rt.run(x.numpy(), {"threshold": 0.0})["updated"].all()  # 0 / 0 still means every step
    np.testing.assert_array_equal(rt.run(x.numpy())["updated"], model(x).decisions["updated"].numpy())
    assert rt.run(x.numpy())["updated"].sum() == 7  # the first step only
    with pytest.raises(ValueError, match="lengths: expected"):
        rt.run(x.numpy(), None, np.zeros(7, np.int64))


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_glance_focus_export_focuses_only_the_unsure_images(tmp_path, fmt):
    torch.manual_seed(0)
    model = dynets.create_model("glance_focus").eval()
    x = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        conf = model.run_glance(x)[1].softmax(-1).amax(-1)
    model.policy = ConfidencePolicy(between(conf))
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, GlanceRuntime)
    for xb, pol in ((x, None), (x[:1], None), (x, ConfidencePolicy(1.0)), (x, EntropyPolicy(0.99))):
        ref = model(xb, pol)
        got = rt.run(xb.numpy(), None if pol is None else pol.to_dict())
        np.testing.assert_array_equal(got["focused"], ref.decisions["focused"].numpy())
        np.testing.assert_array_equal(got["patch"], ref.decisions["patch"].numpy())
        np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    focused = rt.run(x.numpy())["focused"]
    assert focused.any() and not focused.all()


def check_same(got: dict, ref, decisions: tuple[str, ...]) -> None:
    """The runtime's decisions and FLOPs equal the eager model's, its logits are close."""
    for name in decisions:
        np.testing.assert_array_equal(got[name], ref.decisions[name].numpy(), err_msg=name)
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())


MOE_MODELS = {  # token ids, k=2 with capacity drops, a dense block; features, k=1, dropless, all MoE
    "ids": dict(vocab_size=50, k=2, moe_layers=[1], eval_capacity_factor=0.6),
    "features": dict(input_size=3, k=1, moe_layers=None, dropless=True),
}


@pytest.mark.parametrize(("setup", "fmt"), [("ids", "onnx"), ("ids", "torch"), ("features", "onnx")])
def test_moe_export_runs_each_expert_on_its_own_tokens(tmp_path, setup, fmt):
    torch.manual_seed(0)
    kw = MOE_MODELS[setup]
    model = dynets.create_model(
        "moe_transformer", d_model=32, n_heads=2, n_layers=2, d_ff=64, num_experts=4, seq_len=12, **kw
    ).eval()
    with torch.no_grad():  # routers that spread the tokens over every expert
        for moe in model.moe_blocks:
            moe.router.proj.weight.normal_(0, 1.0)
    gen = torch.Generator().manual_seed(8)
    if setup == "ids":
        x = torch.randint(1, 50, (6, 12), generator=gen)
        x[1, 7:], x[3, 3:] = 0, 0  # padded sequences: their padding takes no expert
        x = torch.cat([x, torch.zeros(6, 2, dtype=torch.long)], 1)  # trimmed, decisions padded back
    else:
        x = torch.randn(6, 12, 3, generator=gen)
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, MoERuntime)
    for xb in (x, x[:1], x[2:5]):
        check_same(rt.run(xb.numpy()), model(xb), ("expert", "dropped"))
    expert = rt.run(x.numpy())["expert"]
    assert len(set(expert[expert >= 0].tolist())) == 4  # every expert got tokens of its own
    if setup == "ids":
        assert rt.run(x.numpy())["dropped"].sum() > 0  # capacity dropped some, as the eager model
        with pytest.raises(ValueError, match=r"expected token ids in \[0, 50\)"):
            rt.run(x.numpy() + 50)
        with pytest.raises(ValueError, match="of an integer dtype"):
            rt.run(x.numpy().astype(np.float32))
    else:
        assert expert.shape == (6, 2, 12, 1)  # (B, n_moe, T, k)
        with pytest.raises(ValueError, match=r"expected features \(B, T >= 1, 3\)"):
            rt.run(x.numpy()[..., :2])
    empty = rt.run(x.numpy()[:0])
    assert empty["logits"].shape == (0, 2) and empty["flops"].shape == (0,)
    with pytest.raises(ValueError, match="has no run-time policy"):
        rt.run(x.numpy(), {"capacity_factor": 1.0})


def sequences(model, T: int = 10):
    x = torch.randn(7, T, model.config.input_size, generator=torch.Generator().manual_seed(9))
    return x, torch.tensor([T, 4, 7, T, 1, 6, T])


@pytest.mark.parametrize(("cell", "fmt"), [("gru", "onnx"), ("lstm", "onnx"), ("gru", "torch")])
def test_act_export_ponders_only_the_rows_that_have_not_halted(tmp_path, cell, fmt):
    torch.manual_seed(0)
    model = dynets.create_model(
        "act_rnn", cell=cell, input_size=3, hidden=16, num_classes=4, seq_len=10, max_ponder=4, halt_bias=3.0
    ).eval()
    with torch.no_grad():  # halting probabilities spread out: rows halt after different passes
        model.halt.weight.normal_(0, 4.0)
    x, lengths = sequences(model)
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, ACTRuntime)
    for xb, ln in ((x, None), (x, lengths), (x[:1], None), (x[4:5], lengths[4:5])):
        got = rt.run(xb.numpy(), None, None if ln is None else ln.numpy())
        check_same(got, model(xb, ln), ("ponder",))
    ponder = rt.run(x.numpy())["ponder"]
    assert len(set(ponder.flatten().tolist())) >= 2  # rows halt after different passes: compaction
    assert rt.run(x.numpy()[:0])["ponder"].shape == (0, 10)
    with pytest.raises(ValueError, match="has no run-time policy"):
        rt.run(x.numpy(), {"epsilon": 0.1})
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, F=3\)"):
        rt.run(x.numpy()[..., :2])


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_frame_skip_export_reads_only_the_rows_due_to_read(tmp_path, fmt):
    torch.manual_seed(0)
    model = dynets.create_model("frameskip_rnn", input_size=3, hidden=16, num_classes=4, max_skip=3).eval()
    with torch.no_grad():  # a policy that skips 0..3 frames depending on the state
        model.skip_policy.weight.normal_(0, 2.0)
        model.skip_policy.bias.zero_()
    x, lengths = sequences(model)
    with torch.no_grad():  # everyone reads frame 0: a stop confidence that stops half of them there
        first = model.stack.step(x[:, 0], model.stack.init_state(7, x))
        conf = between(model.head(model.stack.top(first)).softmax(1).amax(1))
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, FrameSkipRuntime)
    cases = ((x, None, None), (x, lengths, None), (x, None, conf), (x, lengths, conf))
    for xb, ln, c in (*cases, (x[:1], None, None), (x[1:2], lengths[1:2], conf)):
        got = rt.run(xb.numpy(), {"stop_confidence": c}, None if ln is None else ln.numpy())
        check_same(got, model(xb, ln, stop_confidence=c), ("read", "num_reads", "stop_step"))
    read = rt.run(x.numpy())["read"]
    rt_plain_read = rt.run(x.numpy(), None, lengths.numpy())["read"]
    per_frame = read.sum(0)
    assert ((per_frame > 0) & (per_frame < 7)).any()  # frames read by some rows and skipped by others
    stop = rt.run(x.numpy(), {"stop_confidence": conf})["stop_step"]
    assert (stop == 0).any() and (stop != 0).any()
    assert rt.run(x.numpy()[:0])["read"].shape == (0, 10)
    with pytest.raises(ValueError, match=r"stop_confidence: expected None or a number in \(0, 1\]"):
        rt.run(x.numpy(), {"stop_confidence": 1.5})
    # the skip knobs saved with the model are part of the exported read graph
    model.skip_bias, model.skip_cap = -1.0, 2
    rt = load_runtime(export_model(model, tmp_path / "knob", format=fmt))
    got = rt.run(x.numpy(), None, lengths.numpy())
    check_same(got, model(x, lengths), ("read", "num_reads", "stop_step"))
    assert not np.array_equal(got["read"], rt_plain_read)
    with pytest.raises(ValueError, match=r"\['skip_cap'\] are fixed in the exported read graph"):
        rt.run(x.numpy(), {"stop_confidence": None, "skip_cap": 1})


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_halting_vit_export_drops_the_halted_tokens(tmp_path, fmt):
    torch.manual_seed(0)
    model = dynets.create_model(
        "avit_tiny", dim=48, heads=3, image_size=16, depth=4, gate_center=1.0, target_depth=2.0
    ).eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():  # a threshold between the class tokens' summed scores after two blocks
        t, cum = model.embed(x), 0.0
        for i in range(2):
            t = model.blocks[i](t)
            cum = cum + model.halting_score(t, i)[:, 0]
    model.threshold = between(cum)  # so that some samples finish there and others go on
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, HaltingViTRuntime)
    for xb, thr in ((x, None), (x[:1], None), (x[3:4], None), (x, 0.5), (x, 1.0)):
        got = rt.run(xb.numpy(), None if thr is None else {"threshold": thr})
        check_same(got, model(xb, threshold=thr), ("depth",))
    depth = rt.run(x.numpy())["depth"]
    assert len(set(depth.flatten().tolist())) >= 3  # tokens halt at different blocks
    assert len(set(depth[:, 0].tolist())) >= 2  # and samples finish at different blocks
    assert rt.run(x.numpy()[:0])["depth"].shape == (0, 17)
    with pytest.raises(ValueError, match=r"threshold: expected a number in \(0, 1\]"):
        rt.run(x.numpy(), {"threshold": 0.0})
    with pytest.raises(ValueError, match=r"input: expected shape \(B, 3, 16, 16\)"):
        rt.run(x.numpy()[:, :2])


def test_export_refuses_what_it_cannot_express(tmp_path, skipnet):
    torch.manual_seed(0)
    dyconv = dynets.create_model("dyconv_resnet", widths=(8, 16, 32), image_size=16)
    with pytest.raises(ValueError, match="expected 'torch' for dyconv_resnet, got 'onnx'"):
        export_model(dyconv, tmp_path / "d", format="onnx")
    with pytest.raises(TypeError, match="expected a model of an exportable family"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "l")
    with pytest.raises(TypeError, match="expected a model of an exportable family"):  # nothing dynamic
        export_model(dynets.create_model("static_gru", input_size=3), tmp_path / "g")
    with pytest.raises(ValueError, match="options of early-exit exports"):
        export_model(skipnet[0], tmp_path / "s", whole_graph=True)
    with pytest.raises(ValueError, match="format: expected one of"):
        export_model(skipnet[0], tmp_path / "s", format="tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_runtime(tmp_path / "nothing")
    out = export_model(skipnet[0], tmp_path / "s")
    with pytest.raises(ValueError, match="this export is of kind 'skip'"):
        RouteRuntime(out)


def test_cli_exports_a_saved_skip_model_with_a_self_contained_runtime(skipnet, tmp_path):
    model, x = skipnet
    dynets.save(model, tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "exp")]) == 0
    spec = importlib.util.spec_from_file_location(
        "copied_runtime_skip", tmp_path / "exp" / "dynets_runtime.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = mod.load_runtime(tmp_path / "exp").run(x.numpy())
    np.testing.assert_array_equal(got["blocks_run"], model(x).decisions["blocks_run"].numpy())
    sys.modules.pop("copied_runtime_skip", None)
