"""CLI paths shared by every model family: generic eval and the benchmarks with their own options."""

import json

import pytest
import torch

from dynets import create_model, save
from dynets.cli import main
from dynets.cli_bench import EXTERNAL_BENCHES, bench_names


def test_eval_of_a_non_exit_model_reports_accuracy_flops_and_decisions(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("skip_resnet", in_channels=1, image_size=8, num_classes=10).eval()
    save(model, tmp_path / "m")
    out_json = tmp_path / "eval.json"
    argv = ["eval", str(tmp_path / "m"), "--data", "digits", "--limit", "64", "--json", str(out_json)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "MFLOPs" in printed and "blocks_run" in printed
    r = json.loads(out_json.read_text())
    assert r["samples"] == 64 and 0.0 <= r["accuracy"] <= 1.0
    assert 0 < r["mean_flops"] <= r["full_flops"] * 1.001
    assert 0.0 <= r["decisions_mean"]["blocks_run"] <= 1.0


def test_bench_names_dispatch_to_their_own_parsers(capsys):
    assert set(EXTERNAL_BENCHES) <= set(bench_names())
    with pytest.raises(SystemExit) as e:
        main(["bench", "moe", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "no-such-bench"])
    assert "no-such-bench" in capsys.readouterr().err


def test_bench_vit_and_skiprnn_are_the_spatial_and_temporal_benchmarks(monkeypatch):
    import dynets.bench.spatial as spatial
    import dynets.bench.temporal as temporal

    seen = []
    monkeypatch.setattr(spatial, "main", lambda argv: seen.append(("spatial", argv)) or 0)
    monkeypatch.setattr(temporal, "main", lambda argv: seen.append(("temporal", argv)) or 0)
    assert main(["bench", "vit", "--quick", "--json", "v.json"]) == 0
    assert main(["bench", "skiprnn", "--quick", "--json", "s.json"]) == 0
    assert seen == [
        ("spatial", ["--parts", "vit", "--quick", "--json", "v.json"]),  # the ViT part only
        ("temporal", ["--quick", "--json", "s.json"]),
    ]


def test_train_and_eval_a_sequence_model_from_the_cli(tmp_path, capsys, require_shared):
    require_shared("data/ucr-subset.tar.xz")
    run = tmp_path / "run"
    argv = ["train", "skip_lstm", "--data", "ucr:ECG5000", "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--limit", "64", "--no-progress", "--threads", "1", "--set", "hidden=16"]) == 0
    assert main(["eval", str(run / "model"), "--data", "ucr:ECG5000", "--limit", "50", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "50 samples of ucr:ECG5000:test" in printed and "decision updated" in printed
