"""Radio energy and latency: Shannon-rate transmission, power caps, FDMA and TDMA.

Sending ``D`` bits in time ``tau`` over bandwidth ``B`` at power gain ``G`` with
noise density ``N0`` needs, at constant power and the Shannon rate,

    E_tx(tau) = tau * (N0 B / G) * (2^(D / (B tau)) - 1)   [J]

which is convex and decreasing in ``tau``. A power cap ``P_max`` sets the
shortest time ``tau_min = D / (B log2(1 + P_max G / (N0 B)))``. All functions
broadcast over numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import lambertw

LN2 = math.log(2.0)


def tx_energy_j(tau_s, bits, gain, bandwidth_hz, noise_psd_w_per_hz):
    """Least energy in J to send ``bits`` in ``tau_s`` seconds; ``inf`` for a non-positive time."""
    tau = np.asarray(tau_s, dtype=np.float64)
    noise_over_gain = noise_psd_w_per_hz * bandwidth_hz / np.asarray(gain, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        exponent = np.asarray(bits, dtype=np.float64) * LN2 / (bandwidth_hz * tau)
        energy = tau * noise_over_gain * np.expm1(exponent)
    return np.where(tau > 0, energy, np.inf)


def min_tx_time_s(bits, gain, bandwidth_hz, noise_psd_w_per_hz, max_power_w):
    """Shortest time in s to send ``bits`` at the power cap: ``D / (B log2(1 + P_max G / (N0 B)))``."""
    snr = max_power_w * np.asarray(gain, dtype=np.float64) / (noise_psd_w_per_hz * bandwidth_hz)
    with np.errstate(divide="ignore"):
        return np.asarray(bits, dtype=np.float64) / (bandwidth_hz * np.log2(1.0 + snr))


def tx_energy_derivative(tau_s, bits, gain, bandwidth_hz, noise_psd_w_per_hz):
    """``dE_tx/dtau = a (e^u (1 - u) - 1)`` with ``u = D ln2 / (B tau)`` and ``a = N0 B / G`` (negative)."""
    a = noise_psd_w_per_hz * bandwidth_hz / np.asarray(gain, dtype=np.float64)
    u = np.asarray(bits, dtype=np.float64) * LN2 / (bandwidth_hz * np.asarray(tau_s, dtype=np.float64))
    return a * (np.exp(u) * (1.0 - u) - 1.0)


def split_round_trip(budget_s, tau_min_up_s, tau_min_down_s):
    """Optimal uplink and downlink times of one FDMA node with reciprocal, equal-payload links.

    Both links then share one convex energy curve, so the optimum gives each half
    of the budget unless a power cap binds. In that case the capped link runs at
    its ``tau_min`` and the other takes the rest. Returns ``(tau_up, tau_down,
    reachable)``; the times are only meaningful where ``reachable`` is true.
    """
    budget = np.asarray(budget_s, dtype=np.float64)
    m_up = np.asarray(tau_min_up_s, dtype=np.float64)
    m_down = np.asarray(tau_min_down_s, dtype=np.float64)
    half = 0.5 * budget
    tau_up = np.where(m_up >= half, m_up, np.where(m_down >= half, budget - m_down, half))
    tau_down = budget - tau_up
    reachable = (m_up + m_down <= budget) & (budget > 0)
    return tau_up, tau_down, reachable


def _time_at_multiplier(lam, bits, a, bandwidth_hz):
    """Link time where ``dE_tx/dtau = -lam``: ``tau = D ln2 / (B u)``, ``u = 1 + W0((lam/a - 1)/e)``."""
    argument = (lam / a - 1.0) / math.e
    u = 1.0 + np.real(lambertw(argument, 0))
    with np.errstate(divide="ignore"):
        return bits * LN2 / (bandwidth_hz * u)


def tdma_allocation(bits, gains, bandwidth_hz, noise_psd_w_per_hz, tau_min_s, budget_s,
                    tolerance: float = 1e-12, max_iterations: int = 200):
    """Share ``budget_s`` of one band among links to minimise their total energy.

    KKT: every link not at its ``tau_min`` has ``dE_tx/dtau = -lam`` for one
    multiplier ``lam``, solved in closed form with the Lambert W function, and
    ``lam`` is found by bisection in log space so the times fill the budget.
    Returns ``(tau_s, lam, feasible)``; ``tau_s`` is all ``nan`` when the links
    cannot fit even at their power caps.
    """
    bits = np.asarray(bits, dtype=np.float64)
    gains = np.asarray(gains, dtype=np.float64)
    tau_min = np.asarray(tau_min_s, dtype=np.float64)
    if bits.size == 0:
        return np.zeros(0), 0.0, budget_s >= 0
    if not np.all(np.isfinite(tau_min)) or tau_min.sum() > budget_s:
        return np.full(bits.shape, np.nan), math.nan, False

    a = noise_psd_w_per_hz * bandwidth_hz / gains

    def total_time(lam: float) -> float:
        return float(np.maximum(_time_at_multiplier(lam, bits, a, bandwidth_hz), tau_min).sum())

    # At lam_high every link sits at its tau_min, so the sum is at most the budget.
    # As lam falls to 0 the unconstrained times grow without bound.
    lam_high = float(np.max(-tx_energy_derivative(tau_min, bits, gains, bandwidth_hz, noise_psd_w_per_hz)))
    lam_high = max(lam_high, 1e-300)
    lam_low = lam_high
    while total_time(lam_low) <= budget_s and lam_low > 1e-300:
        lam_low *= 1e-3
    for _ in range(max_iterations):
        lam_mid = math.sqrt(lam_low * lam_high)
        if total_time(lam_mid) > budget_s:
            lam_low = lam_mid
        else:
            lam_high = lam_mid
        if lam_high / lam_low - 1.0 < tolerance:
            break
    tau = np.maximum(_time_at_multiplier(lam_high, bits, a, bandwidth_hz), tau_min)
    # Give the rounding slack of the bisection back to the free links so the budget is met exactly.
    free = tau > tau_min * (1.0 + 1e-12)
    slack = budget_s - tau.sum()
    if free.any() and slack > 0:
        tau = tau + np.where(free, slack * tau / tau[free].sum(), 0.0)
    return tau, lam_high, True


def compute_time_s(num_experts, flops_per_expert: float, flops_per_s):
    return np.asarray(num_experts, dtype=np.float64) * flops_per_expert / flops_per_s


def compute_energy_j(num_experts, flops_per_expert: float, energy_j_per_flop):
    return np.asarray(num_experts, dtype=np.float64) * flops_per_expert * energy_j_per_flop
