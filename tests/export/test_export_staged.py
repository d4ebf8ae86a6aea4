"""Staged export (ONNX + onnxruntime, torch.export) and the whole-graph torch.cond export: outputs
equal the eager model's at the decisions it takes, for every policy kind, batch 1 and empty."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import dynets
from dynets.depth.learned import fit_learned_exits
from dynets.export import StagedRuntime, export_staged, score_thresholds
from dynets.policies import ConfidencePolicy, EntropyPolicy, LearnedPolicy, NeverExitPolicy, PatiencePolicy
from dynets.serve.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def between(scores: torch.Tensor) -> float:
    """A threshold halfway between the two middle scores, so float noise cannot flip a decision."""
    v = scores.flatten().sort().values
    i = int(torch.argmax(v[1:] - v[:-1])) if v.numel() < 4 else v.numel() // 2
    return float((v[i - 1] + v[i]) / 2)


def loud(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for head in model.heads:
            head[-1].weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = loud(
        dynets.create_model("ee_resnet", widths=(8, 16, 32), blocks=(1, 1, 1), exits=(0, 1), image_size=16)
    )
    x = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lg = m.all_exit_logits(x)
    fit_learned_exits(m, lg, lg[-1].argmax(-1), steps=30)
    m.policy = ConfidencePolicy(between(lg[0].softmax(-1).amax(-1)))
    return m, x


def policies(model, x):
    with torch.no_grad():
        lg = model.all_exit_logits(x)
    med = [between(v.softmax(-1).amax(-1)) for v in lg[:-1]]
    learned = model.learned_scores(lg)
    return [
        None,  # the policy saved in the export
        ConfidencePolicy(med),
        EntropyPolicy(0.7),
        PatiencePolicy(1),
        LearnedPolicy(between(learned[:, 0])),
        NeverExitPolicy(),
    ]


def check_equal(rt: StagedRuntime, model, x, policy, *, atol: float) -> None:
    ref = model(x, policy=policy)
    got = rt.run(x.numpy(), None if policy is None else policy.to_dict())
    np.testing.assert_array_equal(got["exit_index"], ref.exit_index.numpy())
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=atol)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())


@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_onnx_export_runs_dynamically_like_the_eager_model(resnet, tmp_path, granularity):
    model, x = resnet
    out = export_staged(model, tmp_path / "onnx", format="onnx", granularity=granularity)
    manifest = json.loads((out / "manifest.json").read_text())
    units = len(model.stages) if granularity == "stage" else model.num_exits
    assert sum(len(b["units"]) for b in manifest["blocks"]) == units and len(manifest["blocks"]) == 3
    rt = StagedRuntime(out)
    for policy in policies(model, x):
        check_equal(rt, model, x, policy, atol=1e-5)
    check_equal(rt, model, x[:1], None, atol=1e-5)  # batch 1
    empty = rt.run(np.zeros((0, 3, 16, 16), np.float32))
    assert empty["logits"].shape == (0, 10)
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 16, 16\)"):
        rt.run(np.zeros((2, 3, 8, 8), np.float32))


def test_torch_export_and_whole_graph_cond_equal_eager(tmp_path):
    torch.manual_seed(0)  # two exits keep torch.export's tracing time down
    model = loud(
        dynets.create_model("ee_resnet", widths=(8, 16, 32), blocks=(1, 1, 1), exits=(0,), image_size=16)
    )
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.policy = ConfidencePolicy(between(model.all_exit_logits(x)[0].softmax(-1).amax(-1)))
    out = export_staged(model, tmp_path / "pt2", format="torch", whole_graph=True)
    rt = StagedRuntime(out)
    for policy in (None, EntropyPolicy(0.7), PatiencePolicy(1)):
        check_equal(rt, model, x, policy, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["whole_graph"]["file"] == "whole_graph.pt2"
        and manifest["whole_graph"]["kind"] == "confidence"
    )
    whole = torch.export.load(str(out / "whole_graph.pt2")).module()
    for policy in (model.policy, ConfidencePolicy(0.0), ConfidencePolicy(1.0)):  # mixed, all at 0, none early
        ref = model(x, policy=policy)
        with torch.no_grad():
            logits, exits = whole(x, score_thresholds(policy, model.num_exits))
        assert torch.equal(exits, ref.exit_index)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            logits1, exits1 = whole(
                x[:1], score_thresholds(policy, model.num_exits)
            )  # batch 1: true early exit
        assert int(exits1[0]) == int(ref.exit_index[0])


def test_msdnet_multi_scale_features_export_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = loud(dynets.create_model("msdnet", image_size=16, scales=2, blocks=3, channels=8, growth=4))
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lg = model.all_exit_logits(x)
    model.policy = ConfidencePolicy(between(lg[0].softmax(-1).amax(-1)))
    rt = StagedRuntime(export_staged(model, tmp_path / "msd", format="onnx"))
    for policy in (None, PatiencePolicy(1), NeverExitPolicy()):
        check_equal(rt, model, x, policy, atol=1e-5)


def test_cli_export_writes_a_self_contained_runtime(resnet, tmp_path):
    model, x = resnet
    dynets.save(model, tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "exp")]) == 0
    spec = importlib.util.spec_from_file_location("copied_runtime", tmp_path / "exp" / "dynets_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = (tmp_path / "exp" / "dynets_runtime.py").read_text()
    assert "import dynets" not in src and "\nimport torch" not in src  # NumPy + onnxruntime only
    got = mod.StagedRuntime(tmp_path / "exp").run(x.numpy())
    ref = model(x)
    np.testing.assert_array_equal(got["exit_index"], ref.exit_index.numpy())
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".exp")]  # no temporary left behind
    sys.modules.pop("copied_runtime", None)


def test_export_rejects_models_it_cannot_stage():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="expected an EarlyExitNetwork"):
        export_staged(Plain(), "/nonexistent/out")
    torch.manual_seed(0)
    m = dynets.create_model("ee_resnet", widths=(8, 16, 32), blocks=(1, 1, 1), exits=(0,), image_size=16)
    with pytest.raises(ValueError, match="format: expected one of"):
        export_staged(m, "/nonexistent/out", format="tflite")
