"""Channel model: TR 38.901 path loss, Doppler correlation, fading statistics and CSI."""

import math

import numpy as np
import pytest
from scipy import stats

from wide_env.channel import (
    RAYLEIGH_GAIN_DB_MEAN,
    RAYLEIGH_GAIN_DB_STD,
    ChannelModel,
    complex_normal,
    doppler_correlation,
    gauss_markov_step,
    pathloss_db,
)
from wide_env.config import ScenarioConfig

SPEED_OF_LIGHT_M_PER_S = 299_792_458.0
FC_GHZ = 3.5


def breakpoint_m(bs_height_m):
    # d'_BP = 4 h'_BS h'_UT fc / c with effective heights h - 1 m and a 1.5 m terminal.
    return 4.0 * (bs_height_m - 1.0) * 0.5 * FC_GHZ * 1e9 / SPEED_OF_LIGHT_M_PER_S


def umi_los_db(d):
    d_bp = breakpoint_m(10.0)
    if d <= d_bp:
        return 32.4 + 21.0 * math.log10(d) + 20.0 * math.log10(FC_GHZ)
    return (32.4 + 40.0 * math.log10(d) + 20.0 * math.log10(FC_GHZ)
            - 9.5 * math.log10(d_bp**2 + (10.0 - 1.5) ** 2))


def uma_los_db(d):
    d_bp = breakpoint_m(25.0)
    if d <= d_bp:
        return 28.0 + 22.0 * math.log10(d) + 20.0 * math.log10(FC_GHZ)
    return (28.0 + 40.0 * math.log10(d) + 20.0 * math.log10(FC_GHZ)
            - 9.0 * math.log10(d_bp**2 + (25.0 - 1.5) ** 2))


def umi_nlos_db(d):
    return max(umi_los_db(d), 35.3 * math.log10(d) + 22.4 + 21.3 * math.log10(FC_GHZ))


def uma_nlos_db(d):
    return max(uma_los_db(d), 13.54 + 39.08 * math.log10(d) + 20.0 * math.log10(FC_GHZ))


def fading_power(channel):
    """Return |h|^2 of every link, the true gain divided by the large-scale gain."""
    return channel.true_gains / channel.large_scale_gain


# -- path loss ----------------------------------------------------------------


@pytest.mark.parametrize("distance_m, expected_db", [(50.0, 93.96), (100.0, 104.59)])
def test_umi_nlos_pathloss_reference_values(distance_m, expected_db):
    assert float(pathloss_db(distance_m, FC_GHZ, "umi-nlos")) == pytest.approx(expected_db, abs=0.005)


@pytest.mark.parametrize(
    "model, formula",
    [("umi-los", umi_los_db), ("umi-nlos", umi_nlos_db), ("uma-los", uma_los_db), ("uma-nlos", uma_nlos_db)],
)
@pytest.mark.parametrize("distance_m", [10.0, 30.0, 150.0, 300.0, 1000.0])
def test_pathloss_matches_tr38901_formula(model, formula, distance_m):
    assert float(pathloss_db(distance_m, FC_GHZ, model)) == pytest.approx(formula(distance_m), abs=1e-9)


def test_los_breakpoint_distances():
    # 4 * 9 m * 0.5 m * 3.5 GHz / c = 210.15 m for UMi, 4 * 24 m * 0.5 m * 3.5 GHz / c = 560.39 m for UMa.
    assert breakpoint_m(10.0) == pytest.approx(210.145, abs=1e-3)
    assert breakpoint_m(25.0) == pytest.approx(560.388, abs=1e-3)


@pytest.mark.parametrize("model, bs_height_m", [("umi-los", 10.0), ("uma-los", 25.0)])
def test_los_pathloss_continuous_at_breakpoint(model, bs_height_m):
    d_bp = breakpoint_m(bs_height_m)

    below = float(pathloss_db(d_bp * (1 - 1e-9), FC_GHZ, model))
    above = float(pathloss_db(d_bp * (1 + 1e-9), FC_GHZ, model))

    assert above == pytest.approx(below, abs=0.01)


def test_los_pathloss_slope_changes_at_breakpoint():
    d_bp = breakpoint_m(10.0)

    near_slope = float(pathloss_db(d_bp / 2, FC_GHZ, "umi-los") - pathloss_db(d_bp / 4, FC_GHZ, "umi-los"))
    far_slope = float(pathloss_db(d_bp * 4, FC_GHZ, "umi-los") - pathloss_db(d_bp * 2, FC_GHZ, "umi-los"))

    assert near_slope == pytest.approx(21.0 * math.log10(2.0))
    assert far_slope == pytest.approx(40.0 * math.log10(2.0))


