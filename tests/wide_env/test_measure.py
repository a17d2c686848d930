"""Tests of the measured cost tables, the decision rule and the bound report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wide_env.config import ScenarioConfig
from wide_env.cost import CostModel
from wide_env.measure import (
    DEFAULT_DECIDERS,
    bound_report,
    decision_weights,
    estimate_cost_tables,
    estimate_layer_costs,
    random_any_decider,
    relative_deviation,
    routing_of,
    top_k_dense,
)
from wide_env.moe_lm import MoELanguageModel, MoELMConfig
from wide_env.profile import build_profile
from wide_env.trace import MoELMAccess, record_run

TINY = MoELMConfig(context_length=16, hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2,
                   expert_ffn_size=16)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, above all on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



def random_routing(rng, tokens=50, experts=8, top_k=2, renormalize=True):
    return routing_of(rng.standard_normal((tokens, experts)), top_k, renormalize)


@pytest.fixture(scope="module")
def tiny_access():
    torch.manual_seed(0)
    return MoELMAccess(MoELanguageModel(TINY).eval(), {"name": "tiny"})


@pytest.fixture(scope="module")
def tiny_runs(tiny_access):
    rng = np.random.default_rng(0)
    calibration = record_run(tiny_access, rng.integers(0, 256, 160), keep_inputs=True)
    heldout = record_run(tiny_access, rng.integers(0, 256, 48), keep_inputs=True)
    return calibration, heldout


# -- decision rule ----------------------------------------------------------------


def test_decision_weights_keep_replace_and_skip():
    skip = np.array([1.0, 1.0, 1.0, 0.2])
    replace = np.array([[0.0, 0.3, 2.0, 2.0],
                        [0.3, 0.0, 2.0, 2.0],
                        [2.0, 2.0, 0.0, 0.5],
                        [2.0, 2.0, 0.5, 0.0]])
    top_indices = np.array([[0, 3]])
    top_weights = np.array([[0.7, 0.3]])
    # Expert 0 is dropped and replaced by 1 (0.3 < 1.0); expert 3 is dropped and skipped (0.2 < 2.0).
    weights, bound = decision_weights(skip, replace, top_indices, top_weights, np.array([[False, True, False, False]]))
    assert np.allclose(weights, [[0.0, 0.7, 0.0, 0.0]])
    assert bound[0] == pytest.approx(0.7 * 0.3 + 0.3 * 0.2)


def test_decision_weights_of_top_k_are_top_k():
    rng = np.random.default_rng(0)
    _, indices, weights = random_routing(rng)
    computed = top_k_dense(indices, weights, 8) > 0
    dense, bound = decision_weights(np.ones(8), np.ones((8, 8)) - np.eye(8), indices, weights, computed)
    assert np.array_equal(dense, top_k_dense(indices, weights, 8))
    assert np.all(bound == 0.0)


def test_decision_bound_equals_cost_model_degradation():
    scenario = ScenarioConfig()
    profile = build_profile(scenario)
    cost_model = CostModel(scenario, profile)
    rng = np.random.default_rng(1)
    for layer in (0, 7, 31):
        gates, indices, weights = random_routing(rng, tokens=20)
        computed = rng.integers(0, 2, size=(20, 8)).astype(bool)
        _, bound = decision_weights(profile.skip_cost[layer], profile.replace_cost[layer], indices, weights, computed)
        for token in range(20):
            state = cost_model.make_state(layer, token, gates[token], np.ones(scenario.num_nodes))
            assert bound[token] == pytest.approx(float(cost_model.degradation(state, computed[token])))


def test_relative_deviation_of_skipping_everything_is_one():
    rng = np.random.default_rng(2)
    outputs = rng.standard_normal((10, 8, 5))
    _, indices, weights = random_routing(rng, tokens=10)
    reference = top_k_dense(indices, weights, 8)
    assert np.allclose(relative_deviation(outputs, np.zeros_like(reference), reference), 1.0)
    assert np.allclose(relative_deviation(outputs, reference, reference), 0.0)


# -- cost estimation --------------------------------------------------------------


def test_layer_costs_are_valid_tables():
    rng = np.random.default_rng(3)
    outputs = rng.standard_normal((400, 8, 6))
    _, indices, weights = random_routing(rng, tokens=400)
    skip, replace, scale, counts = estimate_layer_costs(outputs, indices, weights, 0.95)
    assert skip.shape == (8,)
    assert replace.shape == (8, 8)
    assert np.allclose(replace, replace.T)
    assert np.all(np.diag(replace) == 0.0)
    assert np.all(replace <= skip[:, None] + skip[None, :] + 1e-12)
    assert scale > 0
    assert counts.sum() == 400 * 2


def test_identical_experts_cost_nothing_to_replace():
    rng = np.random.default_rng(4)
    outputs = rng.standard_normal((300, 8, 6))
    outputs[:, 1] = outputs[:, 0]
    _, indices, weights = random_routing(rng, tokens=300)
    _, replace, _, _ = estimate_layer_costs(outputs, indices, weights, 0.99)
    assert replace[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert replace[0, 2] > 0.1


def test_skip_cost_is_quantile_of_norm_ratio():
    rng = np.random.default_rng(5)
    outputs = rng.standard_normal((500, 8, 6))
    _, indices, weights = random_routing(rng, tokens=500)
    skip, _, _, _ = estimate_layer_costs(outputs, indices, weights, 0.9)
    rows = np.arange(500)[:, None]
    top_norm = np.linalg.norm(np.einsum("nk,nkd->nd", weights, outputs[rows, indices]), axis=-1)
    routed = (indices == 3).any(axis=1)
    expected = np.quantile(np.linalg.norm(outputs[routed, 3], axis=-1) / top_norm[routed], 0.9)
    assert skip[3] == pytest.approx(expected)


def test_estimated_bound_holds_on_calibration_tokens(tiny_access, tiny_runs):
    calibration, _ = tiny_runs
    tables = estimate_cost_tables(tiny_access, calibration, quantile=1.0)
    rng = np.random.default_rng(6)
    layer = 1
    _, indices, weights = routing_of(calibration.router_logits[:, layer], 2, True)
    with torch.no_grad():
        outputs = tiny_access.expert_outputs(layer, torch.from_numpy(calibration.inputs[:, layer])).double().numpy()
    computed = rng.integers(0, 2, size=(len(indices), 8)).astype(bool)
    dense, bound = decision_weights(tables.skip_cost[layer], tables.replace_cost[layer], indices, weights, computed)
    deviation = relative_deviation(outputs, dense, top_k_dense(indices, weights, 8))
    # With the maximum as quantile every table entry covers its calibration tokens, so the bound always holds.
    assert np.all(deviation <= bound + 1e-9)


def test_estimate_rejects_run_without_inputs(tiny_access):
    run = record_run(tiny_access, np.arange(20))
    with pytest.raises(ValueError, match="keep_inputs=True"):
        estimate_cost_tables(tiny_access, run)


def test_estimate_rejects_invalid_quantile(tiny_access, tiny_runs):
    with pytest.raises(ValueError, match="invalid quantile"):
        estimate_cost_tables(tiny_access, tiny_runs[0], quantile=1.5)


# -- bound report -----------------------------------------------------------------


def top_k_decider(cost_model, state, rng):
    mask = np.zeros(cost_model.num_experts, dtype=bool)
    mask[state.top_k] = True
    return mask


def test_bound_report_rates(tiny_access, tiny_runs):
    calibration, heldout = tiny_runs
    tables = estimate_cost_tables(tiny_access, calibration, quantile=0.95)
    # Near nodes with strong line of sight are always reachable, so Top-K never loses an expert.
    scenario = ScenarioConfig(distance_max_m=30.0, fading="rician", rician_k_db=30.0, tokens_per_episode=8)
    deciders = {"topk": top_k_decider, "random-any": random_any_decider, "oracle": DEFAULT_DECIDERS["oracle"]}
    report = bound_report(tiny_access, heldout, tables, scenario, deciders)
    stats = {s.name: s for s in report.stats}
    assert report.tokens == 48
    assert report.layers == 2
    assert stats["topk"].held_rate == 1.0
    assert stats["topk"].dropping_pairs == 0
    assert stats["topk"].mean_deviation == 0.0
    assert stats["random-any"].dropping_pairs > 0
    assert stats["random-any"].mean_deviation > 0
    assert 0.0 <= stats["oracle"].held_rate <= 1.0
    assert stats["oracle"].accuracy_violations == 0
    assert "oracle" in report.format_table()


def test_bound_report_is_reproducible(tiny_access, tiny_runs):
    calibration, heldout = tiny_runs
    tables = estimate_cost_tables(tiny_access, calibration)
    deciders = {"random-any": random_any_decider}
    first = bound_report(tiny_access, heldout, tables, ScenarioConfig(), deciders, seed=3).rows()
    second = bound_report(tiny_access, heldout, tables, ScenarioConfig(), deciders, seed=3).rows()
    assert first == second


def test_bound_report_rejects_mismatched_scenario(tiny_access, tiny_runs):
    calibration, heldout = tiny_runs
    tables = estimate_cost_tables(tiny_access, calibration)
    with pytest.raises(ValueError, match="does not fit moe_preset 'olmoe-1b-7b': it has 8 experts per layer"):
        bound_report(tiny_access, heldout, tables, ScenarioConfig(moe_preset="olmoe-1b-7b"))
