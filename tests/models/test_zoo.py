"""Registry-driven: every registered model builds, trains one step, runs dynamically, round-trips."""

import pytest
import torch

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model, list_models
from dynets.core.serialization import load, save

SMALL = {
    "ee_resnet": dict(widths=(8, 8, 8), blocks=(1, 1, 1), exits=(0, 1)),
    "static_resnet": dict(widths=(8, 8, 8), blocks=(1, 1, 1)),
}


@pytest.mark.parametrize("name", list_models())
def test_every_model(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **SMALL.get(name, {}))
    x = torch.rand(6, *model.input_shape)
    model.train()
    out = model(x)
    assert isinstance(out, MultiExitOutput)
    loss = sum(lg.logsumexp(-1).mean() for lg in out.exit_logits)
    loss.backward()
    model.eval()
    dyn = model(x)
    assert isinstance(dyn, DynamicOutput) and dyn.logits.shape == (6, model.num_classes)
    assert torch.all(dyn.flops > 0)
    save(model, tmp_path / name)
    assert torch.equal(load(tmp_path / name)(x).logits, dyn.logits)


def test_static_baseline_shares_the_backbone():
    ee, st = create_model("ee_resnet"), create_model("static_resnet")
    assert st.num_exits == 1 and ee.num_exits == 4
    assert st.full_cost() == ee.full_cost()
    assert sum(p.numel() for p in st.stages.parameters()) == sum(p.numel() for p in ee.stages.parameters())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(exits=(8,)), "exits"),
        (dict(widths=(8,)), "widths and blocks"),
        (dict(num_classes=1), "num_classes"),
        (dict(bogus=1), "unknown keys"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("ee_resnet", **kw)
