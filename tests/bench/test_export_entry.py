"""The export benchmarks' per-family comparison (`dynets.bench.deploy.family_entry`): a small
frame-skip RNN exported in both formats agrees with its eager self, and the table shows it."""

import pytest
import torch

import dynets
from dynets.bench.deploy import families_table, family_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_family_entry_compares_decisions_predictions_flops_and_speed():
    torch.manual_seed(0)
    model = dynets.create_model("frameskip_rnn", input_size=3, hidden=16, num_classes=4, max_skip=3).eval()
    with torch.no_grad():  # a skip policy that depends on the state, so rows read different frames
        model.skip_policy.weight.normal_(0, 2.0)
        model.skip_policy.bias.zero_()
    x = torch.randn(70, 10, 3)
    e = family_entry(model, x, "read", ("onnx", "torch"), rounds=1, threads=1)
    with torch.inference_mode():
        ref = model(x)
    assert e["mean_mflops"] == pytest.approx(float(ref.flops.double().mean()) / 1e6)
    assert 0 < e["decision_mean"] < 1  # rows read different frames: the compaction path ran
    for fmt in ("onnx", "torch"):
        f = e[fmt]
        assert f["decision_agreement"] == 1.0 and f["prediction_agreement"] == 1.0 and f["flops_equal"]
        assert f["max_abs_logit_diff"] < 1e-4
        assert set(f["speed"]) == {"batch_1", "batch_64"} and f["speed"]["batch_1"]["speedup"] > 0
    rows = families_table({"frameskip_rnn": e, "gone": {"missing": "no trained model"}})
    assert len(rows) == 2 + 2 + 1 and rows[2].startswith("| frameskip_rnn | onnx | 100.00% | 100.00% |")
    assert "no trained model" in rows[-1]