def test_nlos_pathloss_never_below_los():
    distances = np.geomspace(1.0, 5000.0, 400)

    for nlos, los in (("umi-nlos", "umi-los"), ("uma-nlos", "uma-los")):
        assert np.all(pathloss_db(distances, FC_GHZ, nlos) >= pathloss_db(distances, FC_GHZ, los))
    # At 1 m the UMi LOS formula exceeds the NLOS one, so the max() picks LOS.
    assert float(pathloss_db(1.0, FC_GHZ, "umi-nlos")) == pytest.approx(umi_los_db(1.0))


def test_pathloss_broadcasts_over_arrays():
    distances = np.array([[50.0, 100.0], [20.0, 160.0]])

    result = pathloss_db(distances, FC_GHZ, "umi-nlos")

    assert result.shape == (2, 2)
    assert result[0, 1] == pytest.approx(104.59, abs=0.005)


def test_pathloss_rejects_unknown_model():
    with pytest.raises(ValueError, match="invalid pathloss model.*'rma-nlos'"):
        pathloss_db(50.0, FC_GHZ, "rma-nlos")


# -- Doppler correlation and Gauss-Markov fading ------------------------------


def test_doppler_correlation_default_value():
    # J0(2 pi * 100 Hz * 2 ms) = J0(1.2566) = 0.64251.
    assert doppler_correlation(100.0, 2e-3) == pytest.approx(0.6425118, abs=1e-7)


def test_doppler_correlation_clamped_below_one():
    rho = doppler_correlation(0.0, 2e-3)

    assert rho < 1.0
    assert rho == pytest.approx(1.0)
    assert math.sqrt(1.0 - rho * rho) > 0.0


def test_doppler_correlation_clamped_at_zero():
    # 2 pi f_D dt = 3.77 lies between the first two zeros of J0, where J0 < 0.
    assert doppler_correlation(300.0, 2e-3) == 0.0


def test_gauss_markov_autocorrelation():
    rho = doppler_correlation(100.0, 2e-3)
    rng = np.random.default_rng(1)
    h0 = complex_normal(rng, (200_000,))

    h1 = gauss_markov_step(h0, rho, rng)
    h2 = gauss_markov_step(h1, rho, rng)

    assert np.mean(np.abs(h2) ** 2) == pytest.approx(1.0, abs=0.01)
    assert np.mean(h1 * np.conj(h0)).real == pytest.approx(rho, abs=0.01)
    assert np.mean(h2 * np.conj(h0)).real == pytest.approx(rho**2, abs=0.01)
    assert abs(np.mean(h1 * np.conj(h0)).imag) < 0.01


def many_node_scenario(**overrides):
    """Return a deepseek-v3 scenario with 256 edge nodes, the most that its contiguous placement allows."""
    return ScenarioConfig(moe_preset="deepseek-v3", num_nodes=256, **overrides)


def test_channel_fading_power_autocorrelation():
    # For CN(0, 1) fading, corr(|h_t|^2, |h_{t-k}|^2) = |E[h_t h*_{t-k}]|^2 = rho^(2k).
    channel = ChannelModel(many_node_scenario())
    channel.reset(np.random.default_rng(2))
    samples = []
    for _ in range(1500):
        channel.advance()
        samples.append(fading_power(channel))
    power = np.array(samples)

    lag1 = np.corrcoef(power[1:].ravel(), power[:-1].ravel())[0, 1]
    lag2 = np.corrcoef(power[2:].ravel(), power[:-2].ravel())[0, 1]

    assert channel.rho == pytest.approx(0.6425118, abs=1e-7)
    assert lag1 == pytest.approx(channel.rho**2, abs=0.02)
    assert lag2 == pytest.approx(channel.rho**4, abs=0.02)


def test_rayleigh_fading_power_is_exponential():
    channel = ChannelModel(many_node_scenario())
    at_reset, after_steps = [], []
    for seed in range(40):
        channel.reset(np.random.default_rng(seed))
        at_reset.append(fading_power(channel))
        for _ in range(20):
            channel.advance()
        after_steps.append(fading_power(channel))

    for samples in (np.concatenate(at_reset), np.concatenate(after_steps)):
        assert samples.mean() == pytest.approx(1.0, abs=0.03)
        assert stats.kstest(samples, "expon").pvalue > 1e-3


def test_rayleigh_kstest_rejects_wrong_law():
    # The KS check above has power: the same samples are far from Exp(2).
    channel = ChannelModel(many_node_scenario())
    channel.reset(np.random.default_rng(0))

    assert stats.kstest(fading_power(channel), "expon", args=(0, 2)).pvalue < 1e-3


