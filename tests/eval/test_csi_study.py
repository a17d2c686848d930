"""CSI study, prefill gap, prefill sweep and average-budget study commands on tiny settings."""

from __future__ import annotations

import csv
import json

import pytest

from eval import average_budget_study, csi_study, prefill_gap, prefill_sweep
from wide_env.config import ScenarioConfig

SMALL = ScenarioConfig(tokens_per_episode=1, distance_max_m=120.0)


@pytest.fixture(scope="module")
def decode_rows():
    return csi_study.run_csi_study(SMALL, dopplers_hz=(10.0, 100.0), delays=(0, 1, 4), episodes=2, seed=3)


def test_perfect_csi_has_no_gap(decode_rows):
    for row in decode_rows:
        if row.csi_delay_steps == 0:
            assert row.cost_gap_percent == 0.0
            assert row.energy_gap_percent == 0.0
            assert row.observed_latency_violation_rate == 0.0
            assert row.csi_correlation == 1.0


def test_delayed_csi_costs_more_than_genie(decode_rows):
    delayed = [row for row in decode_rows if row.csi_delay_steps > 0]

    assert all(row.cost_gap_percent >= 0.0 for row in delayed)
    assert all(row.genie_accuracy_violation_rate <= row.observed_accuracy_violation_rate for row in delayed)
    fast = {row.csi_delay_steps: row for row in decode_rows if row.doppler_hz == 100.0}
    slow = {row.csi_delay_steps: row for row in decode_rows if row.doppler_hz == 10.0}
    # A 4-step delay at 100 Hz leaves correlation 0.17, at 10 Hz 0.98.
    assert fast[4].cost_gap_percent > slow[4].cost_gap_percent
    assert fast[4].csi_correlation < slow[4].csi_correlation


def test_points_share_the_genie(decode_rows):
    # Every point of one Doppler runs on the same channels and gates, so the genie costs the same.
    for doppler in (10.0, 100.0):
        genie = {row.genie_cost_per_step for row in decode_rows if row.doppler_hz == doppler}
        assert len(genie) == 1


def test_prefill_point_runs():
    scenario = ScenarioConfig(prompt_tokens=2, distance_max_m=120.0, csi_delay_steps=2, doppler_hz=5.0)

    row = csi_study.run_point(scenario, "prefill", episodes=1, seed=0)

    assert row.env == "prefill"
    assert row.steps == 32
    assert row.genie_energy_mj_per_token > 0


def test_main_writes_csv_and_plot(tmp_path, capsys):
    code = csi_study.main(["--dopplers", "50", "--delays", "0", "2", "--episodes", "1", "--tokens", "1",
                           "--scenario-set", "distance_max_m=120", "--out", str(tmp_path)])

    assert code == 0
    with (tmp_path / "csi_study.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["csi_delay_steps"]) for row in rows] == [0, 2]
    assert (tmp_path / "csi_study.png").stat().st_size > 1000
    assert "cost gap" in capsys.readouterr().out


def test_main_rejects_average_budget(capsys):
    code = csi_study.main(["--scenario-set", "accuracy_budget_mode=average", "--episodes", "1"])

    assert code == 2
    assert "per_step" in capsys.readouterr().err


def test_prefill_gap_row(tmp_path):
    scenario = ScenarioConfig(prompt_tokens=3, prefill_latency_budget_s=6e-3)

    row = prefill_gap.measure_gap(scenario, instances=3, seed=1)

    assert row.instances == 3
    assert row.worse_excess_instances == 0
    assert row.max_gap_percent < 1.0 or row.feasible_instances == 0


def test_prefill_gap_main_writes_csv(tmp_path, capsys):
    path = tmp_path / "gap.csv"
    code = prefill_gap.main(["--tokens", "2", "--budget-scales", "1", "--instances", "2", "--csv", str(path)])

    assert code == 0
    assert "mean gap" in capsys.readouterr().out
    with path.open() as handle:
        assert len(list(csv.DictReader(handle))) == 1


def test_average_budget_study_compares_baselines(tmp_path, capsys):
    code = average_budget_study.main(["--scenario-set", "tokens_per_episode=1", "--scenario-set",
                                      "distance_max_m=100", "--episodes", "2", "--train-episodes", "2",
                                      "--seed", "100", "--out", str(tmp_path)])

    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [policy["policy"] for policy in summary["policies"]]
    assert names == ["oracle", "lagrangian", "lagrangian-adaptive", "topk"]
    assert summary["scenario"]["accuracy_budget_mode"] == "average"
    assert "mJ/token" in capsys.readouterr().out


def test_average_budget_study_rejects_overlapping_seeds(capsys):
    code = average_budget_study.main(["--episodes", "2", "--train-episodes", "2", "--seed", "1"])

    assert code == 2
    assert "overlap" in capsys.readouterr().err


def test_prefill_sweep_writes_csv_and_plot(tmp_path, capsys):
    code = prefill_sweep.main(["--tokens", "1", "2", "--episodes", "1", "--exact-max-tokens", "1",
                               "--scenario-set", "distance_max_m=100", "--out", str(tmp_path)])

    assert code == 0
    with (tmp_path / "prefill_sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    policies = [(int(row["prompt_tokens"]), row["policy"]) for row in rows]
    assert policies == [(1, "prefill-exact"), (1, "prefill-fast"), (1, "prefill-token-by-token"), (1, "topk"),
                        (2, "prefill-fast"), (2, "prefill-token-by-token"), (2, "topk")]
    energy = {(int(row["prompt_tokens"]), row["policy"]): float(row["energy_mj_per_token"]) for row in rows}
    # With one token the prefill problem is the decoding problem, so all three oracles agree.
    assert energy[(1, "prefill-exact")] == pytest.approx(energy[(1, "prefill-fast")])
    assert energy[(1, "prefill-exact")] == pytest.approx(energy[(1, "prefill-token-by-token")])
    assert (tmp_path / "prefill_sweep.png").stat().st_size > 1000
    assert "mJ/token" in capsys.readouterr().out
