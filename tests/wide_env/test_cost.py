"""Cost model: degradation bound, energy terms, unreachable nodes and TDMA evaluation."""

import dataclasses
import itertools

import numpy as np
import pytest

from wide_env import radio
from wide_env.channel import pathloss_db
from wide_env.config import ScenarioConfig
from wide_env.cost import CostModel, NodeTables
from wide_env.profile import build_profile

FLOPS_PER_EXPERT = 6.0 * 4096 * 14336  # mixtral-8x7b
PAYLOAD_BITS = 65536.0
NOISE_PSD_W_PER_HZ = 10.0 ** (-19.7)
SOURCE_POWER_W = 10.0 ** (-0.7)
NODE_POWER_W = 1.0
BUDGET_S = 2e-3


def gain_at(distance_m):
    return 10.0 ** (-pathloss_db(distance_m, 3.5, "umi-nlos") / 10.0)


def make_cost_model(**overrides):
    scenario = ScenarioConfig(**overrides)
    return CostModel(scenario, build_profile(scenario))


def mask(*experts, size=8):
    result = np.zeros(size, dtype=bool)
    result[list(experts)] = True
    return result


def gates_with_top(first, second, size=8):
    """Return gates with 0.5 on ``first``, 0.3 on ``second`` and the rest spread evenly."""
    gates = np.full(size, 0.2 / (size - 2))
    gates[first], gates[second] = 0.5, 0.3
    return gates


def fdma_round_trip_energy(gain, count):
    """Return the link and compute energy of one FDMA node whose links share T - c F / phi equally."""
    link_budget = BUDGET_S - count * FLOPS_PER_EXPERT / 20e12
    half = link_budget / 2
    one_way = radio.tx_energy_j(half, PAYLOAD_BITS, gain, 20e6, NOISE_PSD_W_PER_HZ)
    return float(2 * one_way), count * FLOPS_PER_EXPERT * 0.5e-12


# -- degradation --------------------------------------------------------------


@pytest.fixture
def hand_model():
    """Build a default cost model with hand-set layer-0 costs for a Top-K of experts 3 (w=0.625) and 6 (w=0.375)."""
    scenario = ScenarioConfig()
    profile = build_profile(scenario)
    skip = np.full_like(profile.skip_cost, 2.0)
    replace = np.full_like(profile.replace_cost, 5.0)
    skip[0, 3], skip[0, 6] = 1.0, 0.9
    for i, j, cost in [(3, 2, 0.3), (6, 7, 0.4), (3, 7, 0.8), (6, 2, 1.2), (3, 6, 1.5)]:
        replace[0, i, j] = replace[0, j, i] = cost
    for layer in range(replace.shape[0]):
        np.fill_diagonal(replace[layer], 0.0)
    profile = dataclasses.replace(profile, skip_cost=skip, replace_cost=replace)
    return CostModel(scenario, profile)


@pytest.fixture
def hand_state(hand_model):
    return hand_model.make_state(0, 0, gates_with_top(3, 6), np.full(4, gain_at(50.0)))


# Each dropped Top-K expert pays its weight times min(skip, cheapest replacement among computed experts).
HAND_DEGRADATION = [
    ((3, 6), 0.0),
    ((), 0.625 * 1.0 + 0.375 * 0.9),
    ((2,), 0.625 * 0.3 + 0.375 * 0.9),
    ((2, 7), 0.625 * 0.3 + 0.375 * 0.4),
    ((7,), 0.625 * 0.8 + 0.375 * 0.4),
    ((3,), 0.375 * 0.9),
    ((3, 7), 0.375 * 0.4),
    ((0, 1, 4, 5), 0.625 * 1.0 + 0.375 * 0.9),
]


def test_hand_state_top_k(hand_state):
    assert hand_state.top_k.tolist() == [3, 6]
    np.testing.assert_allclose(hand_state.weights, [0.625, 0.375])


