"""Lagrangian SiftMoE baseline for an average accuracy budget.

With the episode budget ``(1/T) sum_t delta_t <= eps_avg`` an agent may spend
accuracy where the channel is bad and save it where it is good. The baseline
solves, at every step and exactly,

    minimise E(A) / E_ref + mu * delta(A)

(the oracle with ``degradation_price = mu``), by default with one price ``mu``
for the whole episode. :func:`tune_price` sets ``mu`` by bisection on training
episodes: the smallest price whose mean ``delta`` over those episodes meets
the budget. The mean ``delta`` of the per-step minimisers does not increase
with ``mu``, which is what makes the bisection valid. Under imperfect CSI a
failed node can break this, so the tuning measures ``delta`` as charged on the
true channel and keeps the feasible end of its bracket.

A fixed price meets the budget on average over episodes, not in each one.
With ``feedback > 0`` the price follows the episode's spending, an integral
controller on the cumulative budget that aims at ``eps = (1 - margin) * eps_avg``:

    mu_t = mu * exp(feedback * (sum_{s<t} delta_s - eps * t) / (max(eps, 0.01) * T))

so overspending by ``1/feedback`` of the episode's budget multiplies the price
by e, and underspending as much divides it by e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.base import Policy
from agents.baselines import privileged_state
from agents.oracle import SiftMoEOracle
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.cost import StepState
from wide_env.env import WideDecodeEnv

# Upper end of the price search. At this price a degradation difference of 1e-4 outweighs
# 100 reference energies, so larger prices change no decision in practice.
MAX_PRICE = 1e6


def step_price(price: float, feedback: float, spent: float, steps_done: int, budget: float,
               episode_steps: int) -> float:
    """Return the next step's price: ``price`` scaled by the episode's overspending so far (see the module docstring)."""
    if feedback == 0.0:
        return price
    # The same floor on the budget as the environment's end-of-episode penalty.
    scale = max(budget, 0.01) * episode_steps
    exponent = feedback * (spent - budget * steps_done) / scale
    # Clipping the exponent avoids overflow; the price stays within [0, MAX_PRICE].
    return min(price * math.exp(min(max(exponent, -50.0), 50.0)), MAX_PRICE)


def _check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise ValueError(f"invalid margin: expected a fraction of the budget in [0, 1), got {margin!r}")
    return float(margin)


def _check_price(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: expected a finite value >= 0, got {value!r}")
    return float(value)


class LagrangianPolicy(Policy):
    """Per-step ``min E(A)/E_ref + mu_t * delta(A)``, on the true or the observed CSI.

    ``mu_t`` is ``price`` when ``feedback`` is 0. Otherwise it follows the
    episode's spending of the average budget (see the module docstring),
    aiming at ``(1 - margin)`` times the budget. The policy then counts
    ``delta`` from the ``info`` of each step, so ``decide`` must see every step
    of an episode in order. A step count of 0 in ``info`` starts a new episode.
    """

    uses_privileged = True

    def __init__(self, env, price: float, csi: str = "true", feedback: float = 0.0,
                 accuracy_budget: float | None = None, margin: float = 0.0):
        super().__init__(env)
        self.price = _check_price("price", price)
        self.feedback = _check_price("feedback", feedback)
        if csi not in ("true", "observed"):
            raise ValueError(f"invalid csi: expected 'true' or 'observed', got {csi!r}")
        self.csi = csi
        budget = _check_price("accuracy_budget", self.env.scenario.accuracy_budget if accuracy_budget is None
                              else accuracy_budget)
        self.budget = budget * (1.0 - _check_margin(margin))
        self.episode_steps = self.env.max_steps
        suffix = "" if csi == "true" else "-observed"
        self.name = ("lagrangian" if self.feedback == 0.0 else "lagrangian-adaptive") + suffix
        self.oracle = SiftMoEOracle(self.cost_model, degradation_price=self.price)
        self._spent = 0.0

    def reset(self, seed: int | None = None) -> None:
        self._spent = 0.0

    def current_price(self, info: dict[str, Any]) -> float:
        """Price of the step that ``info`` leads to, after counting the last step's ``delta``."""
        steps_done = int(info.get("step", 0))
        if steps_done == 0:
            self._spent = 0.0
        elif "degradation" in info:
            self._spent += float(info["degradation"])
        return step_price(self.price, self.feedback, self._spent, steps_done, self.budget, self.episode_steps)

    def decide(self, observation: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        price = self.current_price(info)
        oracle = self.oracle if price == self.price else SiftMoEOracle(self.cost_model, degradation_price=price)
        return self._mask_to_action(oracle.solve(privileged_state(info, self.csi)).x)


@dataclass
class PriceTuning:
    """Outcome of :func:`tune_price`.

    ``price`` is the tuned ``mu``; ``mean_degradation`` and ``mean_energy_j`` are
    the per-step means on the training episodes at that price, and
    ``feasible`` is whether they meet ``budget``. ``floor_degradation`` is
    the least mean ``delta`` any decisions reach on those episodes (the
    per-step minimum). ``history`` lists every price tried as ``(price,
    mean_degradation, mean_energy_j)``.
    """

    price: float
    budget: float
    mean_degradation: float
    mean_energy_j: float
    feasible: bool
    floor_degradation: float
    episodes: int
    steps: int
    history: list[tuple[float, float, float]] = field(default_factory=list)


def record_states(env: WideDecodeEnv, episodes: int, seed: int) -> list[list[tuple[StepState, StepState]]]:
    """Record the (true, observed) states of every step of ``episodes`` episodes from ``env.reset(seed=seed + i)``.

    The channel and the gates of ``WIDE-Decode-v0`` do not depend on the
    actions, so the states can be recorded once with any action and replayed
    for every price.
    """
    base = getattr(env, "unwrapped", env)
    if not isinstance(base, WideDecodeEnv):
        raise TypeError(f"record_states needs a WIDE-Decode-v0 env, got {type(base).__name__}")
    nothing = np.zeros(base.num_experts, dtype=np.int8)
    recorded = []
    for episode in range(episodes):
        _, info = base.reset(seed=seed + episode)
        steps = []
        truncated = False
        while not truncated:
            privileged = info["privileged"]
            steps.append((privileged["state"], privileged["observed_state"]))
            _, _, _, truncated, info = base.step(nothing)
        recorded.append(steps)
    return recorded


def tune_price(env_or_scenario: WideDecodeEnv | ScenarioConfig | dict | str | None = None, *,
               budget: float | None = None, episodes: int = 4, seed: int = 0, csi: str = "true",
               feedback: float = 0.0, margin: float = 0.0, relative_tolerance: float = 1e-3,
               max_iterations: int = 60) -> PriceTuning:
    """Tune the price ``mu`` of :class:`LagrangianPolicy` by bisection on training episodes.

    ``env_or_scenario`` is a ``WIDE-Decode-v0`` env or anything
    :func:`resolve_scenario` accepts. ``budget`` defaults to the scenario's
    ``accuracy_budget`` (the average budget ``eps_avg``). The episodes are
    ``reset(seed=seed + i)`` for ``i < episodes``; keep them apart from the
    evaluation seeds. ``feedback`` and ``margin`` are those of the
    :class:`LagrangianPolicy` the price is meant for: the tuning simulates its
    controller and looks for the least price whose mean ``delta`` meets
    ``(1 - margin)`` times the budget (the full budget when only that is
    reachable). The
    bracket starts at ``[0, 1]`` and doubles its upper end until the mean
    ``delta`` meets the budget, then halves until its ends are within
    ``relative_tolerance`` of each other. The result is the upper,
    budget-meeting end. When no decisions can meet the budget (the per-step
    least ``delta`` averages above it), the search aims instead at that floor
    plus 0.1 % and returns with ``feasible=False``.
    """
    env = env_or_scenario if isinstance(getattr(env_or_scenario, "unwrapped", None), WideDecodeEnv) \
        else WideDecodeEnv(resolve_scenario(env_or_scenario))
    base = env.unwrapped
    cost_model = base.cost_model
    episode_budget = base.scenario.accuracy_budget if budget is None else float(budget)
    if not math.isfinite(episode_budget) or episode_budget < 0:
        raise ValueError(f"invalid budget: expected a finite value >= 0, got {budget!r}")
    aim = episode_budget * (1.0 - _check_margin(margin))
    if episodes < 1:
        raise ValueError(f"invalid episodes: expected a positive integer, got {episodes!r}")
    if csi not in ("true", "observed"):
        raise ValueError(f"invalid csi: expected 'true' or 'observed', got {csi!r}")

    feedback = _check_price("feedback", feedback)
    recorded = record_states(base, episodes, seed)
    num_steps = sum(len(steps) for steps in recorded)
    history: list[tuple[float, float, float]] = []
    least_delta = SiftMoEOracle(cost_model, accuracy_budget=0.0)
    floor = float(np.mean([least_delta.solve(true_state).degradation
                           for steps in recorded for true_state, _ in steps]))
    feasible = floor <= episode_budget + 1e-12
    if floor <= aim + 1e-12:
        target = aim
    elif feasible:
        target = episode_budget
    else:
        target = floor * (1.0 + 1e-3)

    def measure(price: float) -> tuple[float, float]:
        fixed = SiftMoEOracle(cost_model, degradation_price=price)
        degradation = energy = 0.0
        for steps in recorded:
            spent = 0.0
            for index, (true_state, observed_state) in enumerate(steps):
                price_now = step_price(price, feedback, spent, index, aim, len(steps))
                oracle = fixed if price_now == price else SiftMoEOracle(cost_model, degradation_price=price_now)
                decision = oracle.solve(true_state if csi == "true" else observed_state).x
                cost = cost_model.evaluate(true_state, decision)  # charged on the true channel
                spent += cost.degradation
                degradation += cost.degradation
                energy += cost.energy_j
        result = (degradation / num_steps, energy / num_steps)
        history.append((price, *result))
        return result

    def meets(mean_degradation: float) -> bool:
        return mean_degradation <= target + 1e-12

    def outcome(price: float, measured: tuple[float, float]) -> PriceTuning:
        met = feasible and measured[0] <= episode_budget + 1e-12
        return PriceTuning(price, episode_budget, *measured, met, floor, episodes, num_steps, history)

    low, high = 0.0, 1.0
    at_low = measure(low)
    if meets(at_low[0]):
        return outcome(low, at_low)
    at_high = measure(high)
    while not meets(at_high[0]):
        if high >= MAX_PRICE:
            return outcome(high, at_high)
        low, high = high, min(2.0 * high, MAX_PRICE)
        at_high = measure(high)
    for _ in range(max_iterations):
        if high - low <= relative_tolerance * high:
            break
        middle = 0.5 * (low + high)
        at_middle = measure(middle)
        if meets(at_middle[0]):
            high, at_high = middle, at_middle
        else:
            low = middle
    return outcome(high, at_high)
