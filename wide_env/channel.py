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


class NormalStreams:
    """Standard normal draws of ``B`` copies, each copy from its own generator, pre-drawn in blocks.

    ``take(copies, rows)`` returns the next ``rows`` rows of shape ``row_shape``
    of each copy in the order that consecutive ``standard_normal`` calls on its
    generator would produce them, whatever the block size. Drawing
    ``block_rows`` rows per call, not ``rows``, cuts the number of per-copy
    generator calls, the only loop over copies.
    """

    def __init__(self, num_copies: int, row_shape: tuple[int, ...], block_rows: int):
        self.row_shape = tuple(row_shape)
        self.block_rows = max(1, int(block_rows))
        self._buffer = np.empty((num_copies, self.block_rows) + self.row_shape)
        self._next = np.full(num_copies, self.block_rows, dtype=np.int64)  # first unused row of each copy
        self._rngs: list[np.random.Generator | None] = [None] * num_copies

    def reset(self, copies, rngs) -> None:
        """Give ``copies[i]`` the generator ``rngs[i]`` and drop what was drawn before."""
        for copy, rng in zip(np.asarray(copies).tolist(), rngs):
            self._rngs[copy] = rng
        self._next[copies] = self.block_rows

    def has_generator(self, copy: int) -> bool:
        return self._rngs[copy] is not None

    def take(self, copies: np.ndarray, rows: int) -> np.ndarray:
        """Return the next ``rows`` rows of every copy in ``copies``, shape ``(len(copies), rows) + row_shape``.

        The result may be a view of the internal buffer, valid until the next ``take``.
        """
        copies = np.asarray(copies, dtype=np.int64)
        if rows == 0 or 0 in self.row_shape:
            return np.empty((copies.size, rows) + self.row_shape)
        if rows > self.block_rows:
            out = np.empty((copies.size, rows) + self.row_shape)
            for row, copy in enumerate(copies.tolist()):
                left = self.block_rows - self._next[copy]
                out[row, :left] = self._buffer[copy, self._next[copy]:]
                self._rngs[copy].standard_normal(out=out[row, left:])
            self._next[copies] = self.block_rows
            return out
        start = self._next[copies]
        short = start + rows > self.block_rows
        if short.any():
            for copy in copies[short].tolist():
                left = self.block_rows - self._next[copy]
                self._buffer[copy, :left] = self._buffer[copy, self._next[copy]:]
                self._rngs[copy].standard_normal(out=self._buffer[copy, left:])
                self._next[copy] = 0
            start = self._next[copies]
        self._next[copies] = start + rows
        if (start == start[0]).all():
            first = int(start[0])
            if copies.size == self._buffer.shape[0] and (copies == np.arange(copies.size)).all():
                return self._buffer[:, first:first + rows]
            return self._buffer[copies, first:first + rows]
        return self._buffer[copies[:, None], start[:, None] + np.arange(rows)]


