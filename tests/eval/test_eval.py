"""Tests of the evaluation: metrics by hand, common random numbers, the CLI end to end and its errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from agents.baselines import TopKPolicy
from eval.cli import main, parse_sweep_points, parse_value
from eval.metrics import (
    EpisodeAccumulator,
    add_oracle_gaps,
    find_mismatched_episodes,
    gap_percent,
    mean_confidence_interval,
    saving_percent,
    summarize_policy,
    token_energies_j,
)
from eval.runner import MetricHook, check_policy_specs, evaluate_policies, run_sweep
from wide_env.config import ScenarioConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def step_info(energy_j: float, topk_energy_j: float, degradation: float = 0.0, accuracy_violation: bool = False,
              latency_violation: bool = False, nodes: int = 1, experts: int = 2) -> dict:
    """A minimal ``info`` of one env step with the keys the accumulator reads."""
    return {
        "energy_j": energy_j,
        "topk_energy_j": topk_energy_j,
        "uplink_energy_j": energy_j / 4,
        "downlink_energy_j": energy_j / 4,
        "compute_energy_j": energy_j / 2,
        "failure_energy_j": 0.0,
        "degradation": degradation,
        "accuracy_violation": accuracy_violation,
        "latency_violation": latency_violation,
        "nodes_contacted": nodes,
        "experts_computed": experts,
    }


def read_csv(path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -- metrics against hand-computed values --------------------------------------


def test_confidence_interval_hand_computed():
    interval = mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
    # s = sqrt(5/3), standard error s / 2, t quantile t(0.975, df=3) = 3.182446305
    expected_half_width = 3.182446305 * math.sqrt(5.0 / 3.0) / 2.0
    assert interval.mean == pytest.approx(2.5)
    assert interval.half_width == pytest.approx(expected_half_width, rel=1e-8)
    assert interval.low == pytest.approx(2.5 - expected_half_width)
    assert interval.high == pytest.approx(2.5 + expected_half_width)
    assert interval.samples == 4


def test_confidence_interval_other_level():
    interval = mean_confidence_interval([2.0, 4.0], confidence=0.9)
    # s = sqrt(2), standard error 1, t(0.95, df=1) = 6.313751515
    assert interval.mean == pytest.approx(3.0)
    assert interval.half_width == pytest.approx(6.313751515, rel=1e-8)


def test_confidence_interval_single_and_empty():
    single = mean_confidence_interval([5.0])
    assert single.mean == 5.0
    assert math.isnan(single.half_width)
    with pytest.raises(ValueError, match="empty sample"):
        mean_confidence_interval([])
    with pytest.raises(ValueError, match="invalid confidence"):
        mean_confidence_interval([1.0, 2.0], confidence=1.5)


def test_saving_and_gap_percent():
    assert saving_percent(80.0, 100.0) == pytest.approx(20.0)
    assert saving_percent(125.0, 100.0) == pytest.approx(-25.0)
    assert gap_percent(110.0, 100.0) == pytest.approx(10.0)
    assert gap_percent(100.0, 100.0) == 0.0
    with pytest.raises(ValueError, match="reference energy"):
        saving_percent(1.0, 0.0)
    with pytest.raises(ValueError, match="optimal energy"):
        gap_percent(1.0, -2.0)


def test_token_energies_sum_layers():
    np.testing.assert_allclose(token_energies_j([1, 2, 3, 4, 5, 6], 3), [6.0, 15.0])
    with pytest.raises(ValueError, match="whole tokens"):
        token_energies_j([1, 2, 3, 4], 3)


def test_summary_hand_computed():
    # Two layers per token, two tokens per episode, two episodes.
    first = EpisodeAccumulator(episode=0, seed=10, layers_per_token=2)
    for energy, violation in [(1e-3, False), (2e-3, True), (3e-3, False), (2e-3, False)]:
        first.add_step(step_info(energy, 4e-3, degradation=0.1, accuracy_violation=violation), 1e-6)
    second = EpisodeAccumulator(episode=1, seed=11, layers_per_token=2)
    for energy in [2e-3, 2e-3, 2e-3, 2e-3]:
        second.add_step(step_info(energy, 4e-3, degradation=0.3, latency_violation=True, nodes=2, experts=1),
                        3e-6)
    episodes = [first.finish({"measured": 1.0}), second.finish({"measured": 3.0})]

    np.testing.assert_allclose(episodes[0].token_energies_j, [3e-3, 5e-3])
    assert episodes[0].energy_per_token_mj == pytest.approx(4.0)
    assert episodes[1].energy_per_token_mj == pytest.approx(4.0)
    assert episodes[0].topk_energy_per_token_mj == pytest.approx(8.0)

    summary = summarize_policy("policy", episodes)
    assert summary.episodes == 2
    assert summary.steps == 8
    assert summary.energy_per_token_mj.mean == pytest.approx(4.0)
    assert summary.energy_per_token_mj.half_width == pytest.approx(0.0)
    assert summary.topk_energy_per_token_mj == pytest.approx(8.0)
    assert summary.saving_vs_topk_pct == pytest.approx(50.0)
    assert summary.gap_to_oracle_pct is None
    assert summary.accuracy_violation_rate == pytest.approx(1 / 8)
    assert summary.latency_violation_rate == pytest.approx(4 / 8)
    assert summary.mean_degradation == pytest.approx(0.2)
    assert summary.experts_per_step == pytest.approx(12 / 8)
    assert summary.nodes_per_step == pytest.approx(12 / 8)
    assert summary.decide_time_us == pytest.approx(2.0)
    assert summary.extra["measured"].mean == pytest.approx(2.0)
    assert summary.as_row()["measured_mean"] == pytest.approx(2.0)


def test_oracle_gap_filled_in():
    def summary_with_energy(name, energy_j):
        accumulator = EpisodeAccumulator(0, 0, layers_per_token=1)
        accumulator.add_step(step_info(energy_j, 4e-3), 0.0)
        return summarize_policy(name, [accumulator.finish()])

    summaries = [summary_with_energy("topk", 4e-3), summary_with_energy("oracle", 2e-3),
                 summary_with_energy("greedy", 3e-3)]
    add_oracle_gaps(summaries)
    assert [s.gap_to_oracle_pct for s in summaries] == pytest.approx([100.0, 0.0, 50.0])
    assert summaries[0].saving_vs_topk_pct == 0.0

    without_oracle = [summary_with_energy("topk", 4e-3)]
    add_oracle_gaps(without_oracle)
    assert without_oracle[0].gap_to_oracle_pct is None


def test_mismatched_episodes_detected():
    def episode(index, topk_energy_j):
        accumulator = EpisodeAccumulator(index, index, layers_per_token=1)
        accumulator.add_step(step_info(1e-3, topk_energy_j), 0.0)
        return accumulator.finish()

    same = {"a": [episode(0, 1e-3), episode(1, 2e-3)], "b": [episode(0, 1e-3), episode(1, 2e-3)]}
    assert find_mismatched_episodes(same) == []
    different = {"a": [episode(0, 1e-3), episode(1, 2e-3)], "b": [episode(0, 1e-3), episode(1, 5e-3)]}
    assert find_mismatched_episodes(different) == [1]


# -- runner -------------------------------------------------------------------


class RecordingHook(MetricHook):
    """Records the true gains and gates of every step, per policy, and reports one extra metric."""

    def __init__(self):
        self.gains: dict[str, list[np.ndarray]] = {}
        self.gates: dict[str, list[np.ndarray]] = {}
        self.episodes_started: list[tuple[str, int]] = []

    def start_episode(self, policy, episode, env):
        self.episodes_started.append((policy, episode))

    def after_step(self, policy, state, action, info):
        self.gains.setdefault(policy, []).append(state.gains.copy())
        self.gates.setdefault(policy, []).append(state.gates.copy())

    def end_episode(self, policy, episode):
        return {"steps_seen": float(len(self.gains[policy]))}


def test_policies_share_random_numbers():
    hook = RecordingHook()
    result = evaluate_policies(["topk", "random"], episodes=2, seed=7, tokens=1, hooks=[hook])
    steps = 2 * ScenarioConfig().architecture.num_layers

    assert hook.episodes_started == [("topk", 0), ("topk", 1), ("random", 0), ("random", 1)]
    assert len(hook.gains["topk"]) == steps
    assert len(hook.gains["random"]) == steps
    np.testing.assert_array_equal(np.array(hook.gains["topk"]), np.array(hook.gains["random"]))
    np.testing.assert_array_equal(np.array(hook.gates["topk"]), np.array(hook.gates["random"]))
    # Steps differ within an episode, so the equality above is not trivial.
    assert not np.array_equal(hook.gains["topk"][0], hook.gains["topk"][1])

    topk, random_subset = result.policies["topk"], result.policies["random"]
    assert [e.seed for e in topk.episodes] == [7, 8]
    assert [e.topk_energy_j for e in topk.episodes] == [e.topk_energy_j for e in random_subset.episodes]
    assert topk.summary.saving_vs_topk_pct == 0.0
    assert topk.summary.extra["steps_seen"].mean == pytest.approx((32 + 64) / 2)


def test_oracle_gap_from_runner():
    result = evaluate_policies(["topk", "oracle"], episodes=1, seed=3, tokens=1)
    topk, oracle = result.policies["topk"].summary, result.policies["oracle"].summary
    assert oracle.gap_to_oracle_pct == 0.0
    expected = gap_percent(topk.energy_per_token_mj.mean, oracle.energy_per_token_mj.mean)
    assert topk.gap_to_oracle_pct == pytest.approx(expected)


def test_sweep_rebuilds_scenario():
    sweep = run_sweep(["topk"], ScenarioConfig(tokens_per_episode=1), "accuracy_budget", [0.0, 0.3],
                      episodes=1, seed=0)
    assert [point.scenario.accuracy_budget for point in sweep.points] == [0.0, 0.3]
    assert [row["value"] for row in sweep.rows()] == [0.0, 0.3]
    with pytest.raises(ValueError, match="valid keys are"):
        run_sweep(["topk"], ScenarioConfig(), "not_a_field", [1.0])


def test_runner_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown policy 'nonsense'.*oracle, oracle-observed, topk"):
        evaluate_policies(["nonsense"], episodes=1, tokens=1)
    missing = tmp_path / "missing" / "model.zip"
    with pytest.raises(FileNotFoundError, match="model file not found: .*missing/model.zip"):
        check_policy_specs([f"ppo:{missing}"])
    with pytest.raises(ValueError, match="more than once"):
        check_policy_specs(["topk", "topk"])
    with pytest.raises(ValueError, match="no policies"):
        check_policy_specs([])
    with pytest.raises(ValueError, match="invalid episodes"):
        evaluate_policies(["topk"], episodes=0, tokens=1)


# -- command line --------------------------------------------------------------


def test_parse_values():
    assert parse_value("2e-3") == pytest.approx(0.002)
    assert parse_value("0.15") == pytest.approx(0.15)
    assert parse_value("4") == 4
    assert parse_value("tdma") == "tdma"
    assert parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_sweep_points(["accuracy_budget=0,0.1", "latency_budget_s=1e-3"]) == {
        "accuracy_budget": [0, 0.1], "latency_budget_s": [0.001]}


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["--policies", "topk", "random", "--episodes", "1", "--tokens", "2", "--out", str(out),
                 "--sweep-points", "accuracy_budget=0,0.3", "latency_budget_s=2e-3,4e-3",
                 "--sweep-policies", "topk", "greedy", "--sweep-episodes", "1", "--sweep-tokens", "1",
                 "--quiet"])
    assert code == 0

    printed = capsys.readouterr().out
    assert "energy/token (mJ)" in printed
    assert "topk" in printed
    assert "random" in printed

    summary_rows = read_csv(out / "summary.csv")
    assert [row["policy"] for row in summary_rows] == ["topk", "random"]
    assert float(summary_rows[0]["saving_vs_topk_pct"]) == 0.0
    assert summary_rows[0]["gap_to_oracle_pct"] == ""
    assert float(summary_rows[0]["energy_per_token_mj"]) > 0.0
    assert len(read_csv(out / "episodes.csv")) == 2

    document = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert document["scenario"]["tokens_per_episode"] == 2
    assert document["episodes"] == 1
    assert list(document["policies"]) == ["topk", "random"]
    assert document["policies"]["topk"]["summary"]["energy_per_token_mj_ci"] is None
    assert document["policies"]["random"]["episodes"][0]["steps"] == 64
    assert set(document["sweeps"]) == {"accuracy_budget", "latency_budget_s"}
    assert len(document["sweeps"]["accuracy_budget"]) == 4

    sweep_rows = read_csv(out / "sweep.csv")
    assert len(sweep_rows) == 8
    for name in ("energy_per_episode.png", "sweep_accuracy_budget.png", "sweep_latency_budget_s.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_cli_no_plots_skips_sweep(tmp_path):
    out = tmp_path / "results"
    assert main(["--policies", "topk", "--episodes", "1", "--tokens", "1", "--out", str(out),
                 "--no-plots", "--quiet"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["episodes.csv", "summary.csv", "summary.json"]


def run_cli_error(capsys, *arguments) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-plots", "--episodes", "1", "--tokens", "1", "--quiet", *arguments])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_unknown_policy(capsys):
    stderr = run_cli_error(capsys, "--policies", "topk", "nonsense")
    assert "unknown policy 'nonsense'" in stderr
    for name in ("oracle", "oracle-observed", "topk", "random", "greedy", "exhaustive"):
        assert name in stderr


def test_cli_missing_model_file(capsys, tmp_path):
    missing = tmp_path / "runs" / "ppo-0" / "model.zip"
    stderr = run_cli_error(capsys, "--policies", str(missing))
    assert f"model file not found: {missing}" in stderr


def test_cli_bad_scenario_key(capsys):
    stderr = run_cli_error(capsys, "--scenario-set", "accuracy_budgt=0.1")
    assert "unknown scenario key(s) 'accuracy_budgt'" in stderr
    assert "valid keys are:" in stderr
    assert "accuracy_budget" in stderr


def test_cli_bad_scenario_value_and_file(capsys, tmp_path):
    stderr = run_cli_error(capsys, "--scenario-set", "accuracy_budget=-1")
    assert "invalid accuracy_budget" in stderr
    stderr = run_cli_error(capsys, "--scenario", str(tmp_path / "absent.yaml"))
    assert "scenario file not found" in stderr
    stderr = run_cli_error(capsys, "--scenario-set", "accuracy_budget")
    assert "expected KEY=VALUE" in stderr


def test_cli_bad_sweep(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--episodes", "1", "--tokens", "1", "--quiet", "--sweep-points", "no_such_field=1,2"])
    assert exit_info.value.code == 2
    assert "unknown scenario key(s) 'no_such_field'" in capsys.readouterr().err


def test_custom_policy_factory():
    calls = []

    def factory(spec, env, seed):
        calls.append((spec, seed))
        return TopKPolicy(env)

    result = evaluate_policies(["my-topk"], episodes=1, seed=5, tokens=1, policy_factory=factory)
    assert calls == [("my-topk", 5)]
    assert result.policies["my-topk"].summary.saving_vs_topk_pct == 0.0