@pytest.mark.parametrize("computed, expected", HAND_DEGRADATION)
def test_degradation_hand_case(hand_model, hand_state, computed, expected):
    assert float(hand_model.degradation(hand_state, mask(*computed))) == pytest.approx(expected, abs=1e-12)


def test_degradation_batched(hand_model, hand_state):
    decisions = np.stack([mask(*computed) for computed, _ in HAND_DEGRADATION])

    result = hand_model.degradation(hand_state, decisions)

    assert result.shape == (len(HAND_DEGRADATION),)
    np.testing.assert_allclose(result, [expected for _, expected in HAND_DEGRADATION], atol=1e-12)


def test_degradation_without_renormalisation():
    cost_model = make_cost_model(moe_preset="olmoe-1b-7b")
    rng = np.random.default_rng(0)
    gates = rng.dirichlet(np.ones(64))
    state = cost_model.make_state(2, 0, gates, np.full(4, gain_at(50.0)))

    delta = float(cost_model.degradation(state, np.zeros(64, dtype=bool)))

    skip = cost_model.profile.skip_cost[2, state.top_k]
    np.testing.assert_allclose(state.weights, gates[state.top_k])
    assert delta == pytest.approx(float(skip @ gates[state.top_k]))


def test_degradation_monotone_in_experts():
    cost_model = make_cost_model()
    rng = np.random.default_rng(1)
    gains = np.full(4, gain_at(50.0))
    for layer in range(0, 32, 5):
        state = cost_model.make_state(layer, 0, rng.dirichlet(np.ones(8)), gains)
        subsets = np.array(list(itertools.product([False, True], repeat=8)))
        delta = cost_model.degradation(state, subsets)
        for index, subset in enumerate(subsets):
            for expert in np.flatnonzero(~subset):
                bigger = subset.copy()
                bigger[expert] = True
                bigger_index = int(np.dot(bigger, 2 ** np.arange(7, -1, -1)))
                assert delta[bigger_index] <= delta[index] + 1e-12


def test_top_k_has_zero_degradation():
    cost_model = make_cost_model()
    rng = np.random.default_rng(2)
    for layer in range(32):
        gains = gain_at(rng.uniform(20.0, 100.0, 4))
        state = cost_model.make_state(layer, 0, rng.dirichlet(np.ones(8)), gains)

        cost = cost_model.evaluate(state, cost_model.top_k_mask(state))

        assert cost.degradation == 0.0
        assert cost.accuracy_ok
        assert cost.experts_computed == 2


# -- energy -------------------------------------------------------------------


def test_fdma_evaluate_matches_hand_energy():
    cost_model = make_cost_model()
    gains = gain_at(np.array([50.0, 80.0, 120.0, 60.0]))
    state = cost_model.make_state(0, 0, gates_with_top(0, 4), gains)

    cost = cost_model.evaluate(state, mask(0, 1, 4))

    link_1, compute_1 = fdma_round_trip_energy(gains[0], 2)
    link_3, compute_3 = fdma_round_trip_energy(gains[2], 1)
    assert cost.uplink_energy_j == pytest.approx((link_1 + link_3) / 2, rel=1e-9)
    assert cost.downlink_energy_j == pytest.approx((link_1 + link_3) / 2, rel=1e-9)
    assert cost.compute_energy_j == pytest.approx(compute_1 + compute_3, rel=1e-12)
    assert cost.energy_j == pytest.approx(link_1 + link_3 + compute_1 + compute_3, rel=1e-9)
    assert cost.failure_energy_j == 0.0
    assert cost.latency_ok
    assert cost.nodes_contacted == 2
    assert cost.experts_computed == 3
    assert cost.failed_nodes == ()


