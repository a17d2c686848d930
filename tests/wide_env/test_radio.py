"""Radio model: Shannon-rate energy, power caps, the FDMA split and the TDMA allocation."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar

from wide_env import radio
from wide_env.channel import pathloss_db
from wide_env.config import ScenarioConfig
from wide_env.cost import CostModel
from wide_env.profile import build_profile

# Default scenario: -174 dBm/Hz plus a 7 dB noise figure is -197 dBW/Hz.
NOISE_PSD_W_PER_HZ = 10.0 ** (-19.7)
NODE_BANDWIDTH_HZ = 20e6
PAYLOAD_BITS = 4096 * 16
SOURCE_POWER_W = 10.0 ** (-0.7)  # 23 dBm
NODE_POWER_W = 1.0  # 30 dBm


def gain_at(distance_m):
    """Return the linear gain of the default UMi NLOS link at 3.5 GHz with unit fading power."""
    return 10.0 ** (-pathloss_db(distance_m, 3.5, "umi-nlos") / 10.0)


# -- single link --------------------------------------------------------------


def test_tx_energy_matches_hand_value():
    # D/(B tau) = 65536 / (20e6 * 0.5e-3) = 6.5536, 2^6.5536 - 1 = 92.9356,
    # N0 B / G = 1.99526e-20 * 20e6 / 1e-10 = 3.99052e-3 W, so E = 0.5e-3 * 3.99052e-3 * 92.9356 J.
    energy = radio.tx_energy_j(0.5e-3, PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)

    assert float(energy) == pytest.approx(1.854309e-4, rel=1e-6)


def test_tx_energy_power_achieves_shannon_rate():
    tau = np.array([0.2e-3, 0.5e-3, 1.0e-3])
    gain = np.array([1e-9, 1e-10, 1e-11])

    energy = radio.tx_energy_j(tau, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
    power = energy / tau
    snr = power * gain / (NOISE_PSD_W_PER_HZ * NODE_BANDWIDTH_HZ)
    bits_sent = NODE_BANDWIDTH_HZ * np.log2(1.0 + snr) * tau

    np.testing.assert_allclose(bits_sent, PAYLOAD_BITS, rtol=1e-10)


def test_tx_energy_convex_and_decreasing():
    tau = np.linspace(0.1e-3, 2e-3, 200)

    energy = radio.tx_energy_j(tau, PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)

    assert np.all(np.diff(energy) < 0)
    assert np.all(np.diff(energy, 2) > 0)


def test_tx_energy_infinite_for_nonpositive_time():
    energy = radio.tx_energy_j(np.array([0.0, -1e-3]), PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)

    assert np.all(np.isinf(energy))


def test_tx_energy_derivative_matches_finite_difference():
    tau = np.array([0.3e-3, 0.6e-3, 1.2e-3])
    step = 1e-9

    derivative = radio.tx_energy_derivative(tau, PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
    upper = radio.tx_energy_j(tau + step, PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
    lower = radio.tx_energy_j(tau - step, PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)

    np.testing.assert_allclose(derivative, (upper - lower) / (2 * step), rtol=1e-6)
    assert np.all(derivative < 0)


def test_min_tx_time_matches_hand_value():
    # SNR = 0.2 W * 1e-10 / (1.99526e-20 W/Hz * 20e6 Hz) = 50.119, log2(51.119) = 5.67574,
    # tau_min = 65536 / (20e6 * 5.67574) s.
    tau_min = radio.min_tx_time_s(PAYLOAD_BITS, 1e-10, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, 0.2)

    assert float(tau_min) == pytest.approx(5.773304e-4, rel=1e-6)


def test_min_tx_time_runs_at_power_cap():
    gain = np.array([1e-9, 1e-10, 1e-11])

    tau_min = radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W)
    power = radio.tx_energy_j(tau_min, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ) / tau_min

    np.testing.assert_allclose(power, SOURCE_POWER_W, rtol=1e-9)


@pytest.mark.parametrize(
    "distance_m, uplink_snr_db, uplink_s, downlink_s",
    [(50.0, 23.0, 0.43e-3, 0.33e-3), (100.0, 12.4, 0.78e-3, 0.51e-3)],
)
def test_default_scenario_link_budget(distance_m, uplink_snr_db, uplink_s, downlink_s):
    # Link budget of the default scenario at the mean channel and full power:
    # 50 m gives about 23 dB and 0.43 ms up, 100 m about 12 dB and 0.78 ms up.
    gain = gain_at(distance_m)
    noise_w = NOISE_PSD_W_PER_HZ * NODE_BANDWIDTH_HZ

    snr_db = 10.0 * math.log10(SOURCE_POWER_W * gain / noise_w)
    tau_up = radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W)
    tau_down = radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, NODE_POWER_W)

    assert snr_db == pytest.approx(uplink_snr_db, abs=0.1)
    assert float(tau_up) == pytest.approx(uplink_s, abs=0.01e-3)
    assert float(tau_down) == pytest.approx(downlink_s, abs=0.01e-3)


def test_default_scenario_reach_by_distance():
    # With one expert, nodes at 50 m and 100 m fit in 2 ms; at 150 m the uplink alone takes about 1.4 ms.
    scenario = ScenarioConfig()
    cost_model = CostModel(scenario, build_profile(scenario))
    gains = gain_at(np.array([50.0, 100.0, 150.0, 100.0]))
    gains[3] *= 10.0 ** (-5.0 / 10.0)

    tables = cost_model.node_tables(gains)
    tau_up_150 = radio.min_tx_time_s(PAYLOAD_BITS, gains[2], NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W)

    assert tables.reachable[1, 1]
    assert tables.reachable[2, 1]
    assert not tables.reachable[3, 1]
    assert float(tau_up_150) == pytest.approx(1.4e-3, abs=0.03e-3)
    # A 5 dB fade at 100 m brings the round trip near the budget, but still inside it.
    fade_up = radio.min_tx_time_s(PAYLOAD_BITS, gains[3], NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W)
    fade_down = radio.min_tx_time_s(PAYLOAD_BITS, gains[3], NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, NODE_POWER_W)
    assert float(fade_up + fade_down) == pytest.approx(1.9e-3, abs=0.05e-3)
    assert tables.reachable[4, 1]


# -- FDMA round trip ----------------------------------------------------------


def best_split_by_search(budget_s, gain):
    """Minimise E_up + E_down over the uplink time by bounded scalar search.

    Returns the best uplink time, its energy and the two links' ``tau_min``.
    """
    m_up = float(radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W))
    m_down = float(radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, NODE_POWER_W))

    def round_trip_energy(tau_up):
        tau_down = budget_s - tau_up
        return float(radio.tx_energy_j(tau_up, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
                     + radio.tx_energy_j(tau_down, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ))

    result = minimize_scalar(round_trip_energy, bounds=(m_up, budget_s - m_down), method="bounded",
                             options={"xatol": 1e-14})
    return result.x, result.fun, m_up, m_down


def split_energy(budget_s, gain):
    m_up = radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, SOURCE_POWER_W)
    m_down = radio.min_tx_time_s(PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, NODE_POWER_W)
    tau_up, tau_down, reachable = radio.split_round_trip(budget_s, m_up, m_down)
    energy = (radio.tx_energy_j(tau_up, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
              + radio.tx_energy_j(tau_down, PAYLOAD_BITS, gain, NODE_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ))
    return float(tau_up), float(tau_down), bool(reachable), float(energy)


def test_fdma_split_without_binding_cap():
    budget = 2e-3
    gain = gain_at(100.0)

    tau_up, tau_down, reachable, energy = split_energy(budget, gain)
    best_tau_up, best_energy, m_up, _ = best_split_by_search(budget, gain)

    assert m_up < budget / 2
    assert reachable
    assert tau_up == pytest.approx(budget / 2, rel=1e-12)
    assert tau_down == pytest.approx(budget / 2, rel=1e-12)
    assert energy == pytest.approx(best_energy, rel=1e-8)
    assert best_tau_up == pytest.approx(tau_up, rel=1e-4)


def test_fdma_split_with_binding_uplink_cap():
    budget = 2e-3
    gain = gain_at(140.0)

    tau_up, tau_down, reachable, energy = split_energy(budget, gain)
    best_tau_up, best_energy, m_up, m_down = best_split_by_search(budget, gain)

    assert budget / 2 < m_up < budget - m_down
    assert reachable
    assert tau_up == pytest.approx(m_up, rel=1e-12)
    assert tau_down == pytest.approx(budget - m_up, rel=1e-12)
    assert energy == pytest.approx(best_energy, rel=1e-6)
    assert best_tau_up == pytest.approx(m_up, rel=1e-6)


def test_fdma_split_with_binding_downlink_cap():
    tau_up, tau_down, reachable = radio.split_round_trip(2e-3, 0.3e-3, 1.2e-3)

    assert reachable
    assert float(tau_up) == pytest.approx(0.8e-3)
    assert float(tau_down) == pytest.approx(1.2e-3)


def test_fdma_split_unreachable():
    _, _, reachable = radio.split_round_trip(np.array([2e-3, 2e-3, 0.0]), np.array([1.5e-3, 1.0e-3, 0.0]),
                                             np.array([0.6e-3, 1.0e-3, 0.0]))

    assert reachable.tolist() == [False, True, False]


# -- TDMA allocation ----------------------------------------------------------

TDMA_BANDWIDTH_HZ = 80e6
TDMA_GAINS = 10.0 ** (-np.array([90.0, 98.0, 104.0, 95.0, 100.0, 101.0]) / 10.0)
# The first link has a low power cap, so its tau_min binds when the budget is tight.
TDMA_POWER_CAPS_W = np.array([0.002, 0.2, 0.2, 1.0, 1.0, 1.0])
TDMA_BITS = np.full(6, float(PAYLOAD_BITS))


def tdma_tau_min():
    return radio.min_tx_time_s(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, TDMA_POWER_CAPS_W)


def tdma_energy(tau):
    return radio.tx_energy_j(tau, TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)


def slsqp_allocation(budget_s, tau_min):
    """Solve min sum E_k(tau_k) s.t. sum tau_k = budget, tau_k >= tau_min_k with SLSQP in scaled units."""
    count = len(tau_min)
    energy_scale = float(tdma_energy(np.full(count, budget_s / count)).sum())
    start = tau_min / budget_s + (1.0 - tau_min.sum() / budget_s) / count
    result = minimize(
        lambda share: float(tdma_energy(share * budget_s).sum()) / energy_scale,
        start,
        method="SLSQP",
        bounds=[(m / budget_s, 1.0) for m in tau_min],
        constraints=[{"type": "eq", "fun": lambda share: share.sum() - 1.0}],
        options={"ftol": 1e-15, "maxiter": 500},
    )
    assert result.success, result.message
    return result.x * budget_s, result.fun * energy_scale


@pytest.mark.parametrize("budget_factor", [1.2, 1.5, 4.0])
def test_tdma_allocation_satisfies_kkt(budget_factor):
    tau_min = tdma_tau_min()
    budget = budget_factor * tau_min.sum()

    tau, lam, feasible = radio.tdma_allocation(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                               tau_min, budget)
    derivative = radio.tx_energy_derivative(tau, TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ)
    at_min = np.isclose(tau, tau_min, rtol=1e-9)

    assert feasible
    assert lam > 0
    assert tau.sum() == pytest.approx(budget, rel=1e-12)
    assert np.all(tau >= tau_min * (1 - 1e-12))
    np.testing.assert_allclose(derivative[~at_min], -lam, rtol=1e-6)
    # A link held at its tau_min would want less time at this multiplier: -E'(tau_min) <= lambda.
    assert np.all(-derivative[at_min] <= lam * (1 + 1e-9))


def test_tdma_allocation_tight_budget_binds_cap():
    tau_min = tdma_tau_min()

    tau, _, feasible = radio.tdma_allocation(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                             tau_min, 1.2 * tau_min.sum())

    assert feasible
    assert tau[0] == pytest.approx(tau_min[0], rel=1e-9)
    assert np.all(tau[3:] > tau_min[3:] * 1.1)


@pytest.mark.parametrize("budget_factor", [1.2, 1.5, 4.0])
def test_tdma_allocation_matches_slsqp(budget_factor):
    tau_min = tdma_tau_min()
    budget = budget_factor * tau_min.sum()

    tau, _, feasible = radio.tdma_allocation(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                             tau_min, budget)
    reference_tau, reference_energy = slsqp_allocation(budget, tau_min)

    assert feasible
    assert float(tdma_energy(tau).sum()) == pytest.approx(reference_energy, rel=1e-6)
    np.testing.assert_allclose(tau, reference_tau, rtol=1e-4)


def test_tdma_allocation_equal_links_share_equally():
    bits = np.full(4, float(PAYLOAD_BITS))
    gains = np.full(4, 1e-10)
    tau_min = np.full(4, 0.1e-3)

    tau, _, feasible = radio.tdma_allocation(bits, gains, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ, tau_min, 1e-3)

    assert feasible
    np.testing.assert_allclose(tau, 0.25e-3, rtol=1e-9)


def test_tdma_allocation_infeasible():
    tau_min = tdma_tau_min()

    tau, lam, feasible = radio.tdma_allocation(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                               tau_min, 0.99 * tau_min.sum())

    assert not feasible
    assert np.all(np.isnan(tau))
    assert math.isnan(lam)


def test_tdma_allocation_exactly_at_caps():
    tau_min = tdma_tau_min()

    tau, _, feasible = radio.tdma_allocation(TDMA_BITS, TDMA_GAINS, TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                             tau_min, float(tau_min.sum()))

    assert feasible
    np.testing.assert_allclose(tau, tau_min, rtol=1e-9)


def test_tdma_allocation_without_links():
    tau, _, feasible = radio.tdma_allocation(np.zeros(0), np.zeros(0), TDMA_BANDWIDTH_HZ, NOISE_PSD_W_PER_HZ,
                                             np.zeros(0), 1e-3)

    assert feasible
    assert tau.shape == (0,)


def test_compute_time_and_energy():
    flops = 6.0 * 4096 * 14336

    assert float(radio.compute_time_s(2, flops, 20e12)) == pytest.approx(2 * flops / 20e12)
    assert float(radio.compute_energy_j(2, flops, 0.5e-12)) == pytest.approx(2 * flops * 0.5e-12)
