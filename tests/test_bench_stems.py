"""tools.bench_stems: its forward counts and its report (the benchmark itself is run by hand)."""
from tools.bench_stems import forwards, report


def test_forwards_follow_the_plan_arithmetic():
    one = forwards(20., 1, 0.25)
    assert forwards(20., 2, 0.25) == 2 * one  # each shift is a pass over the whole track
    assert forwards(20., 1, 0.5) > one  # a shorter stride, more segments
    assert forwards(20., 0, 0.25) <= one  # no shift: the unshifted track only


def _runs(wall: float, cpu: float):
    return [{"wall_s": wall, "cpu_s": cpu}, {"wall_s": wall + 2, "cpu_s": cpu + 2}]


def test_report_gives_ratios_to_the_full_run_and_to_the_base_passes():
    result = {"seconds": 20, "threads": 2, "torch": "x",
              "stems_runs": {"full": _runs(40, 70), "two_stems_minus": _runs(10, 17)},
              "vocals_bit_identical": {"two_stems_minus": True},
              "passes_runs": {"shifts1_overlap0.25": _runs(10, 18),
                              "shifts2_overlap0.25": _runs(20, 34)},
              "passes_forwards": {"shifts1_overlap0.25": 4, "shifts2_overlap0.25": 8}}
    text = report(result)
    assert "two_stems_minus      11.00 s wall (ratio 0.268)" in text
    assert "18.00 s CPU (ratio 0.254), vocals bit-identical: True" in text
    assert "shifts2_overlap0.25    21.00 s wall (ratio 1.909)" in text
    assert "8 forwards (ratio 2.00)" in text
