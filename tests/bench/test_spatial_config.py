"""The spatial benchmark's settings: DynamicViT's prune stages are checked before any training."""

import pytest
import torch

from dynets.bench import spatial
from dynets.bench.common import cpu_model
from dynets.bench.spatial import SpatialBenchConfig


def test_prune_stages_default_to_the_late_schedule_and_take_a_list():
    assert SpatialBenchConfig().dvit_prune_after == (1, 3, 4)
    assert SpatialBenchConfig(dvit_prune_after=[0, 2, 4]).dvit_prune_after == (0, 2, 4)


@pytest.mark.parametrize("stages", [(), (2, 2), (3, 1), (-1, 2), (0, 5)])
def test_bad_prune_stages_name_the_value_and_the_valid_range(stages):
    with pytest.raises(ValueError, match=r"dvit_prune_after: .*\[0, 4\].*got"):
        SpatialBenchConfig(dvit_prune_after=stages)


def test_the_cli_rejects_prune_stages_that_are_not_ints_or_out_of_range(capsys):
    with pytest.raises(SystemExit):
        spatial.main(["--dvit-prune-after", "0,two,4"])
    assert "expected comma-separated ints such as 0,2,4, got '0,two,4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        spatial.main(["--dvit-prune-after", "0,5"])
    assert "dvit_prune_after: expected strictly increasing block indices in [0, 4], got (0, 5)" in (
        capsys.readouterr().err
    )


def test_cpu_model_names_the_host():
    name = cpu_model()
    assert isinstance(name, str) and name.strip()


def test_the_cli_rejects_halting_thresholds_outside_the_unit_interval(capsys):
    with pytest.raises(SystemExit):
        spatial.main(["--halting-thresholds", "0.9,1.5"])
    err = capsys.readouterr().err
    assert "threshold: expected a number in (0, 1] (1 - eps), got 1.5" in err
    with pytest.raises(SystemExit):
        spatial.main(["--halting-thresholds", "0.9,high"])
    assert "--halting-thresholds: expected comma-separated numbers in (0, 1]" in capsys.readouterr().err