def test_energy_breakdown_sums():
    cost_model = make_cost_model()
    rng = np.random.default_rng(3)
    for _ in range(200):
        gains = gain_at(rng.uniform(20.0, 160.0, 4)) * rng.exponential(1.0, 4)
        state = cost_model.make_state(int(rng.integers(32)), 0, rng.dirichlet(np.ones(8)), gains)
        computed = rng.random(8) < 0.4

        cost = cost_model.evaluate(state, computed)

        parts = cost.uplink_energy_j + cost.downlink_energy_j + cost.compute_energy_j + cost.failure_energy_j
        assert cost.energy_j == pytest.approx(parts, rel=1e-12)
        assert cost.failure_energy_j == pytest.approx(len(cost.failed_nodes) * SOURCE_POWER_W * BUDGET_S)
        assert np.isfinite(cost.energy_j)


def test_empty_decision_costs_nothing():
    cost_model = make_cost_model()
    state = cost_model.make_state(0, 0, gates_with_top(0, 4), np.full(4, gain_at(50.0)))

    cost = cost_model.evaluate(state, np.zeros(8, dtype=bool))

    assert cost.energy_j == 0.0
    assert cost.nodes_contacted == 0
    assert cost.latency_ok
    assert not cost.accuracy_ok


def test_local_expert_costs_compute_only():
    cost_model = make_cost_model(local_experts=(0,))
    state = cost_model.make_state(0, 0, gates_with_top(0, 1), np.full(4, gain_at(50.0)))

    cost = cost_model.evaluate(state, mask(0))

    assert cost.uplink_energy_j == 0.0
    assert cost.downlink_energy_j == 0.0
    assert cost.compute_energy_j == pytest.approx(FLOPS_PER_EXPERT * 1.0e-12)
    assert cost.nodes_contacted == 0
    assert cost.latency_ok


def test_node_tables_shape_and_rows():
    cost_model = make_cost_model()
    gains = gain_at(np.array([50.0, 100.0, 150.0, 60.0]))

    tables = cost_model.node_tables(gains)

    assert tables.energy_j.shape == (5, 3)
    assert np.all(tables.reachable[:, 0])
    assert np.all(tables.energy_j[:, 0] == 0.0)
    # The source hosts no expert by default, so it cannot compute one.
    assert not tables.reachable[0, 1]
    assert not tables.reachable[3, 1]
    assert np.isinf(tables.energy_j[3, 1])
    link, compute = fdma_round_trip_energy(gains[1], 2)
    assert tables.energy_j[2, 2] == pytest.approx(link + compute, rel=1e-9)


# -- unreachable nodes --------------------------------------------------------


def test_unreachable_node_charged_and_not_computed():
    cost_model = make_cost_model()
    gains = np.array([gain_at(50.0), gain_at(50.0), gain_at(50.0), 1e-16])
    state = cost_model.make_state(0, 0, gates_with_top(6, 0), gains)
    top_k = mask(0, 6)
    reachable_part = mask(0)

    cost = cost_model.evaluate(state, top_k)
    without_failed = cost_model.evaluate(state, reachable_part)

    assert cost.failed_nodes == (4,)
    assert not cost.latency_ok
    assert cost.failure_energy_j == pytest.approx(SOURCE_POWER_W * BUDGET_S)
    assert cost.energy_j == pytest.approx(without_failed.energy_j + SOURCE_POWER_W * BUDGET_S, rel=1e-12)
    assert cost.uplink_energy_j == without_failed.uplink_energy_j
    assert cost.compute_energy_j == without_failed.compute_energy_j
    np.testing.assert_array_equal(cost.computed, reachable_part)
    assert cost.experts_computed == 1
    assert cost.nodes_contacted == 2
    assert cost.degradation == pytest.approx(float(cost_model.degradation(state, reachable_part)))
    assert cost.degradation > 0.0


