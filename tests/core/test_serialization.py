"""save/load round trips, atomic writes, corrupt checkpoints, configs and the registry."""

import json
from dataclasses import dataclass, field

import pytest
import torch

from dynets.core.config import config_from_dict, config_to_dict
from dynets.core.registry import create_model, list_models
from dynets.core.serialization import load, save
from dynets.policies import EntropyPolicy


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = create_model("ee_resnet", widths=(8, 8, 16), blocks=(1, 1, 1), exits=(0, 1)).eval()
    m.policy = EntropyPolicy([0.4, 0.2])
    return m


def test_round_trip_identical_outputs(model, tmp_path):
    x = torch.rand(16, 3, 32, 32)
    before = model(x)
    save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = load(tmp_path / "m")
    after = again(x)
    assert again.policy.to_dict() == model.policy.to_dict()
    assert torch.equal(before.logits, after.logits) and torch.equal(before.exit_index, after.exit_index)
    assert torch.equal(before.flops, after.flops)


def test_overwrite_is_atomic_and_leaves_no_temp(model, tmp_path):
    save(model, tmp_path / "m")
    save(model, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_save_leaves_previous_model(model, tmp_path, monkeypatch):
    save(model, tmp_path / "m")
    import dynets.core.serialization as ser

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    load(tmp_path / "m")


def test_truncated_weights(model, tmp_path):
    save(model, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(tmp_path / "m")


def test_corrupt_config(model, tmp_path):
    save(model, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"architecture": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "m")


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load(tmp_path / "empty")


def test_wrong_architecture_shapes(model, tmp_path):
    save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["widths"] = [8, 8, 32]
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises((ValueError, RuntimeError)):
        load(tmp_path / "m")


def test_unsaveable_module(tmp_path):
    with pytest.raises(TypeError, match="registered architecture"):
        save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_registry():
    assert "ee_resnet" in list_models() and list_models("static_*") == [
        n for n in list_models() if n.startswith("static_")
    ]
    with pytest.raises(ValueError, match="unknown model name 'resnet_9000'"):
        create_model("resnet_9000")


@dataclass
class Inner:
    a: int = 1
    b: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"
    maybe: tuple[int, ...] | None = None


def test_config_round_trip():
    cfg = Outer(Inner(3, (4, 5)), "y", (1,))
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(Outer, data) == cfg
    with pytest.raises(ValueError, match="unknown keys \\['zzz'\\]"):
        config_from_dict(Outer, {"zzz": 1})
    with pytest.raises(TypeError, match="expected a dataclass"):
        config_to_dict({"a": 1})