def test_bad_halting_thresholds_in_the_config_are_rejected_before_training():
    with pytest.raises(ValueError, match=r"threshold: expected a number in \(0, 1\]"):
        SpatialBenchConfig(halting_thresholds=(0.9, 0.0))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--halting-target-depth", "7", "target_depth: expected a value in (0, depth=6], got 7.0"),
        ("--halting-distr-weight", "-0.5", "distr_weight: expected a finite number >= 0, got -0.5"),
        ("--halting-ponder-weight", "inf", "ponder_weight: expected a finite number >= 0, got inf"),
        ("--keep-ratios", "0.8,0", "keep_ratio: expected a number in (0, 1], got 0.0"),
        ("--keep-ratios", "0.8,most", "--keep-ratios: expected comma-separated numbers in (0, 1]"),
        ("--halting-epochs", "0", "halting_epochs: expected an int >= 1, got 0"),
        ("--finetune-epochs", "-2", "finetune_epochs: expected an int >= 1, got -2"),
        ("--dvit-lr", "0", "dvit_lr: expected a finite number > 0, got 0.0"),
        ("--dvit-predictor-lr-scale", "nan", "dvit_predictor_lr_scale: expected a finite number > 0, got"),
        ("--tome-finetune-r", "0", "tome_finetune_r: expected an int >= 1 (tokens merged per block), got 0"),
        ("--tome-finetune-r", "eleven", "--tome-finetune-r: invalid int value: 'eleven'"),
    ],
)
def test_the_cli_rejects_bad_halting_recipes_and_keep_ratios_before_training(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        spatial.main(["--parts", "vit", flag, value])
    assert message in capsys.readouterr().err


def test_halting_recipe_flags_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(spatial, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    spatial.main(
        ["--halting-target-depth", "3.5", "--halting-distr-weight", "1", "--keep-ratios", "0.8,0.7"]
        + ["--halting-epochs", "8"]
    )
    cfg = seen["cfg"]
    assert cfg.tome_finetune_r is None  # off unless asked for
    assert cfg.halting_kw == {"target_depth": 3.5, "distr_weight": 1.0}
    assert (cfg.halting_epochs, cfg.finetune_epochs) == (8, 1)
    assert SpatialBenchConfig().halting_epochs is None  # A-ViT follows --finetune-epochs
    assert cfg.keep_ratios == (0.8, 0.7)
    assert SpatialBenchConfig().halting_kw == {}  # the default recipe keeps the cached models' keys


def test_unknown_halting_settings_are_named():
    with pytest.raises(
        ValueError, match=r"halting_kw: expected HaltingViTConfig fields, got unknown \['depthh'\]"
    ):
        SpatialBenchConfig(halting_kw={"depthh": 3})


def test_the_static_finetune_control_is_on_by_default_and_can_be_turned_off(monkeypatch):
    seen = {}
    monkeypatch.setattr(spatial, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    assert SpatialBenchConfig().static_finetune
    spatial.main(["--no-static-finetune"])
    assert seen["cfg"].static_finetune is False


def _vit_result(control: bool) -> dict:
    static = {"accuracy": 0.6727, "mean_flops": 116e6}
    row = {"family": "halting (A-ViT)", "setting": 0.99, "accuracy": 0.6696, "flops_ratio": 0.675}
    row.update(speedup_b1=0.9, speedup_b64=1.2, accuracy_drop=static["accuracy"] - row["accuracy"])
    if control:
        static.update(finetuned_accuracy=0.6801, finetune={"epochs": 4, "lr": 3e-4, "distill_weight": 0.5})
        row["accuracy_drop_vs_finetuned"] = 0.6801 - row["accuracy"]
    vit = {"static": static, "methods": {"halting_0.99": row}, "control_accuracy": {}, "model": {}}
    return {"data": "cifar10", "quick": False, "threads": 2, "seconds": 1.0, "torch": "x", "vit": vit}


def test_the_report_gives_the_drop_against_the_finetuned_static_where_the_control_ran():
    md = spatial._markdown(_vit_result(True))
    assert "given the dynamic models' extra training (4 epoch(s) at lr 0.0003" in md
    assert "**68.01%**" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.endswith("| drop vs fine-tuned static |")
    row = next(line for line in md.splitlines() if line.startswith("| halting"))
    assert row.endswith("| 0.31 | 0.675 | 0.90x | 1.20x | 1.05 |")  # 67.27 - 66.96, 68.01 - 66.96
    r = _vit_result(True)
    r["vit"]["methods"]["halting_0.99"]["base"] = "finetuned_static"  # as ToMe's rows on the control
    row = next(line for line in spatial._markdown(r).splitlines() if line.startswith("| halting"))
    assert row.endswith("| - | 0.675 | 0.90x | 1.20x | 1.05 |")
    md = spatial._markdown(_vit_result(False))
    assert "Control: the same static ViT" not in md and "fine-tuned static" not in md


def test_the_finetuned_tome_flag_reaches_the_config_and_the_report_names_its_recipe(monkeypatch):
    seen = {}
    monkeypatch.setattr(spatial, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    spatial.main(["--tome-finetune-r", "11", "--token-multiple", "8"])
    assert (seen["cfg"].tome_finetune_r, seen["cfg"].token_multiple) == (11, 8)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"tome_finetune_r: expected an int >= 1"):
            SpatialBenchConfig(tome_finetune_r=bad)
    config = {"vit_epochs": 10, "finetune_epochs": 4, "vit_lr": 1e-3, "dvit_lr": 3e-4, "halting_lr": 3e-4}
    line = spatial._training_line({**config, "tome_finetune_r": 11, "token_multiple": 16})
    assert "ToMe untrained, and also fine-tuned from the static ViT with merging on (r = 11, lengths" in line
    assert "multiples of 16) with the control's recipe" in line
    assert "ToMe untrained. Speed-ups" in spatial._training_line(config)
    assert "alternating over groups of batches, medians" in line
    # its rows are trained from the static ViT, so both drops are shown (unlike the untrained ToMe's)
    r = _vit_result(True)
    r["vit"]["methods"]["halting_0.99"].update(
        family="merging (ToMe fine-tuned with merging at r = 11)", base="static"
    )
    row = next(line for line in spatial._markdown(r).splitlines() if line.startswith("| merging"))
    assert row.endswith("| 0.31 | 0.675 | 0.90x | 1.20x | 1.05 |")


def test_the_compile_flag_reaches_the_config_and_the_report_says_what_ran_compiled(monkeypatch):
    seen = {}
    monkeypatch.setattr(spatial, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(spatial, "check_compiler", lambda: "g++")
    spatial.main(["--compile"])
    assert seen["cfg"].compile is True
    assert SpatialBenchConfig().compile is False  # eager timing unless asked for
    config = {"vit_epochs": 10, "finetune_epochs": 4, "vit_lr": 1e-3, "dvit_lr": 3e-4, "halting_lr": 3e-4}
    line = spatial._training_line({**config, "compile": True})
    assert "**Compiled timing** (`--compile`)" in line and "A-ViT, whose token counts" in line
    assert "Compiled" not in spatial._training_line(config)


def test_compile_without_a_cxx_compiler_is_refused_before_any_training(monkeypatch):
    monkeypatch.setattr(spatial.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "my-cxx")
    with pytest.raises(
        ValueError, match=r"compile: expected a C\+\+ compiler .*'my-cxx', 'g\+\+'.* found none"
    ):
        SpatialBenchConfig(compile=True)


def test_timing_compiles_the_sides_it_is_told_to_afresh_for_each_batch_size(monkeypatch):
    """torch.compile replaced by a recorder: which side is compiled, with dynamic=False, and compiled
    (called) on the first and last batch shape before compare_wallclock times it."""
    compiled, calls, resets = [], [], []

    def fake_compile(fn, dynamic=None):
        compiled.append((fn.__name__, dynamic))
        return lambda b: calls.append((fn.__name__, b.shape[0])) or fn(b)

    monkeypatch.setattr(spatial.torch, "compile", fake_compile)
    monkeypatch.setattr(spatial.torch._dynamo, "reset", lambda: resets.append(1))
    timed = []
    monkeypatch.setattr(
        spatial, "compare_wallclock", lambda s, d, batches, **kw: timed.append((s, d)) or {"speedup": 1.0}
    )

    def static(b):
        return b

    def dynamic(b):
        return b

    cfg = SpatialBenchConfig(b1_samples=3, b64_samples=70)
    x = torch.zeros(70, 3, 32, 32)
    res = spatial._timing(static, dynamic, x, cfg, (True, True))
    assert compiled == [("static", False), ("dynamic", False)] * 2 and len(resets) == 2
    # warmed (compiled) on batch 1, and at b64 on the full batch and the last, shorter one (6 images)
    assert calls[:2] == [("static", 1), ("dynamic", 1)]
    assert calls[2:] == [("static", 64), ("dynamic", 64), ("static", 6), ("dynamic", 6)]
    assert res["b64"]["compiled"] == {"static": True, "dynamic": True}
    compiled.clear()
    res = spatial._timing(static, dynamic, x, cfg, (True, False))  # A-ViT: the dynamic side eager
    assert compiled == [("static", False)] * 2 and timed[-1][1] is dynamic
    assert res["b1"]["compiled"] == {"static": True, "dynamic": False}
    compiled.clear()
    res = spatial._timing(static, dynamic, x, cfg)  # the default: both eager, nothing reset
    assert compiled == [] and len(resets) == 4 and timed[-1] == (static, dynamic)


def test_a_traced_tome_vit_gives_the_eager_logits_decisions_and_flops():
    """dynamo traces the whole call, DynamicOutput included (backend aot_eager: no C++ compiler needed;
    the benchmark's inductor backend only changes how the same graphs run)."""
    from dynets.spatial.merging import ToMeViT, ToMeViTConfig

    torch.manual_seed(0)
    m = ToMeViT(ToMeViTConfig(dim=32, depth=2, heads=2, mlp_ratio=2.0, merge_r=8, token_multiple=16)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.inference_mode():
        eager, comp = m(x), torch.compile(lambda b: m(b), dynamic=False, backend="aot_eager")(x)
    torch.testing.assert_close(comp.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(comp.flops, eager.flops) and torch.equal(
        comp.decisions["tokens"], eager.decisions["tokens"]
    )