def test_failed_expert_replaced_by_arrived(hand_model):
    # Expert 6 sits on an unreachable node 4; expert 7 on the same node fails too,
    # so the best stand-in for 6 that arrives is expert 2 (r = 1.2), capped by the skip cost 0.9.
    gains = np.array([gain_at(50.0), gain_at(50.0), gain_at(50.0), 1e-16])
    state = hand_model.make_state(0, 0, gates_with_top(3, 6), gains)

    cost = hand_model.evaluate(state, mask(2, 3, 6, 7))

    assert cost.failed_nodes == (4,)
    assert cost.degradation == pytest.approx(0.375 * 0.9)


def test_each_failed_node_charged_once():
    cost_model = make_cost_model()
    gains = np.array([gain_at(50.0), 1e-16, gain_at(50.0), 1e-16])
    state = cost_model.make_state(0, 0, gates_with_top(2, 6), gains)

    cost = cost_model.evaluate(state, mask(0, 2, 3, 6, 7))

    assert cost.failed_nodes == (2, 4)
    assert cost.failure_energy_j == pytest.approx(2 * SOURCE_POWER_W * BUDGET_S)
    assert cost.experts_computed == 1


@pytest.mark.parametrize("access", ["fdma", "tdma"])
def test_local_expert_too_slow_counts_as_failed(access):
    # 5e10 FLOP/s needs 7 ms for one mixtral expert, over the 2 ms budget,
    # so the source is charged like an unreachable edge node.
    cost_model = make_cost_model(local_experts=(0,), source_flops_per_s=5e10, access=access)
    state = cost_model.make_state(0, 0, gates_with_top(0, 2), np.full(4, gain_at(50.0)))

    cost = cost_model.evaluate(state, mask(0, 2))

    assert not cost.latency_ok
    assert cost.failed_nodes == (0,)
    np.testing.assert_array_equal(cost.computed, mask(2))
    assert cost.experts_computed == 1
    assert cost.degradation > 0.0
    assert cost.compute_energy_j == pytest.approx(FLOPS_PER_EXPERT * 0.5e-12)
    assert cost.failure_energy_j == pytest.approx(SOURCE_POWER_W * BUDGET_S)


# -- TDMA ---------------------------------------------------------------------


def tdma_reference(gains, counts):
    """Return the up- and downlink energy of the TDMA allocation for nodes with the given expert counts."""
    nodes = [n for n, c in enumerate(counts) if c > 0]
    node_gains = np.asarray(gains)[nodes]
    link_gains = np.concatenate([node_gains, node_gains])
    tau_min = np.concatenate([
        radio.min_tx_time_s(PAYLOAD_BITS, node_gains, 80e6, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W),
        radio.min_tx_time_s(PAYLOAD_BITS, node_gains, 80e6, NOISE_PSD_W_PER_HZ, NODE_POWER_W),
    ])
    budget = BUDGET_S - max(counts) * FLOPS_PER_EXPERT / 20e12
    bits = np.full(tau_min.shape, PAYLOAD_BITS)
    tau, _, feasible = radio.tdma_allocation(bits, link_gains, 80e6, NOISE_PSD_W_PER_HZ, tau_min, budget)
    energy = radio.tx_energy_j(tau, bits, link_gains, 80e6, NOISE_PSD_W_PER_HZ)
    return float(energy[: len(nodes)].sum()), float(energy[len(nodes):].sum()), feasible


def test_tdma_evaluate_matches_allocation():
    cost_model = make_cost_model(access="tdma")
    gains = gain_at(np.array([50.0, 120.0, 90.0, 140.0]))
    state = cost_model.make_state(0, 0, gates_with_top(0, 4), gains)

    cost = cost_model.evaluate(state, mask(0, 1, 4, 6))

    uplink, downlink, feasible = tdma_reference(gains, [2, 0, 1, 1])
    assert feasible
    assert cost.latency_ok
    assert cost.uplink_energy_j == pytest.approx(uplink, rel=1e-9)
    assert cost.downlink_energy_j == pytest.approx(downlink, rel=1e-9)
    assert cost.compute_energy_j == pytest.approx(4 * FLOPS_PER_EXPERT * 0.5e-12)


