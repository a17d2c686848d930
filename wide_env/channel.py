"""Channel models: 3GPP TR 38.901 path loss, shadowing and small-scale fading.

The gain of a link is ``G = 10^(-(PL_dB + X_dB)/10) * |h|^2`` with path loss
``PL_dB``, log-normal shadowing ``X_dB`` and a unit-power fading coefficient
``h``. Functions take arrays with any leading batch shape so that the single
and the batched environments share them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import j0

from wide_env.config import ScenarioConfig

SPEED_OF_LIGHT_M_PER_S = 299_792_458.0

# Antenna heights of TR 38.901 Table 7.4.1-1: base station 10 m (UMi) or 25 m (UMa),
# user terminal 1.5 m. The edge node plays the base station, the source the terminal.
UMI_BS_HEIGHT_M = 10.0
UMA_BS_HEIGHT_M = 25.0
UT_HEIGHT_M = 1.5
ENVIRONMENT_HEIGHT_M = 1.0

# Standard deviation of the shadow fading in TR 38.901 Table 7.4.1-1, in dB.
SHADOWING_STD_DB = {"umi-los": 4.0, "umi-nlos": 7.82, "uma-los": 4.0, "uma-nlos": 6.0}

# Mean and variance of 10*log10(X) for X ~ Exp(1), the Rayleigh power gain:
# E[ln X] = -Euler gamma and Var[ln X] = pi^2 / 6.
_DB_PER_NEPER = 10.0 / math.log(10.0)
RAYLEIGH_GAIN_DB_MEAN = -0.5772156649015329 * _DB_PER_NEPER
RAYLEIGH_GAIN_DB_STD = math.pi / math.sqrt(6.0) * _DB_PER_NEPER


def _breakpoint_distance_m(bs_height_m: float, carrier_frequency_ghz: float) -> float:
    return (4.0 * (bs_height_m - ENVIRONMENT_HEIGHT_M) * (UT_HEIGHT_M - ENVIRONMENT_HEIGHT_M)
            * carrier_frequency_ghz * 1e9 / SPEED_OF_LIGHT_M_PER_S)


def _los_pathloss_db(distance_m: np.ndarray, fc_ghz: float, bs_height_m: float, near_offset_db: float,
                     near_slope: float, far_correction: float) -> np.ndarray:
    d_bp = _breakpoint_distance_m(bs_height_m, fc_ghz)
    log_fc = 20.0 * math.log10(fc_ghz)
    near = near_offset_db + near_slope * np.log10(distance_m) + log_fc
    far = (near_offset_db + 40.0 * np.log10(distance_m) + log_fc
           - far_correction * math.log10(d_bp**2 + (bs_height_m - UT_HEIGHT_M) ** 2))
    return np.where(distance_m <= d_bp, near, far)


def pathloss_db(distance_m: np.ndarray | float, carrier_frequency_ghz: float, model: str = "umi-nlos") -> np.ndarray:
    """Path loss in dB of TR 38.901 Table 7.4.1-1 at a 3D distance in metres.

    ``umi-nlos`` is ``max(PL_LOS, 35.3 log10(d) + 22.4 + 21.3 log10(fc))``; ``uma-nlos`` is
    ``max(PL_LOS, 13.54 + 39.08 log10(d) + 20 log10(fc))``. The LOS models include
    the breakpoint distance. The terminal height correction terms vanish at 1.5 m.
    """
    d = np.asarray(distance_m, dtype=np.float64)
    fc = carrier_frequency_ghz
    if model.startswith("umi"):
        los = _los_pathloss_db(d, fc, UMI_BS_HEIGHT_M, 32.4, 21.0, 9.5)
        if model == "umi-los":
            return los
        return np.maximum(los, 35.3 * np.log10(d) + 22.4 + 21.3 * math.log10(fc))
    if model.startswith("uma"):
        los = _los_pathloss_db(d, fc, UMA_BS_HEIGHT_M, 28.0, 22.0, 9.0)
        if model == "uma-los":
            return los
        return np.maximum(los, 13.54 + 39.08 * np.log10(d) + 20.0 * math.log10(fc))
    raise ValueError(f"invalid pathloss model: expected one of umi-nlos, umi-los, uma-nlos, uma-los, got {model!r}")


def doppler_correlation(doppler_hz: float, step_duration_s: float) -> float:
    """Jakes' correlation ``rho = J0(2 pi f_D dt)`` between fading samples one step apart, clamped to [0, 1)."""
    rho = float(j0(2.0 * math.pi * doppler_hz * step_duration_s))
    return min(max(rho, 0.0), math.nextafter(1.0, 0.0))


def complex_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Samples of CN(0, 1): independent real and imaginary parts of variance 1/2."""
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * math.sqrt(0.5)


def gauss_markov_step(h_scatter: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Advance the scattered fading one step: ``h_t = rho h_{t-1} + sqrt(1 - rho^2) w_t``."""
    return rho * h_scatter + math.sqrt(1.0 - rho * rho) * complex_normal(rng, h_scatter.shape)


