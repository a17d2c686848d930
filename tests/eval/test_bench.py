"""``wide-bench`` on minimal sizes: the cases run, the report has its tables and targets."""

import pytest

from eval import bench


def test_quick_run_writes_report(tmp_path, capsys):
    out = tmp_path / "benchmarks.md"

    assert bench.main(["--quick", "--in-process", "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    report = out.read_text(encoding="utf-8")
    assert report.startswith("# Benchmarks")
    assert "Command: `wide-bench --quick --in-process --out" in report
    assert "logical cores" in report
    for row in ("| single env |", "| SyncVectorEnv B=4 |", "| native B=4 |", "| default scenario | 8 | 2 | 4 |",
                "| one env >= 20,000 steps/s |", "oracle, default scenario, >= 200,000/s batched"):
        assert row in report
        assert row in printed
    # Exhaustive search and the MILP agree with the oracle on the checked states.
    default_row = next(line for line in report.splitlines() if line.startswith("| default scenario |"))
    assert default_row.rstrip().endswith("| 0 |")


def test_worker_process_returns_measurement():
    entry = {"case": "env_vector", "label": "native B=2",
             "params": {"mode": "vector_entry_point", "num_envs": 2, "seconds": 0.01}}

    result = bench.run_case(entry, in_process=False)

    assert result["steps_per_s"] > 0
    assert result["peak_rss_mb"] > 0


def test_report_marks_missed_targets():
    results = [({"case": "env_single", "label": "single env", "params": {}},
                {"steps_per_s": 10.0, "steps_per_cpu_s": 12.0, "peak_rss_mb": 50.0})]

    report = bench.format_report(bench.machine_info(), results, "wide-bench", [0.0, 0.0, 0.0], 1.0)

    assert "| one env >= 20,000 steps/s | 10 | MISSED |" in report


@pytest.mark.parametrize("argv, message", [(["--seconds", "0"], "--seconds must be positive"),
                                           (["--batch-sizes", "0"], "--batch-sizes must be positive")])
def test_invalid_arguments(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--quick", "--no-write"] + argv)
