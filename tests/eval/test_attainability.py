"""The avoidable-violation hook against the oracle's own statuses."""

from __future__ import annotations

import pytest

from eval.attainability import AttainabilityHook
from eval.runner import evaluate_policies


@pytest.fixture(scope="module")
def result():
    return evaluate_policies(["oracle", "topk", "random"], None, episodes=2, seed=3, tokens=2,
                             hooks=[AttainabilityHook()])


def test_oracle_has_no_avoidable_violations(result):
    summary = result.policies["oracle"].summary
    assert summary.extra["avoidable_accuracy_violation_rate"].mean == 0.0


def test_attainable_rate_complements_oracle_violations(result):
    oracle = result.policies["oracle"].summary
    assert oracle.extra["attainable_rate"].mean == pytest.approx(1.0 - oracle.accuracy_violation_rate)


def test_avoidable_rate_bounded_by_raw_rate(result):
    for name in ("topk", "random"):
        summary = result.policies[name].summary
        assert summary.extra["avoidable_accuracy_violation_rate"].mean <= summary.accuracy_violation_rate
    # A random subset of Top-K breaks an attainable budget on some steps.
    assert result.policies["random"].summary.extra["avoidable_accuracy_violation_rate"].mean > 0.0


def test_attainable_rate_same_for_every_policy(result):
    rates = {name: r.summary.extra["attainable_rate"].mean for name, r in result.policies.items()}
    assert len(set(rates.values())) == 1