class ChannelBatch:
    """Channel state of ``B`` independent copies of the N source-to-node links.

    At ``reset`` each copy draws, from its own generator, the node distances
    (uniform over the scenario's range), the shadowing and the initial fading.
    Fast fading evolves every step as a Gauss-Markov process; slow fading keeps
    one realisation for the episode. Uplink and downlink are reciprocal. The
    observed CSI lags the true channel by ``csi_delay_steps`` and carries a
    complex Gaussian estimation error of standard deviation ``csi_error_std``
    on the unit-power fading.

    ``emit`` produces the gains of the next steps of some copies at once. Each
    copy draws its random numbers in the order that a step-by-step simulation
    would: per step the fading innovation (real parts, then imaginary parts),
    then the estimation error. So a copy's gains do not depend on how its steps
    are grouped into blocks or on the other copies.
    """

    def __init__(self, scenario: ScenarioConfig, num_copies: int, block_steps: int = 1):
        if num_copies < 1:
            raise ValueError(f"invalid num_copies: expected a positive integer, got {num_copies!r}")
        self.scenario = scenario
        self.num_copies = num_copies
        self.num_nodes = scenario.num_nodes
        self.rho = doppler_correlation(scenario.doppler_hz, scenario.fading_step_s)
        self.innovation_scale = math.sqrt(1.0 - self.rho * self.rho)
        k_linear = 10.0 ** (scenario.rician_k_db / 10.0) if scenario.fading == "rician" else 0.0
        self.los_amplitude = math.sqrt(k_linear / (k_linear + 1.0))
        self.scatter_amplitude = math.sqrt(1.0 / (k_linear + 1.0))
        self.gain_db_mean, self.gain_db_std = gain_db_statistics(scenario, self.los_amplitude, self.scatter_amplitude)
        self.fast = scenario.fading_mode == "fast"
        self.csi_delay = scenario.csi_delay_steps
        self.csi_error_std = scenario.csi_error_std

        shape = (num_copies, self.num_nodes)
        self.distances_m = np.zeros(shape)
        self.large_scale_gain = np.zeros(shape)
        self._los_phase = np.ones(shape, dtype=np.complex128)
        self._scatter = np.zeros(shape, dtype=np.complex128)
        # Fading of the last csi_delay_steps steps, oldest first, for delayed CSI.
        self._past_fading = np.zeros((num_copies, self.csi_delay, self.num_nodes), dtype=np.complex128)
        # Estimation error of step 0, drawn at reset like every later step's is drawn with its fading.
        self._first_error = np.zeros(shape, dtype=np.complex128)
        self._fresh = np.zeros(num_copies, dtype=bool)
        self._streams = NormalStreams(num_copies, (self.draws_per_step,), block_steps)

    @property
    def draws_per_step(self) -> int:
        """Standard normal draws a copy takes from its generator per step after the first."""
        return 2 * self.num_nodes * (int(self.fast) + int(self.csi_error_std > 0.0))

    def mean_distance_gain(self) -> float:
        """Linear gain at the mean node distance with unit fading power and no shadowing."""
        sc = self.scenario
        mean_distance = 0.5 * (sc.distance_min_m + sc.distance_max_m)
        return float(10.0 ** (-pathloss_db(mean_distance, sc.carrier_frequency_ghz, sc.pathloss_model) / 10.0))

    def reset(self, copies, rngs) -> None:
        """Start new episodes for ``copies`` (indices), copy ``copies[i]`` drawing from ``rngs[i]``."""
        sc = self.scenario
        copies = np.asarray(copies, dtype=np.int64).reshape(-1)
        if len(rngs) != copies.size:
            raise ValueError(f"reset needs one generator per copy: got {len(rngs)} generators for {copies.size} copies")
        nodes = self.num_nodes
        count = copies.size
        distances = np.empty((count, nodes))
        shadowing_db = np.zeros((count, nodes))
        phase = np.empty((count, nodes))
        scatter = np.empty((count, nodes), dtype=np.complex128)
        error = np.zeros((count, nodes), dtype=np.complex128)
        for row, rng in enumerate(rngs):
            distances[row] = rng.uniform(sc.distance_min_m, sc.distance_max_m, nodes)
            if sc.shadowing_std_db > 0:
                shadowing_db[row] = rng.normal(0.0, sc.shadowing_std_db, nodes)
            phase[row] = rng.uniform(0.0, 2.0 * math.pi, nodes)
            scatter[row] = complex_normal(rng, (nodes,))
            if self.csi_error_std > 0.0:
                error[row] = complex_normal(rng, (nodes,))
        self._streams.reset(copies, rngs)

        pl_db = pathloss_db(distances, sc.carrier_frequency_ghz, sc.pathloss_model)
        self.distances_m[copies] = distances
        self.large_scale_gain[copies] = 10.0 ** (-(pl_db + shadowing_db) / 10.0)
        self._los_phase[copies] = np.exp(1j * phase)
        self._scatter[copies] = scatter
        self._first_error[copies] = error
        self._fresh[copies] = True
        if self.csi_delay:
            first = self.los_amplitude * self._los_phase[copies] + self.scatter_amplitude * scatter
            self._past_fading[copies] = first[:, None, :]

    def emit(self, copies, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance ``copies`` by ``num_steps`` steps and return their true and observed gains.

        Both arrays have shape ``(len(copies), num_steps, N)``. The first step
        after a reset is the initial channel; every later step is one Gauss-Markov
        step further. All copies in one call must be either just reset or not.
        """
        copies = np.asarray(copies, dtype=np.int64).reshape(-1)
        if num_steps < 1:
            raise ValueError(f"invalid num_steps: expected a positive integer, got {num_steps!r}")
        if not all(self._streams.has_generator(c) for c in copies.tolist()):
            raise RuntimeError("ChannelBatch.emit() called before reset() of every requested copy")
        fresh = self._fresh[copies]
        if fresh.any() and not fresh.all():
            raise ValueError("emit() cannot mix copies that were just reset with copies in mid-episode")
        first_is_initial = bool(fresh.all()) if copies.size else False
        innovations = num_steps - 1 if first_is_initial else num_steps
        nodes = self.num_nodes

        scatter_prev = self._scatter[copies]
        draws = self._streams.take(copies, innovations)  # (b, innovations, draws_per_step)
        if self.fast and innovations:
            # Steps first, so that each step of the recursion works on contiguous memory.
            by_step = draws.transpose(1, 0, 2)
            scaled = self.innovation_scale * complex_normal_from(by_step[..., :nodes], by_step[..., nodes:2 * nodes])
            scatter = np.empty((innovations, copies.size, nodes), dtype=np.complex128)
            current = scatter_prev
            for step in range(innovations):
                # The expression of gauss_markov_step, so that the result is the same to the last bit.
                current = self.rho * current + scaled[step]
                scatter[step] = current
            scatter = scatter.transpose(1, 0, 2)
        else:
            scatter = np.broadcast_to(scatter_prev[:, None, :], (copies.size, innovations, nodes))
        if first_is_initial:
            scatter = np.concatenate([scatter_prev[:, None, :], scatter], axis=1)
        if innovations:
            self._scatter[copies] = scatter[:, -1]
        self._fresh[copies] = False

        fading = self.los_amplitude * self._los_phase[copies][:, None, :] + self.scatter_amplitude * scatter
        large_scale = self.large_scale_gain[copies][:, None, :]
        true_gains = large_scale * np.abs(fading) ** 2
        if self.csi_delay == 0 and self.csi_error_std == 0.0:
            return true_gains, true_gains

        observed_fading = fading
        if self.csi_delay:
            extended = np.concatenate([self._past_fading[copies], fading], axis=1)
            observed_fading = extended[:, :num_steps]
            self._past_fading[copies] = extended[:, -self.csi_delay:]
        if self.csi_error_std > 0.0:
            offset = nodes if not self.fast else 3 * nodes
            error = complex_normal_from(draws[..., offset - nodes:offset], draws[..., offset:offset + nodes])
            if first_is_initial:
                error = np.concatenate([self._first_error[copies][:, None, :], error], axis=1)
            observed_fading = observed_fading + self.csi_error_std * error
        return true_gains, large_scale * np.abs(observed_fading) ** 2

    def standardise_db(self, gains: np.ndarray) -> np.ndarray:
        """Gain in dB, centred on the scenario's mean and divided by its spread."""
        gains_db = 10.0 * np.log10(np.maximum(gains, 1e-300))
        return (gains_db - self.gain_db_mean) / self.gain_db_std


def complex_normal_from(real: np.ndarray, imaginary: np.ndarray) -> np.ndarray:
    """``complex_normal`` from already drawn real and imaginary standard normals."""
    return (real + 1j * imaginary) * math.sqrt(0.5)


def gain_db_statistics(scenario: ScenarioConfig, los_amplitude: float, scatter_amplitude: float) -> tuple[float, float]:
    """Mean and spread in dB of the gain over the scenario's distances, shadowing and fading.

    The path-loss moments are taken by quadrature over the uniform distance
    range. The fading moments are exact for Rayleigh and sampled once, from
    a fixed seed, for Rician.
    """
    sc = scenario
    distances = np.linspace(sc.distance_min_m, sc.distance_max_m, 2001)
    pl = pathloss_db(distances, sc.carrier_frequency_ghz, sc.pathloss_model)
    pl_mean, pl_var = float(pl.mean()), float(pl.var())
    if sc.fading == "rayleigh":
        fade_mean, fade_var = RAYLEIGH_GAIN_DB_MEAN, RAYLEIGH_GAIN_DB_STD**2
    else:
        rng = np.random.default_rng(12345)
        h = los_amplitude + scatter_amplitude * complex_normal(rng, (200_000,))
        fade_db = 10.0 * np.log10(np.abs(h) ** 2)
        fade_mean, fade_var = float(fade_db.mean()), float(fade_db.var())
    mean = -pl_mean + fade_mean
    std = math.sqrt(pl_var + sc.shadowing_std_db**2 + fade_var)
    return mean, std


class ChannelModel:
    """Channel state of the N source-to-node links over one episode.

    At ``reset`` the node distances are drawn uniformly from the scenario's
    range, then the shadowing and the initial fading. Fast fading evolves every
    step as a Gauss-Markov process; slow fading keeps one realisation for the
    episode. Uplink and downlink are reciprocal. The observed CSI can lag the
    true channel by ``csi_delay_steps`` and carry a complex Gaussian estimation
    error of standard deviation ``csi_error_std`` on the unit-power fading.

    This is one copy of ``ChannelBatch``. It simulates ``block_steps`` steps
    at a time and ``advance`` moves through them, so a step costs an index
    increment. ``lookahead`` returns the gains of coming steps.
    """

    def __init__(self, scenario: ScenarioConfig, block_steps: int = 64):
        if block_steps < 1:
            raise ValueError(f"invalid block_steps: expected a positive integer, got {block_steps!r}")
        self.scenario = scenario
        self.num_nodes = scenario.num_nodes
        self.block_steps = block_steps
        self._batch = ChannelBatch(scenario, 1)
        self.rho = self._batch.rho
        self.los_amplitude = self._batch.los_amplitude
        self.scatter_amplitude = self._batch.scatter_amplitude
        self.gain_db_mean, self.gain_db_std = self._batch.gain_db_mean, self._batch.gain_db_std
        self._true = np.zeros((0, self.num_nodes))
        self._observed = np.zeros((0, self.num_nodes))
        self._position = 0  # row of the current step in _true and _observed
        self._started = False

    @property
    def distances_m(self) -> np.ndarray:
        return self._batch.distances_m[0]

    @property
    def large_scale_gain(self) -> np.ndarray:
        return self._batch.large_scale_gain[0]

    def mean_distance_gain(self) -> float:
        """Linear gain at the mean node distance with unit fading power and no shadowing."""
        return self._batch.mean_distance_gain()

    def reset(self, rng: np.random.Generator) -> None:
        self._batch.reset([0], [rng])
        self._started = True
        self._true, self._observed = self._emit(self.block_steps)
        self._position = 0

    def advance(self) -> None:
        """Move the fading one decision step forward (no change under slow fading)."""
        if not self._started:
            raise RuntimeError("ChannelModel.advance() called before reset()")
        self._position += 1
        if self._position >= len(self._true):
            self._extend(1)

    def lookahead(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """True and observed gains of the current step and the ``num_steps - 1`` after it, ``(num_steps, N)`` each."""
        if not self._started:
            raise RuntimeError("ChannelModel.lookahead() called before reset()")
        missing = self._position + num_steps - len(self._true)
        if missing > 0:
            self._extend(missing)
        stop = self._position + num_steps
        true = self._true[self._position:stop]
        # With perfect CSI both are one array, and callers may test that with ``is``.
        return true, true if self._observed is self._true else self._observed[self._position:stop]

    def _extend(self, missing: int) -> None:
        true, observed = self._emit(max(missing, self.block_steps))
        keep = slice(self._position, None)
        shared = observed is true
        self._true = np.concatenate([self._true[keep], true])
        self._observed = self._true if shared else np.concatenate([self._observed[keep], observed])
        self._position = 0

    def _emit(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        true, observed = self._batch.emit([0], num_steps)
        first = true[0]
        # With perfect CSI both are one array, and callers may test that with ``is``.
        return (first, first) if observed is true else (first, observed[0])

    @property
    def true_gains(self) -> np.ndarray:
        """Linear power gain of each link now, the one energy is charged with."""
        return self._true[self._position]

    @property
    def observed_gains(self) -> np.ndarray:
        """Linear power gain in the CSI available at the source: delayed and with estimation error."""
        return self._observed[self._position]

    def standardise_db(self, gains: np.ndarray) -> np.ndarray:
        """Gain in dB, centred on the scenario's mean and divided by its spread."""
        return self._batch.standardise_db(gains)
