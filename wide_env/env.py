"""The decoding environment ``WIDE-Decode-v0``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.channel import ChannelModel
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.cost import CostModel, DecisionCost, StepState
from wide_env.profile import build_gate_source, build_profile, softmax

# Clip range of the standardised channel observation, in standard deviations.
CHANNEL_OBS_LIMIT = 10.0
# Clip range of the remaining average accuracy budget, as a fraction of the episode's budget.
BUDGET_OBS_LIMIT = 1.0


def validate_multibinary_action(action: Any, size: int, name: str = "action") -> np.ndarray:
    """Return ``action`` as a boolean mask of length ``size`` or raise naming what is wrong.

    Accepted: any integer, boolean or floating array of shape ``(size,)`` whose
    entries are exactly 0 or 1 (SB3 passes MultiBinary samples as float32).
    """
    array = np.asarray(action)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"invalid {name}: expected a numeric or boolean array of 0/1 values (MultiBinary({size})), "
            f"got dtype {array.dtype}"
        )
    if array.shape != (size,):
        raise ValueError(
            f"invalid {name}: expected shape ({size},) of 0/1 values (MultiBinary({size})), got shape {array.shape}"
        )
    if array.dtype.kind != "b" and not np.all((array == 0) | (array == 1)):
        bad = array[(array != 0) & (array != 1)]
        raise ValueError(f"invalid {name}: expected shape ({size},) of 0/1 values (MultiBinary({size})), "
                         f"got entries {bad[:4].tolist()}")
    return array.astype(bool)


class WideDecodeEnv(gym.Env):
    """Per-token expert selection for wireless distributed MoE decoding.

    One step is one token passing one MoE layer. An episode generates
    ``tokens_per_episode`` tokens through all ``L`` MoE layers, so it has
    ``tokens_per_episode * L`` steps (512 by default) and ends with
    ``truncated=True``; ``terminated`` is always ``False`` because the task
    has no terminal state.

    Observation, ``Box(float32)`` of size ``E + N + 2`` (``+1`` with an
    average accuracy budget), with ``E`` experts and ``N`` edge nodes:

    | index          | meaning                                                | range    | unit |
    |----------------|--------------------------------------------------------|----------|------|
    | 0 .. E-1       | router gate probability of each expert (softmax)       | [0, 1]   | -    |
    | E .. E+N-1     | observed gain of each edge link in dB, minus the       | [-10, 10]| std  |
    |                | scenario's mean gain in dB, over its spread in dB      |          |      |
    | E+N            | MoE layer position ``l / L``                           | [0, 1)   | -    |
    | E+N+1          | token position ``t / tokens_per_episode``              | [0, 1)   | -    |
    | E+N+2          | (average budget only) unused share of the episode's    | [-1, 1]  | -    |
    |                | accuracy budget, ``1 - sum(delta) / (eps_avg * steps)``|          |      |

    Action, ``MultiBinary(E)``: entry ``e`` is 1 when expert ``e`` is computed.
    Top-K experts that are not computed are replaced by the closest computed
    expert or skipped, whichever the degradation bound prefers.

    Reward: ``-energy_j / reference_energy_j`` minus ``accuracy_violation_penalty``
    when ``delta > accuracy_budget`` (per-step budget) and minus
    ``latency_violation_penalty`` when a contacted node cannot finish within
    ``latency_budget_s``. ``reference_energy_j`` is the Top-K energy at the mean
    channel, so Top-K earns about -1 per step. With an average budget the
    accuracy penalty comes once, at the last step: ``accuracy_violation_penalty``
    times the excess of ``sum(delta)`` over ``eps_avg * steps``, divided by
    ``max(eps_avg, 0.01)``.

    ``info`` holds the step's cost terms in SI units (``energy_j``,
    ``uplink_energy_j``, ``downlink_energy_j``, ``compute_energy_j``,
    ``failure_energy_j``, ``topk_energy_j``, ``degradation``,
    ``accuracy_budget``, ``accuracy_violation``, ``latency_violation``,
    ``nodes_contacted``, ``experts_computed``, ``failed_nodes``), the reward
    terms under ``reward_terms``, and under ``privileged`` the state that the
    next action applies to (true gains, gates, Top-K) for oracles and
    evaluation. Learned agents must not read ``privileged``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, scenario: ScenarioConfig | dict | str | None = None, render_mode: str | None = None,
                 **overrides: Any):
        self.scenario = resolve_scenario(scenario, **overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"invalid render_mode: expected None or one of {self.metadata['render_modes']}, "
                             f"got {render_mode!r}")
        self.render_mode = render_mode

        self.profile = build_profile(self.scenario)
        self.cost_model = CostModel(self.scenario, self.profile)
        self.channel = ChannelModel(self.scenario)
        self.gate_source = build_gate_source(self.scenario)

        self.num_experts = self.profile.num_experts
        self.num_nodes = self.scenario.num_nodes
        self.num_layers = self.profile.num_layers
        self.max_steps = self.scenario.steps_per_episode
        self.average_budget = self.scenario.accuracy_budget_mode == "average"
        self.reference_energy_j = self.cost_model.reference_energy_j

        obs_size = self.num_experts + self.num_nodes + 2 + int(self.average_budget)
        low = np.zeros(obs_size, dtype=np.float32)
        high = np.ones(obs_size, dtype=np.float32)
        channel = slice(self.num_experts, self.num_experts + self.num_nodes)
        low[channel], high[channel] = -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT
        if self.average_budget:
            low[-1], high[-1] = -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.MultiBinary(self.num_experts)

        self._step_index = 0
        self._token_gates: np.ndarray | None = None
        self._state: StepState | None = None
        self._observed_state: StepState | None = None
        self._degradation_sum = 0.0
        self._last_cost: DecisionCost | None = None
        self._last_action: np.ndarray | None = None

    # -- Gymnasium API --------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)

        channel_seed, gate_seed = self.np_random.integers(0, 2**63 - 1, size=2)
        self.channel.reset(np.random.default_rng(channel_seed))
        self.gate_source.reset(np.random.default_rng(gate_seed))

        self._step_index = 0
        self._degradation_sum = 0.0
        self._last_cost = None
        self._last_action = None
        self._token_gates = softmax(self.gate_source.next_token())
        self._build_state()
        return self._observation(), self._info(None, {})

    def step(self, action):
        if self._state is None:
            raise RuntimeError("WideDecodeEnv.step() called before reset()")
        computed = validate_multibinary_action(action, self.num_experts)

        cost = self._simulate(computed)
        terms = self._reward_terms(cost)
        reward = float(sum(terms.values()))
        topk_energy = self.cost_model.evaluate(self._state, self.cost_model.top_k_mask(self._state)).energy_j
        self._last_cost, self._last_action = cost, computed

        self._step_index += 1
        truncated = self._step_index >= self.max_steps
        if not truncated:
            self._advance()
        info = self._info(cost, terms)
        info["topk_energy_j"] = topk_energy
        return self._observation(), reward, False, truncated, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        return self._render_text()

    # -- step hooks -----------------------------------------------------------

    def _simulate(self, computed: np.ndarray) -> DecisionCost:
        cost = self.cost_model.evaluate(self._state, computed)
        self._degradation_sum += cost.degradation
        return cost

    def _reward_terms(self, cost: DecisionCost) -> dict[str, float]:
        sc = self.scenario
        terms = {"energy": -cost.energy_j / self.reference_energy_j, "accuracy_penalty": 0.0,
                 "latency_penalty": 0.0 if cost.latency_ok else -sc.latency_violation_penalty}
        if not self.average_budget:
            if not cost.accuracy_ok:
                terms["accuracy_penalty"] = -sc.accuracy_violation_penalty
        elif self._step_index + 1 >= self.max_steps:
            excess = self._degradation_sum - sc.accuracy_budget * self.max_steps
            if excess > 0:
                terms["accuracy_penalty"] = -sc.accuracy_violation_penalty * excess / max(sc.accuracy_budget, 0.01)
        return terms

    def _info(self, cost: DecisionCost | None, terms: dict[str, float]) -> dict[str, Any]:
        info: dict[str, Any] = {"step": self._step_index, "reward_terms": terms}
        if cost is not None:
            info.update(cost.as_info())
            if self.average_budget:
                info["accuracy_violation"] = bool(terms["accuracy_penalty"] < 0)
                info["episode_mean_degradation"] = self._degradation_sum / self._step_index
        info["privileged"] = {"state": self._state, "observed_state": self._observed_state}
        return info

    # -- state ----------------------------------------------------------------

    def _advance(self) -> None:
        self.channel.advance()
        if self._step_index % self.num_layers == 0:
            self._token_gates = softmax(self.gate_source.next_token())
        self._build_state()

    def _build_state(self) -> None:
        token, layer = divmod(self._step_index, self.num_layers)
        gates = self._token_gates[layer]
        self._state = self.cost_model.make_state(layer, token, gates, self.channel.true_gains)
        if self.scenario.csi_delay_steps == 0 and self.scenario.csi_error_std == 0.0:
            self._observed_state = self._state
        else:
            self._observed_state = self.cost_model.make_state(layer, token, gates, self.channel.observed_gains)

    def _observation(self) -> np.ndarray:
        state = self._observed_state
        channel = np.clip(self.channel.standardise_db(state.gains), -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT)
        parts = [state.gates, channel,
                 [state.layer / self.num_layers, state.token / self.scenario.tokens_per_episode]]
        if self.average_budget:
            total = self.scenario.accuracy_budget * self.max_steps
            unused = 1.0 - self._degradation_sum / total if total > 0 else (0.0 if self._degradation_sum else 1.0)
            parts.append([np.clip(unused, -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT)])
        return np.concatenate(parts).astype(np.float32)

    # -- masks and views ------------------------------------------------------

    def reachable_experts(self) -> np.ndarray:
        """Experts whose node, by the observed CSI, can serve one expert within the budget."""
        reachable_single = self._observed_state.tables.reachable[:, 1]
        return reachable_single[self.cost_model.expert_nodes]

    def action_masks(self) -> np.ndarray:
        """Mask for sb3-contrib's MaskablePPO: ``[may be 0, may be 1]`` per expert, flattened to ``2E``."""
        mask = np.ones((self.num_experts, 2), dtype=bool)
        mask[:, 1] = self.reachable_experts()
        return mask.reshape(-1)

    @property
    def state(self) -> StepState:
        """State that the next action applies to (true channel)."""
        if self._state is None:
            raise RuntimeError("the environment has no state before reset()")
        return self._state

    def _render_text(self) -> str:
        state = self._state
        top = set(int(i) for i in state.top_k)
        lines = [f"WIDE-Decode  token {state.token}/{self.scenario.tokens_per_episode}  "
                 f"layer {state.layer}/{self.num_layers}  step {self._step_index}/{self.max_steps}"]
        gains_db = 10 * np.log10(state.gains)
        lines.append("nodes  " + "  ".join(f"n{n + 1}:{g:6.1f}dB" for n, g in enumerate(gains_db)))
        row = []
        for e in range(self.num_experts):
            mark = "*" if e in top else " "
            row.append(f"e{e}@n{self.cost_model.expert_nodes[e]}{mark}{state.gates[e]:.2f}")
        lines.append("gates  " + " ".join(row) + "   (* = Top-K)")
        if self._last_cost is not None:
            c = self._last_cost
            chosen = np.flatnonzero(self._last_action).tolist()
            lines.append(f"last   computed {chosen}  energy {c.energy_j * 1e3:.3f} mJ "
                         f"(up {c.uplink_energy_j * 1e3:.3f}, down {c.downlink_energy_j * 1e3:.3f}, "
                         f"compute {c.compute_energy_j * 1e3:.3f}, failure {c.failure_energy_j * 1e3:.3f})  "
                         f"delta {c.degradation:.3f}/{c.accuracy_budget:.3f}  "
                         f"{'latency violated' if not c.latency_ok else 'in time'}")
        return "\n".join(lines)
