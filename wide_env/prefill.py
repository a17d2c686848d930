"""The prefilling environment ``WIDE-Prefill-v0``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.channel import ChannelModel
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.env import BUDGET_OBS_LIMIT, CHANNEL_OBS_LIMIT, average_budget_penalty, validate_multibinary_action
from wide_env.prefill_cost import PrefillCostModel, PrefillDecisionCost, PrefillState
from wide_env.profile import build_gate_source, build_profile, softmax


class WidePrefillEnv(gym.Env):
    """Expert selection for a whole prompt at once, one MoE layer per step.

    An episode is one prompt of ``S = prompt_tokens`` tokens passing the ``L``
    MoE layers, so it has ``L`` steps (32 by default). It ends with
    ``truncated=True``, and ``terminated`` is always ``False``. Every token has its
    own gates and Top-K set. Edge node ``n`` receives each token that computes
    at least one expert on it, so its uplink and downlink carry ``u_n * d * b``
    bits and it computes ``c_n`` (token, expert) pairs, all within the prefill
    budget ``prefill_budget_s`` (by default ``S * latency_budget_s``). The
    fading advances once per step, with the step lasting ``step_duration_s``
    or, when that is unset, the prefill budget.

    Observation, ``Box(float32)`` of size ``S*E + N + 1`` (``+1`` with an
    average accuracy budget):

    | index            | meaning                                              | range    | unit |
    |------------------|------------------------------------------------------|----------|------|
    | 0 .. S*E-1       | gate probability of token ``s``, expert ``e`` at     | [0, 1]   | -    |
    |                  | index ``s*E + e``                                    |          |      |
    | S*E .. S*E+N-1   | observed gain of each edge link in dB, minus the     | [-10, 10]| std  |
    |                  | scenario's mean gain in dB, over its spread in dB    |          |      |
    | S*E+N            | MoE layer position ``l / L``                         | [0, 1)   | -    |
    | S*E+N+1          | (average budget only) unused share of the episode's  | [-1, 1]  | -    |
    |                  | budget, ``1 - sum(mean delta) / (eps_avg * L)``      |          |      |

    Action, ``MultiBinary(S*E)``: entry ``s*E + e`` is 1 when token ``s``
    computes expert ``e``. Each token's dropped Top-K experts are replaced by
    the closest expert that token computes, or skipped.

    Reward: ``-energy_j / reference_energy_j`` minus ``accuracy_violation_penalty``
    times the fraction of tokens whose ``delta_s`` exceeds ``accuracy_budget``
    (per-step budget) and minus ``latency_violation_penalty`` when a contacted
    node cannot finish in time. ``reference_energy_j`` is Top-K over the prompt
    at the mean channel with balanced node loads, so Top-K earns about -1 per
    step. With an average budget the mean of the tokens' ``delta_s`` is the
    step's degradation, and the accuracy penalty comes once, at the last step:
    ``accuracy_violation_penalty`` times the excess of the summed step
    degradations over ``eps_avg * L``, divided by ``max(eps_avg, 0.01)``.

    ``info`` carries the decoding environment's terms (``energy_j``,
    ``uplink_energy_j``, ``downlink_energy_j``, ``compute_energy_j``,
    ``failure_energy_j``, ``topk_energy_j``, ``degradation`` as the mean over
    tokens, ``accuracy_budget``, ``accuracy_violation``, ``latency_violation``,
    ``nodes_contacted``, ``experts_computed`` as (token, expert) pairs,
    ``failed_nodes``), plus ``max_degradation``, ``tokens_violating``,
    ``tokens_sent`` and ``token_degradation``, the reward terms under
    ``reward_terms``, and under ``privileged`` the true and observed
    :class:`PrefillState` that the next action applies to. Learned agents must
    not read ``privileged``.
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
        self.cost_model = PrefillCostModel(self.scenario, self.profile)
        channel_scenario = self.scenario
        if self.scenario.step_duration_s is None:
            # A prefill step lasts the prefill budget, which sets the fading correlation between steps.
            # step_duration_s accepts at most 10 s, where the fading is uncorrelated for any f_D above 0.04 Hz.
            channel_scenario = self.scenario.replace(step_duration_s=min(self.scenario.prefill_budget_s, 10.0))
        self.channel = ChannelModel(channel_scenario)
        # An episode draws one prompt, so a recorded trace is replayed from starts that leave S tokens.
        self.gate_source = build_gate_source(self.scenario.replace(tokens_per_episode=self.scenario.prompt_tokens))

        self.num_tokens = self.scenario.prompt_tokens
        self.num_experts = self.profile.num_experts
        self.num_nodes = self.scenario.num_nodes
        self.num_layers = self.profile.num_layers
        self.max_steps = self.num_layers
        self.average_budget = self.scenario.accuracy_budget_mode == "average"
        self.reference_energy_j = self.cost_model.reference_energy_j

        gate_size = self.num_tokens * self.num_experts
        obs_size = gate_size + self.num_nodes + 1 + int(self.average_budget)
        low = np.zeros(obs_size, dtype=np.float32)
        high = np.ones(obs_size, dtype=np.float32)
        channel = slice(gate_size, gate_size + self.num_nodes)
        low[channel], high[channel] = -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT
        if self.average_budget:
            low[-1], high[-1] = -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.MultiBinary(gate_size)

        self._step_index = 0
        self._prompt_gates: np.ndarray | None = None  # (L, S, E)
        self._state: PrefillState | None = None
        self._observed_state: PrefillState | None = None
        self._degradation_sum = 0.0
        self._last_cost: PrefillDecisionCost | None = None

    # -- Gymnasium API --------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)

        channel_seed, gate_seed = self.np_random.integers(0, 2**63 - 1, size=2)
        self.channel.reset(np.random.default_rng(channel_seed))
        self.gate_source.reset(np.random.default_rng(gate_seed))
        logits = np.stack([self.gate_source.next_token() for _ in range(self.num_tokens)], axis=1)  # (L, S, E)
        self._prompt_gates = softmax(logits)

        self._step_index = 0
        self._degradation_sum = 0.0
        self._last_cost = None
        self._build_state()
        return self._observation(), self._info(None, {})

    def step(self, action):
        if self._state is None:
            raise RuntimeError("WidePrefillEnv.step() called before reset()")
        flat = validate_multibinary_action(action, self.num_tokens * self.num_experts)
        computed = flat.reshape(self.num_tokens, self.num_experts)

        cost = self.cost_model.evaluate(self._state, computed)
        self._degradation_sum += cost.degradation
        terms = self._reward_terms(cost)
        reward = float(sum(terms.values()))
        topk_energy = self.cost_model.evaluate(self._state, self.cost_model.top_k_mask(self._state)).energy_j
        self._last_cost = cost

        self._step_index += 1
        truncated = self._step_index >= self.max_steps
        if not truncated:
            self.channel.advance()
            self._build_state()
        info = self._info(cost, terms)
        info["topk_energy_j"] = topk_energy
        return self._observation(), reward, False, truncated, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        return self._render_text()

    # -- reward and info ------------------------------------------------------

    def _reward_terms(self, cost: PrefillDecisionCost) -> dict[str, float]:
        sc = self.scenario
        terms = {"energy": -cost.energy_j / self.reference_energy_j, "accuracy_penalty": 0.0,
                 "latency_penalty": 0.0 if cost.latency_ok else -sc.latency_violation_penalty}
        if not self.average_budget:
            terms["accuracy_penalty"] = -sc.accuracy_violation_penalty * cost.tokens_violating / self.num_tokens
        elif self._step_index + 1 >= self.max_steps:
            if self._degradation_sum > sc.accuracy_budget * self.max_steps:
                terms["accuracy_penalty"] = average_budget_penalty(self._degradation_sum, sc, self.max_steps)
        return terms

    def _info(self, cost: PrefillDecisionCost | None, terms: dict[str, float]) -> dict[str, Any]:
        info: dict[str, Any] = {"step": self._step_index, "reward_terms": terms}
        if cost is not None:
            info.update(cost.as_info())
            if self.average_budget:
                info["accuracy_violation"] = bool(terms["accuracy_penalty"] < 0)
                info["episode_mean_degradation"] = self._degradation_sum / self._step_index
        info["privileged"] = {"state": self._state, "observed_state": self._observed_state}
        return info

    # -- state ----------------------------------------------------------------

    def _build_state(self) -> None:
        layer = self._step_index
        gates = self._prompt_gates[layer]
        self._state = self.cost_model.make_state(layer, gates, self.channel.true_gains)
        if self.scenario.csi_delay_steps == 0 and self.scenario.csi_error_std == 0.0:
            self._observed_state = self._state
        else:
            self._observed_state = self.cost_model.make_state(layer, gates, self.channel.observed_gains)

    def _observation(self) -> np.ndarray:
        state = self._observed_state
        channel = np.clip(self.channel.standardise_db(state.gains), -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT)
        parts = [state.gates.reshape(-1), channel, [state.layer / self.num_layers]]
        if self.average_budget:
            total = self.scenario.accuracy_budget * self.max_steps
            if total > 0:
                unused = 1.0 - self._degradation_sum / total
            else:
                unused = 0.0 if self._degradation_sum else 1.0
            parts.append([np.clip(unused, -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT)])
        return np.concatenate(parts).astype(np.float32)

    # -- masks and views ------------------------------------------------------

    def reachable_experts(self) -> np.ndarray:
        """Experts whose node, by the observed CSI, can serve one token with one expert within the budget."""
        return self.cost_model.single_token_reachable(self._observed_state.gains)[self.cost_model.expert_nodes]

    def action_masks(self) -> np.ndarray:
        """Mask for sb3-contrib's MaskablePPO: ``[may be 0, may be 1]`` per action entry, flattened to ``2*S*E``."""
        mask = np.ones((self.num_tokens, self.num_experts, 2), dtype=bool)
        mask[:, :, 1] = self.reachable_experts()[None, :]
        return mask.reshape(-1)

    @property
    def state(self) -> PrefillState:
        """State that the next action applies to (true channel)."""
        if self._state is None:
            raise RuntimeError("the environment has no state before reset()")
        return self._state

    def _render_text(self) -> str:
        state = self._state
        lines = [f"WIDE-Prefill  layer {state.layer}/{self.num_layers}  {self.num_tokens} tokens  "
                 f"step {self._step_index}/{self.max_steps}"]
        gains_db = 10 * np.log10(state.gains)
        lines.append("nodes  " + "  ".join(f"n{n + 1}:{g:6.1f}dB" for n, g in enumerate(gains_db)))
        for token in range(self.num_tokens):
            top = ", ".join(f"e{int(e)}@n{self.cost_model.expert_nodes[e]} {state.gates[token, e]:.2f}"
                            for e in state.top_k[token])
            lines.append(f"token {token:3d}  Top-K {top}")
        if self._last_cost is not None:
            c = self._last_cost
            lines.append(f"last   {c.experts_computed} pairs on {c.nodes_contacted} nodes  "
                         f"energy {c.energy_j * 1e3:.3f} mJ (up {c.uplink_energy_j * 1e3:.3f}, "
                         f"down {c.downlink_energy_j * 1e3:.3f}, compute {c.compute_energy_j * 1e3:.3f}, "
                         f"failure {c.failure_energy_j * 1e3:.3f})  mean delta {c.degradation:.3f}/"
                         f"{c.accuracy_budget:.3f}, {c.tokens_violating} tokens over  "
                         f"{'latency violated' if not c.latency_ok else 'in time'}")
        return "\n".join(lines)
