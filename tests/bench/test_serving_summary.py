"""The serving benchmark's verdict, read both ways: the fixed server's break as the first probed
rate over the SLO, and as the lowest load of its long rows over the SLO."""

from __future__ import annotations

from dynets.bench.serving import summarize


def row(server: str, mult: float, p95: float | None, lost: int = 0) -> dict:
    return {"server": server, "multiplier": mult, "p95_ms": p95, "lost": lost}


def test_summary_reads_the_break_from_probes_and_from_rows():
    result = {
        "r0": 100.0,
        "fixed_break_rate": 140.0,  # the first probe over the SLO
        "rows": [
            row("fixed", 1.0, 101.0),  # over already in its long row at R0
            row("fixed", 2.0, 900.0),
            row("fixed", 2.8, 950.0),
            row("fixed", 4.0, 990.0, lost=0),
            row("adaptive", 1.0, 30.0),
            row("adaptive", 2.0, 60.0),
            row("adaptive", 2.8, 400.0),
            row("adaptive", 4.0, None, lost=2),  # nothing answered in time: no p95
        ],
    }
    s = summarize(result, 100.0, (1.0, 2.0, 4.0))
    assert s["fixed_breaks_slo_at"] == 1.0 and s["adaptive_load_at_2x_break"] == 2.8
    assert s["adaptive_within_slo_at_2x_break"] is False  # 280/s: 400 ms
    assert s["adaptive_within_slo_at_2x_row_break"] is True  # 200/s: 60 ms
    assert s["adaptive_within_slo"] == {"1.0": True, "2.0": True, "4.0": None}
    assert s["fixed_within_slo"] == {"1.0": False, "2.0": False, "4.0": False}
    assert s["lost_requests"] == 2
    result["rows"][0]["p95_ms"] = 99.0  # the fixed server holds at R0, breaks at 2x: 2x of that is 4x
    assert summarize(result, 100.0, (1.0, 2.0, 4.0))["adaptive_within_slo_at_2x_row_break"] is None