class ChannelModel:
    """Channel state of the N source-to-node links over one episode.

    At ``reset`` the node distances are drawn uniformly from the scenario's
    range, then the shadowing and the initial fading. Fast fading evolves every
    step as a Gauss-Markov process; slow fading keeps one realisation for the
    episode. Uplink and downlink are reciprocal. The observed CSI can lag the
    true channel by ``csi_delay_steps`` and carry a complex Gaussian estimation
    error of standard deviation ``csi_error_std`` on the unit-power fading.
    """

    def __init__(self, scenario: ScenarioConfig):
        self.scenario = scenario
        self.num_nodes = scenario.num_nodes
        self.rho = doppler_correlation(scenario.doppler_hz, scenario.fading_step_s)
        k_linear = 10.0 ** (scenario.rician_k_db / 10.0) if scenario.fading == "rician" else 0.0
        self.los_amplitude = math.sqrt(k_linear / (k_linear + 1.0))
        self.scatter_amplitude = math.sqrt(1.0 / (k_linear + 1.0))
        self.gain_db_mean, self.gain_db_std = self._gain_db_statistics()

        self.distances_m = np.zeros(self.num_nodes)
        self.large_scale_gain = np.zeros(self.num_nodes)
        self._los_phase = np.ones(self.num_nodes, dtype=np.complex128)
        self._scatter = np.zeros(self.num_nodes, dtype=np.complex128)
        self._history: list[np.ndarray] = []
        self._observed = np.zeros(self.num_nodes)
        self._rng: np.random.Generator | None = None

    def _gain_db_statistics(self) -> tuple[float, float]:
        """Mean and spread in dB of the gain over the scenario's distances, shadowing and fading.

        The path-loss moments are taken by quadrature over the uniform distance
        range. The fading moments are exact for Rayleigh and sampled once, from
        a fixed seed, for Rician.
        """
        sc = self.scenario
        distances = np.linspace(sc.distance_min_m, sc.distance_max_m, 2001)
        pl = pathloss_db(distances, sc.carrier_frequency_ghz, sc.pathloss_model)
        pl_mean, pl_var = float(pl.mean()), float(pl.var())
        if sc.fading == "rayleigh":
            fade_mean, fade_var = RAYLEIGH_GAIN_DB_MEAN, RAYLEIGH_GAIN_DB_STD**2
        else:
            rng = np.random.default_rng(12345)
            h = self.los_amplitude + self.scatter_amplitude * complex_normal(rng, (200_000,))
            fade_db = 10.0 * np.log10(np.abs(h) ** 2)
            fade_mean, fade_var = float(fade_db.mean()), float(fade_db.var())
        mean = -pl_mean + fade_mean
        std = math.sqrt(pl_var + sc.shadowing_std_db**2 + fade_var)
        return mean, std

    def mean_distance_gain(self) -> float:
        """Linear gain at the mean node distance with unit fading power and no shadowing."""
        sc = self.scenario
        mean_distance = 0.5 * (sc.distance_min_m + sc.distance_max_m)
        return float(10.0 ** (-pathloss_db(mean_distance, sc.carrier_frequency_ghz, sc.pathloss_model) / 10.0))

    def reset(self, rng: np.random.Generator) -> None:
        sc = self.scenario
        self._rng = rng
        self.distances_m = rng.uniform(sc.distance_min_m, sc.distance_max_m, self.num_nodes)
        shadowing_db = rng.normal(0.0, sc.shadowing_std_db, self.num_nodes) if sc.shadowing_std_db > 0 else 0.0
        pl_db = pathloss_db(self.distances_m, sc.carrier_frequency_ghz, sc.pathloss_model)
        self.large_scale_gain = 10.0 ** (-(pl_db + shadowing_db) / 10.0)
        self._los_phase = np.exp(1j * rng.uniform(0.0, 2.0 * math.pi, self.num_nodes))
        self._scatter = complex_normal(rng, (self.num_nodes,))
        self._history = [self._fading()]
        self._observed = self._estimate()

    def advance(self) -> None:
        """Move the fading one decision step forward (no change under slow fading)."""
        if self._rng is None:
            raise RuntimeError("ChannelModel.advance() called before reset()")
        if self.scenario.fading_mode == "fast":
            self._scatter = gauss_markov_step(self._scatter, self.rho, self._rng)
        self._history.append(self._fading())
        del self._history[: max(0, len(self._history) - self.scenario.csi_delay_steps - 1)]
        self._observed = self._estimate()

    def _fading(self) -> np.ndarray:
        return self.los_amplitude * self._los_phase + self.scatter_amplitude * self._scatter

    @property
    def true_gains(self) -> np.ndarray:
        """Linear power gain of each link now, the one energy is charged with."""
        return self.large_scale_gain * np.abs(self._history[-1]) ** 2

    @property
    def observed_gains(self) -> np.ndarray:
        """Linear power gain as the source knows it: delayed and with estimation error."""
        return self._observed

    def _estimate(self) -> np.ndarray:
        # Until csi_delay_steps steps have passed, the oldest sample is the newest one available.
        fading = self._history[0]
        if self.scenario.csi_error_std > 0.0:
            fading = fading + self.scenario.csi_error_std * complex_normal(self._rng, fading.shape)
        return self.large_scale_gain * np.abs(fading) ** 2

    def standardise_db(self, gains: np.ndarray) -> np.ndarray:
        """Gain in dB, centred on the scenario's mean and divided by its spread."""
        gains_db = 10.0 * np.log10(np.maximum(gains, 1e-300))
        return (gains_db - self.gain_db_mean) / self.gain_db_std
