"""The spatial benchmark's settings: DynamicViT's prune stages are checked before any training."""

import pytest

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
