"""The decoding environment ``WIDE-Decode-v0``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.channel import ChannelModel
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.cost import CostModel, DecisionCost, NodeTables, StepBatch, StepState
from wide_env.profile import build_gate_source, build_profile, softmax

# Clip range of the standardised channel observation, in standard deviations.
CHANNEL_OBS_LIMIT = 10.0
# Clip range of the remaining average accuracy budget, as a fraction of the episode's budget.
BUDGET_OBS_LIMIT = 1.0
# Steps whose channel and node tables are computed in one call, rounded down to whole tokens.
CHANNEL_BLOCK_STEPS = 128


def _slice_tables(tables: NodeTables, rows: slice) -> NodeTables:
    return NodeTables(energy_j=tables.energy_j[rows], uplink_energy_j=tables.uplink_energy_j[rows],
                      downlink_energy_j=tables.downlink_energy_j[rows],
                      compute_energy_j=tables.compute_energy_j[rows], reachable=tables.reachable[rows])


def average_budget_penalty(degradation_sum, scenario: ScenarioConfig, num_steps: int):
    """Compute the end-of-episode accuracy penalty under an average budget (zero or negative).

    It is ``accuracy_violation_penalty`` times the excess of ``sum(delta)`` over
    ``eps_avg * num_steps``, divided by ``max(eps_avg, 0.01)`` so that a zero
    budget stays finite. Takes a float or a numpy array of sums.
    """
    excess = np.maximum(np.asarray(degradation_sum, dtype=np.float64) - scenario.accuracy_budget * num_steps, 0.0)
    penalty = -scenario.accuracy_violation_penalty * excess / max(scenario.accuracy_budget, 0.01)
    return float(penalty) if penalty.ndim == 0 else penalty


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
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(bool)
    # For integers, min and max bound every entry; floats also need each entry to be exactly 0 or 1.
    valid = (array.min() >= 0 and array.max() <= 1) if kind in "iu" else bool(((array == 0) | (array == 1)).all())
    if not valid:
        bad = array[(array != 0) & (array != 1)]
        raise ValueError(f"invalid {name}: expected shape ({size},) of 0/1 values (MultiBinary({size})), "
                         f"got entries {bad[:4].tolist()}")
    return array.astype(bool)


def decode_observation_space(num_experts: int, num_nodes: int, average_budget: bool) -> spaces.Box:
    """Observation space of ``WIDE-Decode-v0``; the layout is documented on ``WideDecodeEnv``."""
    size = num_experts + num_nodes + 2 + int(average_budget)
    low = np.zeros(size, dtype=np.float32)
    high = np.ones(size, dtype=np.float32)
    channel = slice(num_experts, num_experts + num_nodes)
    low[channel], high[channel] = -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT
    if average_budget:
        low[-1], high[-1] = -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT
    return spaces.Box(low, high, dtype=np.float32)


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
        self.channel = ChannelModel(self.scenario, block_steps=CHANNEL_BLOCK_STEPS)
        self.gate_source = build_gate_source(self.scenario)

        self.num_experts = self.profile.num_experts
        self.num_nodes = self.scenario.num_nodes
        self.num_layers = self.profile.num_layers
        self.max_steps = self.scenario.steps_per_episode
        self.average_budget = self.scenario.accuracy_budget_mode == "average"
        self.reference_energy_j = self.cost_model.reference_energy_j

        self.observation_space = decode_observation_space(self.num_experts, self.num_nodes, self.average_budget)
        self.action_space = spaces.MultiBinary(self.num_experts)

        self._step_index = 0
        # Per-token data of the current token, one row per MoE layer (see _start_token).
        self._token_steps: StepBatch | None = None
        self._token_observed_steps: StepBatch | None = None
        self._token_observations: np.ndarray | None = None
        self._token_topk_energy_j: list[float] = []
        # Channel of the coming steps and its node tables, refilled every _channel_block_steps steps.
        self._channel_block: dict[str, Any] | None = None
        self._channel_block_steps = self.num_layers * max(1, CHANNEL_BLOCK_STEPS // self.num_layers)
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
        self._channel_block = None
        self._start_token()
        self._build_state()
        return self._observation(), self._info(None, {})

    def step(self, action):
        if self._state is None:
            raise RuntimeError("WideDecodeEnv.step() called before reset()")
        computed = validate_multibinary_action(action, self.num_experts)

        cost = self._simulate(computed)
        terms = self._reward_terms(cost)
        reward = float(terms["energy"] + terms["accuracy_penalty"] + terms["latency_penalty"])
        topk_energy = self._token_topk_energy_j[self._state.layer]
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
            if self._degradation_sum > sc.accuracy_budget * self.max_steps:
                terms["accuracy_penalty"] = average_budget_penalty(self._degradation_sum, sc, self.max_steps)
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
            self._start_token()
        self._build_state()

    def _start_token(self) -> None:
        """Draw the next token's gates and compute everything its L steps need but the action.

        The channel and the gates do not depend on the actions, so the states,
        node tables, Top-K energies and observations of a whole token are
        computed at once, element-wise as they would be step by step. The node
        tables depend on the channel only and are computed for several tokens
        at a time (see ``_load_channel_block``).
        """
        layers = self.num_layers
        token = self._step_index // layers
        gates = softmax(self.gate_source.next_token())
        rows = self._channel_rows(layers)
        block = self._channel_block
        layer_index = np.arange(layers)
        token_index = np.full(layers, token)
        true_tables = _slice_tables(block["true_tables"], rows)
        self._token_steps = self.cost_model.make_batch(layer_index, token_index, gates, block["true_gains"][rows],
                                                       tables=true_tables)
        if block["observed_gains"] is block["true_gains"]:
            self._token_observed_steps = self._token_steps
        else:
            self._token_observed_steps = self.cost_model.make_batch(
                layer_index, token_index, gates, block["observed_gains"][rows],
                tables=_slice_tables(block["observed_tables"], rows))
        top_k_masks = np.zeros((layers, self.num_experts), dtype=bool)
        np.put_along_axis(top_k_masks, self._token_steps.top_k, True, axis=-1)
        self._token_topk_energy_j = self.cost_model.energy_batch(self._token_steps, top_k_masks).tolist()

        positions = np.stack([layer_index / layers, token_index / self.scenario.tokens_per_episode], axis=-1)
        self._token_observations = np.concatenate([gates, block["channel_observation"][rows], positions],
                                                  axis=-1).astype(np.float32)

    def _channel_rows(self, num_steps: int) -> slice:
        """Rows of the channel block for the current step and the ``num_steps - 1`` after it."""
        block = self._channel_block
        if block is None or self._step_index + num_steps > block["start"] + len(block["true_gains"]):
            self._load_channel_block(max(num_steps, self._channel_block_steps))
            block = self._channel_block
        start = self._step_index - block["start"]
        return slice(start, start + num_steps)

    def _load_channel_block(self, num_steps: int) -> None:
        """Simulate the channel of the next ``num_steps`` steps and compute their node tables."""
        true_gains, observed_gains = self.channel.lookahead(num_steps)
        true_tables = self.cost_model.node_tables(true_gains)
        observed_tables = true_tables if observed_gains is true_gains else self.cost_model.node_tables(observed_gains)
        channel = np.clip(self.channel.standardise_db(observed_gains), -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT)
        self._channel_block = {"start": self._step_index, "true_gains": true_gains, "observed_gains": observed_gains,
                               "true_tables": true_tables, "observed_tables": observed_tables,
                               "channel_observation": channel}

    def _build_state(self) -> None:
        layer = self._step_index % self.num_layers
        self._state = self._token_steps.state(layer)
        if self._token_observed_steps is self._token_steps:
            self._observed_state = self._state
        else:
            self._observed_state = self._token_observed_steps.state(layer)

    def _observation(self) -> np.ndarray:
        layer = self._step_index % self.num_layers if self._step_index < self.max_steps else self.num_layers - 1
        row = self._token_observations[layer]
        if not self.average_budget:
            return row.copy()
        total = self.scenario.accuracy_budget * self.max_steps
        if total > 0:
            unused = 1.0 - self._degradation_sum / total
        else:
            # A zero budget is fully used by any degradation at all.
            unused = 0.0 if self._degradation_sum else 1.0
        observation = np.empty(row.size + 1, dtype=np.float32)
        observation[:-1] = row
        observation[-1] = np.clip(unused, -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT)
        return observation

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
