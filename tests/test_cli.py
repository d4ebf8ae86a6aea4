"""Smoke tests of every `dynets` command on the embedded digits data, plus bad input."""

import json
import subprocess
import sys

import pytest

from dynets.bench.early_exit import HEADLINE_KEYS
from dynets.cli import main
from dynets.core.serialization import load

TINY = [
    "--set",
    "widths=[8,8,16]",
    "--set",
    "blocks=[1,1,1]",
    "--set",
    "exits=[0,1]",
    "--set",
    'head={"kind": "linear"}',
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "ee_resnet",
                "--data",
                "digits",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--limit",
                "300",
                "--no-progress",
                *TINY,
            ]
        )
        == 0
    )
    return out


def test_help_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "dynets.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "calibrate" in r.stdout and "demo" in r.stdout


def test_models(capsys):
    assert main(["models", "ee_*"]) == 0
    assert "ee_resnet" in capsys.readouterr().out


def test_train_and_resume(run_dir, capsys):
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    assert (
        main(
            [
                "train",
                "ee_resnet",
                "--data",
                "digits",
                "--out",
                str(run_dir),
                "--epochs",
                "2",
                "--limit",
                "300",
                "--resume",
                "--no-progress",
                *TINY,
            ]
        )
        == 0
    )
    hist = json.loads((run_dir / "model" / "config.json").read_text())["extra"]["history"]
    assert [h["epoch"] for h in hist][-1] == 2


def test_eval_writes_table_and_plots(run_dir, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                str(run_dir),
                "--data",
                "digits",
                "--out",
                str(tmp_path),
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| confidence |" in out and "pareto.png" in out
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "examples_by_exit.png").exists()
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["policy"] for r in rows} >= {"confidence", "entropy", "patience", "learned"}


def test_calibrate_sets_policy(run_dir, tmp_path, capsys):
    dest = tmp_path / "cal"
    assert main(["calibrate", str(run_dir), "--data", "digits", "--budget", "0.8", "--out", str(dest)]) == 0
    assert "saved" in capsys.readouterr().out
    assert load(dest).policy.kind in ("confidence", "entropy", "learned")


@pytest.mark.parametrize("recipe", ["frozen", "finetune"])
def test_bench_quick_json(tmp_path, capsys, recipe):
    path = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                "early-exit",
                "--recipe",
                recipe,
                *(["--finetune-epochs", "1"] if recipe == "finetune" else []),
                "--data",
                "digits",
                "--quick",
                "--epochs",
                "1",
                "--limit",
                "300",
                "--json",
                str(path),
                "--no-progress",
                "--set",
                "widths=[8,8,16]",
                "--set",
                "blocks=[2,2,2]",
                "--set",
                "exits=[0,2]",
                "--set",
                "stem_stride=1",
            ]
        )
        == 0
    )
    r = json.loads(path.read_text())
    for k in HEADLINE_KEYS:
        assert isinstance(r[k], float)
    assert (tmp_path / "b_pareto.png").exists() and (tmp_path / "b.md").exists()
    # The static baseline gets the training the early-exit backbone got: with "finetune", its own
    # fine-tune too, so its accuracy differs from the model it started from.
    if recipe == "finetune":
        assert r["static_training"] == "1 epochs at lr 0.1, then 1 at lr 0.01"
        assert isinstance(r["static_acc_before_finetune"], float)
    else:
        assert r["static_training"] == "1 epochs at lr 0.1" and r["static_acc_before_finetune"] is None


def test_demo(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "plot:" in out and (tmp_path / "demo_pareto.png").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "resnet_9000", "--data", "digits", "--out", "X"], "unknown model name"),
        (["train", "ee_resnet", "--data", "npz:/does/not/exist.npz", "--out", "X"], "does/not/exist"),
        (["train", "ee_resnet", "--data", "imagenet", "--out", "X"], "imagenet"),
        (["eval", "/does/not/exist", "--data", "digits"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_message(argv, match, capsys, tmp_path):
    argv = [a if a != "X" else str(tmp_path / "x") for a in argv]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_calibrate_bad_budget(run_dir, capsys):
    with pytest.raises(SystemExit, match="budget"):
        main(["calibrate", str(run_dir), "--data", "digits", "--budget", "0.01", "--out", str(run_dir / "x")])


def test_train_with_a_teacher(run_dir, tmp_path, capsys):
    from dynets.train import load_checkpoint

    out = tmp_path / "student"
    argv = ["train", "ee_resnet", "--data", "digits", "--out", str(out), "--epochs", "1", "--limit", "300"]
    argv += ["--no-progress", "--teacher", str(run_dir / "model"), "--kd", "0.7", *TINY]
    assert main(argv) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["config"]["kd"] == 0.7
    assert load(out / "model") is not None


def test_train_teacher_bad_input(run_dir, tmp_path, capsys):
    base = ["train", "ee_resnet", "--data", "digits", "--out", str(tmp_path / "s"), "--epochs", "1", *TINY]
    with pytest.raises(SystemExit, match="--kd 0.5 expected a --teacher model directory, got none"):
        main([*base, "--kd", "0.5"])
    assert main([*base, "--teacher", str(run_dir / "model"), "--kd", "2"]) == 2
    assert "TrainConfig.kd: expected a float in [0, 1], got 2.0" in capsys.readouterr().err
    assert main([*base, "--teacher", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="train text: --teacher and --kd are for image and sequence models"):
        main(["train", "text", "--teacher", str(run_dir / "model")])