def test_tdma_costs_more_than_single_user():
    cost_model = make_cost_model(access="tdma")
    gains = gain_at(np.array([50.0, 120.0, 90.0, 140.0]))
    state = cost_model.make_state(0, 0, gates_with_top(0, 4), gains)

    cost = cost_model.evaluate(state, mask(0, 2, 4, 6))

    alone = sum(state.tables.energy_j[n, 1] for n in range(1, 5))
    assert cost.energy_j > alone


def test_tdma_drops_slowest_node():
    # Each link fits alone, but four round trips of about 0.54 ms exceed 2 ms and three fit.
    cost_model = make_cost_model(access="tdma")
    gains = np.array([3.2e-11, 3.0e-11, 3.2e-11, 3.2e-11])
    state = cost_model.make_state(0, 0, gates_with_top(0, 2), gains)

    cost = cost_model.evaluate(state, mask(0, 2, 4, 6))

    assert np.all(state.tables.reachable[1:, 1])
    assert cost.failed_nodes == (2,)
    assert not cost.latency_ok
    assert cost.experts_computed == 3
    uplink, downlink, feasible = tdma_reference(gains, [1, 0, 1, 1])
    assert feasible
    assert cost.uplink_energy_j == pytest.approx(uplink, rel=1e-9)
    assert cost.downlink_energy_j == pytest.approx(downlink, rel=1e-9)
    assert cost.failure_energy_j == pytest.approx(SOURCE_POWER_W * BUDGET_S)


def test_tdma_energy_needs_state():
    cost_model = make_cost_model(access="tdma")
    state = cost_model.make_state(0, 0, gates_with_top(0, 2), np.full(4, gain_at(50.0)))

    with pytest.raises(TypeError, match="TDMA energy needs the StepState"):
        cost_model.energy_of_counts(state.tables, np.array([0, 1, 0, 0, 0]))


# -- reference energy ---------------------------------------------------------


def test_reference_energy_all_local_is_compute_only():
    cost_model = make_cost_model(placement=(0,) * 8)

    assert cost_model.reference_energy_j == pytest.approx(2 * FLOPS_PER_EXPERT * 1.0e-12, rel=1e-12)


def test_reference_energy_overflow_counted_at_source():
    # Only expert 0 sits on an edge node, so the second Top-K expert of the reference runs at the source.
    cost_model = make_cost_model(placement=(1, 0, 0, 0, 0, 0, 0, 0))
    link, compute = fdma_round_trip_energy(gain_at(90.0), 1)

    assert cost_model.reference_energy_j == pytest.approx(link + compute + FLOPS_PER_EXPERT * 1.0e-12, rel=1e-9)


def test_reference_energy_matches_hand_value():
    # Top-K (K = 2) on two edge nodes at the mean distance of 90 m, one expert each.
    link, compute = fdma_round_trip_energy(gain_at(90.0), 1)

    assert make_cost_model().reference_energy_j == pytest.approx(2 * (link + compute), rel=1e-9)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"access": "tdma"}, {"moe_preset": "olmoe-1b-7b"}, {"moe_preset": "deepseek-v3", "num_nodes": 16, "gate_source": "synthetic"},
     {"distance_min_m": 300.0, "distance_max_m": 400.0}],
)
def test_reference_energy_positive(overrides):
    reference = make_cost_model(**overrides).reference_energy_j

    assert np.isfinite(reference)
    assert reference > 0.0


def test_states_compare_by_value():
    cost_model = make_cost_model()
    gains = np.full(4, gain_at(50.0))

    first = cost_model.make_state(0, 0, gates_with_top(0, 2), gains)
    second = cost_model.make_state(0, 0, gates_with_top(0, 2), gains.copy())
    third = cost_model.make_state(0, 0, gates_with_top(0, 3), gains)

    assert first == second
    assert first != third
    assert isinstance(first.tables, NodeTables)
