"""The skip/width benchmark: its equal-time reference (the best static model, or mix of two, that runs
in at most the dynamic model's time) and its settings' checks."""

import itertools

import pytest

from dynets.bench.skip_width import SkipWidthBenchConfig, static_at_time


def brute_force(statics, speedup, shares=2001):
    """Every single model and every mix of two on a fine grid of shares; keep those within time."""
    tau = 1.0 / speedup
    best = None
    for (s0, a0), (s1, a1) in itertools.product(statics, repeat=2):
        for k in range(shares):
            w = k / (shares - 1)
            t = w / s0 + (1 - w) / s1
            if t <= tau + 1e-12:
                a = w * a0 + (1 - w) * a1
                best = a if best is None else max(best, a)
    return best


STATICS = [(1.0, 0.8163), (1.36, 0.8119), (1.46, 0.8189)]


@pytest.mark.parametrize("speedup", [0.8, 1.0, 1.2, 1.36, 1.43, 1.46])
def test_equal_time_reference_matches_a_brute_force_search_over_mixes(speedup):
    got = static_at_time(STATICS, speedup)
    assert got == pytest.approx(brute_force(STATICS, speedup), abs=2e-5)


def test_a_faster_and_more_accurate_static_model_sets_the_bar():
    # the shallow model (1.46x, 81.89%) is faster than a dynamic model at 1.43x: that is the bar,
    # not a line drawn between the narrow (1.36x) and shallow points
    assert static_at_time(STATICS, 1.43) == pytest.approx(0.8189)


def test_a_mix_of_a_fast_and_a_slow_model_counts():
    # fast 2x at 70%, slow 1x at 90%; a dynamic model at 1.5x takes 2/3 of the slow model's time:
    # a share w on the fast model with w / 2 + (1 - w) = 2/3 gives w = 2/3
    assert static_at_time([(2.0, 0.7), (1.0, 0.9)], 1.5) == pytest.approx(0.7 * 2 / 3 + 0.9 / 3)


def test_nothing_static_is_fast_enough():
    assert static_at_time([(1.0, 0.8), (1.2, 0.7)], 1.5) is None


def test_a_non_positive_speedup_is_an_error():
    with pytest.raises(ValueError, match="speedup: expected a positive number, got 0"):
        static_at_time(STATICS, 0)


@pytest.mark.parametrize("kd", [-0.1, 1.5, True, "0.5"])
def test_a_kd_weight_outside_0_1_is_an_error(kd):
    with pytest.raises(ValueError, match=r"kd: expected a float in \[0, 1\], got"):
        SkipWidthBenchConfig(kd=kd)


def test_kd_needs_the_baselines_fine_tuned_too():
    with pytest.raises(ValueError, match="baseline_finetune=True"):
        SkipWidthBenchConfig(kd=0.5, baseline_finetune=False)