def test_rician_fading_power_mean_one():
    channel = ChannelModel(many_node_scenario(fading="rician", rician_k_db=6.0))
    samples = []
    for seed in range(40):
        channel.reset(np.random.default_rng(seed))
        samples.append(fading_power(channel))
    power = np.concatenate(samples)

    k = 10.0 ** 0.6
    assert power.mean() == pytest.approx(1.0, abs=0.03)
    # Var |h|^2 = (1 + 2K) / (1 + K)^2 for Rician fading with unit mean power.
    assert power.var() == pytest.approx((1 + 2 * k) / (1 + k) ** 2, rel=0.05)


def test_slow_fading_constant_within_episode():
    channel = ChannelModel(ScenarioConfig(fading_mode="slow"))
    channel.reset(np.random.default_rng(3))
    first = channel.true_gains.copy()

    for _ in range(100):
        channel.advance()
        np.testing.assert_array_equal(channel.true_gains, first)
    channel.reset(np.random.default_rng(4))

    assert np.all(channel.true_gains != first)


def test_fast_fading_changes_every_step():
    channel = ChannelModel(ScenarioConfig())
    channel.reset(np.random.default_rng(3))
    previous = channel.true_gains.copy()

    for _ in range(20):
        channel.advance()
        assert np.all(channel.true_gains != previous)
        previous = channel.true_gains.copy()


def test_large_scale_gain_fixed_within_episode():
    channel = ChannelModel(ScenarioConfig(shadowing_std_db=7.82))
    channel.reset(np.random.default_rng(5))
    distances = channel.distances_m.copy()
    large_scale = channel.large_scale_gain.copy()

    for _ in range(10):
        channel.advance()

    np.testing.assert_array_equal(channel.distances_m, distances)
    np.testing.assert_array_equal(channel.large_scale_gain, large_scale)
    assert np.all((distances >= 20.0) & (distances <= 160.0))


def test_advance_before_reset_raises():
    with pytest.raises(RuntimeError, match="before reset"):
        ChannelModel(ScenarioConfig()).advance()


# -- gain statistics ----------------------------------------------------------


def test_rayleigh_gain_db_constants():
    # 10 log10 of Exp(1): mean -gamma * 10/ln 10 = -2.5068 dB, std pi/sqrt(6) * 10/ln 10 = 5.57004 dB.
    assert RAYLEIGH_GAIN_DB_MEAN == pytest.approx(-2.50682, abs=1e-5)
    assert RAYLEIGH_GAIN_DB_STD == pytest.approx(5.57004, abs=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shadowing_std_db": 7.82},
        {"fading": "rician", "rician_k_db": 6.0, "shadowing_std_db": 4.0, "pathloss_model": "umi-los"},
        {"pathloss_model": "uma-nlos", "distance_min_m": 50.0, "distance_max_m": 800.0},
    ],
)
def test_gain_db_statistics_match_monte_carlo(overrides):
    channel = ChannelModel(many_node_scenario(**overrides))
    samples = []
    for seed in range(200):
        channel.reset(np.random.default_rng(seed))
        samples.append(10.0 * np.log10(channel.true_gains))
    gains_db = np.concatenate(samples)

    assert gains_db.mean() == pytest.approx(channel.gain_db_mean, abs=0.15)
    assert gains_db.std() == pytest.approx(channel.gain_db_std, rel=0.02)


def test_standardise_db_centres_and_scales():
    channel = ChannelModel(ScenarioConfig())
    gains = 10.0 ** (np.array([channel.gain_db_mean, channel.gain_db_mean + 2 * channel.gain_db_std]) / 10.0)

    np.testing.assert_allclose(channel.standardise_db(gains), [0.0, 2.0], atol=1e-12)


def test_mean_distance_gain_uses_range_centre():
    channel = ChannelModel(ScenarioConfig())

    assert 10.0 * math.log10(channel.mean_distance_gain()) == pytest.approx(-umi_nlos_db(90.0))


# -- CSI ----------------------------------------------------------------------


def test_perfect_csi_observes_true_gains():
    channel = ChannelModel(ScenarioConfig())
    channel.reset(np.random.default_rng(6))

    for _ in range(5):
        np.testing.assert_array_equal(channel.observed_gains, channel.true_gains)
        channel.advance()


def test_delayed_csi_lags_true_gains():
    delay = 3
    channel = ChannelModel(ScenarioConfig(csi_delay_steps=delay))
    channel.reset(np.random.default_rng(7))
    true_history = [channel.true_gains.copy()]

    for step in range(1, 12):
        channel.advance()
        true_history.append(channel.true_gains.copy())
        expected = true_history[max(0, step - delay)]
        np.testing.assert_array_equal(channel.observed_gains, expected)


def test_csi_error_perturbs_observed_gains():
    channel = ChannelModel(many_node_scenario(csi_error_std=0.3))
    channel.reset(np.random.default_rng(8))

    ratio_db = 10.0 * np.log10(channel.observed_gains / channel.true_gains)

    assert np.all(ratio_db != 0.0)
    assert np.median(np.abs(ratio_db)) < 6.0
