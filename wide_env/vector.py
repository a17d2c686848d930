"""A batched ``WIDE-Decode-v0``: ``B`` copies stepped as numpy arrays, and an adapter to SB3's ``VecEnv``.

``WideDecodeVectorEnv`` is the ``vector_entry_point`` of ``WIDE-Decode-v0``::

    envs = gymnasium.make_vec("WIDE-Decode-v0", num_envs=1024, vectorization_mode="vector_entry_point")

``make_sb3_vec_env`` wraps it for Stable-Baselines3.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from wide_env.channel import ChannelBatch, NormalStreams
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.cost import CostModel, DecisionCostBatch, StepBatch, sum_last_axis
from wide_env.env import BUDGET_OBS_LIMIT, CHANNEL_OBS_LIMIT, average_budget_penalty, decode_observation_space
from wide_env.profile import SyntheticGateSource, build_gate_source, build_profile

# Largest seed drawn for the per-episode generators, as in WideDecodeEnv.reset.
_SEED_BOUND = 2**63 - 1
# Memory for random numbers drawn ahead, per stream (channel, gates), in bytes. Larger blocks mean
# fewer per-copy generator calls, the one loop over copies that remains.
RANDOM_BLOCK_BYTES = 16 * 2**20


class WideDecodeVectorEnv(VectorEnv):
    """``num_envs`` independent copies of ``WIDE-Decode-v0`` stepped in one call.

    Copy ``i`` produces exactly the transitions of a ``WideDecodeEnv`` that is
    reset with the same seed and given the same actions: the same
    observations, rewards, flags and cost terms, to the last bit under FDMA.
    Like Gymnasium's ``SyncVectorEnv``, ``reset(seed=s)`` seeds copy ``i``
    with ``s + i``. Each copy draws its random numbers from its own
    generators, in blocks of one token; everything else is array arithmetic
    over the copies.

    Spaces: each copy has the single env's observation space and either
    ``MultiBinary(E)`` or, with ``discrete_subsets=True``, the
    ``Discrete(2^K)`` subsets of the current Top-K set of
    ``wide_env.wrappers.TopKSubsetAction``. ``observation_space`` and
    ``action_space`` are the batched spaces.

    Autoreset, set by ``autoreset_mode`` and stored in
    ``metadata["autoreset_mode"]``:

    - ``SAME_STEP`` (default): a copy whose episode ends is reset within the
      same ``step``. The returned observation is the first of its next
      episode. ``infos["final_obs"]`` (an object array, ``None`` for the other
      copies) contains the last one, and ``infos["final_info"]`` the step's info.
    - ``NEXT_STEP``: Gymnasium's default. The copy is reset on the next
      ``step``, which ignores its action and returns reward 0 with both flags
      false; the step-cost entries of ``infos`` are masked out for it.
    - ``DISABLED``: stepping a finished copy raises ``RuntimeError``; reset
      it with ``reset(options={"reset_mask": mask})``.

    ``infos`` holds one array per key of the single env's ``info`` (cost terms
    in SI units, ``topk_energy_j``, ``step``, ``reward_terms``), each with the
    boolean mask ``"_" + key`` that Gymnasium's vector envs use; ``failed_nodes``
    is a ``(B, N + 1)`` mask. ``infos["privileged"]`` holds the state that the
    next actions apply to as arrays (``layer``, ``token``, ``gates``,
    ``true_gains``, ``observed_gains``); ``step_batch()`` turns it into a
    ``StepBatch`` for the batched oracle. Learned agents must not read it.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}
    render_mode = None

    def __init__(self, num_envs: int, scenario: ScenarioConfig | dict | str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP, discrete_subsets: bool = False,
                 **overrides: Any):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"invalid num_envs: expected a positive integer, got {num_envs!r}")
        try:
            self.autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"invalid autoreset_mode: expected one of {[m.value for m in AutoresetMode]}, "
                             f"got {autoreset_mode!r}") from None
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.num_envs = int(num_envs)
        self.scenario = resolve_scenario(scenario, **overrides)
        self.discrete_subsets = bool(discrete_subsets)

        self.profile = build_profile(self.scenario)
        self.cost_model = CostModel(self.scenario, self.profile)
        self.num_experts = self.profile.num_experts
        self.num_nodes = self.scenario.num_nodes
        self.num_layers = self.profile.num_layers
        self.top_k = self.profile.top_k
        self.max_steps = self.scenario.steps_per_episode
        self.average_budget = self.scenario.accuracy_budget_mode == "average"
        self.reference_energy_j = self.cost_model.reference_energy_j
        draws_per_step = ChannelBatch(self.scenario, 1).draws_per_step
        self.channel = ChannelBatch(self.scenario, self.num_envs,
                                    block_steps=_block_rows(self.num_envs, draws_per_step, self.max_steps))

        self.single_observation_space = decode_observation_space(self.num_experts, self.num_nodes,
                                                                 self.average_budget)
        if self.discrete_subsets:
            self.single_action_space = spaces.Discrete(2**self.top_k)
            self._subset_bits = ((np.arange(2**self.top_k)[:, None] >> np.arange(self.top_k)) & 1).astype(bool)
        else:
            self.single_action_space = spaces.MultiBinary(self.num_experts)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._init_gate_sources()
        self._allocate()

    # -- set-up ---------------------------------------------------------------

    def _init_gate_sources(self) -> None:
        template = build_gate_source(self.scenario)
        self._synthetic = self._trace = None
        self._gate_sources = None
        if isinstance(template, SyntheticGateSource):
            # The synthetic AR(1) logits are updated for all copies at once; only the draws are per copy.
            self._synthetic = template
        elif type(template).__name__ == "TraceGateSource":
            # A trace is replayed from one random start per episode, the same arithmetic as
            # TraceGateSource.reset and next_token for all copies at once.
            self._trace = template
            self._trace_start = np.zeros(self.num_envs, dtype=np.int64)
            self._trace_offset = np.zeros(self.num_envs, dtype=np.int64)
        else:
            self._gate_sources = [template] + [build_gate_source(self.scenario) for _ in range(self.num_envs - 1)]

    def _allocate(self) -> None:
        count, layers, experts = self.num_envs, self.num_layers, self.num_experts
        self._copy_rngs: list[np.random.Generator | None] = [None] * count
        self._gate_noise = None if self._synthetic is None else NormalStreams(
            count, (layers, experts), _block_rows(count, layers * experts, self.scenario.tokens_per_episode))
        self._gate_state = np.zeros((count, layers, experts)) if self._synthetic is not None else None
        self._step_index = np.zeros(count, dtype=np.int64)
        self._position_cache: tuple | None = None
        self._degradation_sum = np.zeros(count)
        self._finished = np.zeros(count, dtype=bool)
        self._started = False
        self._copies = np.arange(count)

        # Data of each copy's current token, one row per MoE layer (filled by _start_tokens).
        self._gates = np.zeros((count, layers, experts))
        self._token_top_k = np.zeros((count, layers, self.top_k), dtype=np.int64)
        self._token_weights = np.zeros((count, layers, self.top_k))
        self._true_gains = np.zeros((count, layers, self.num_nodes))
        self._observed_gains = self._true_gains if self._perfect_csi else np.zeros((count, layers, self.num_nodes))
        self._topk_counts = np.zeros((count, layers, self.num_nodes + 1), dtype=np.int64)
        # Shortest uplink and downlink times of each step's true channel, for the energy of the actions.
        self._min_up_s = np.zeros((count, layers, self.num_nodes))
        self._min_down_s = np.zeros((count, layers, self.num_nodes))
        base_size = experts + self.num_nodes + 2
        self._observation_rows = np.zeros((count, layers, base_size), dtype=np.float32)

    @property
    def _perfect_csi(self) -> bool:
        return self.scenario.csi_delay_steps == 0 and self.scenario.csi_error_std == 0.0

    # -- Gymnasium API --------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset all copies, or those in ``options["reset_mask"]``; see the class docstring for seeding."""
        seeds = self._seed_list(seed)
        if isinstance(seed, (int, np.integer)):
            super().reset(seed=int(seed))
        mask = np.ones(self.num_envs, dtype=bool)
        if options is not None and "reset_mask" in options:
            mask = self._check_reset_mask(options["reset_mask"])
        copies = np.flatnonzero(mask)
        if not self._started and copies.size != self.num_envs:
            raise RuntimeError("the first reset() must reset every copy; call it without options['reset_mask']")
        for copy in copies.tolist():
            if seeds[copy] is not None or self._copy_rngs[copy] is None:
                self._copy_rngs[copy], _ = seeding.np_random(seeds[copy])
        self._reset_copies(copies)
        self._started = True
        return self._observations(), self._reset_infos(mask)

    def step(self, actions):
        if not self._started:
            raise RuntimeError("WideDecodeVectorEnv.step() called before reset()")
        active = np.ones(self.num_envs, dtype=bool)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._finished.any():
            active = ~self._finished
            self._reset_copies(np.flatnonzero(self._finished))
        elif self.autoreset_mode == AutoresetMode.DISABLED and self._finished.any():
            raise RuntimeError(f"copies {np.flatnonzero(self._finished).tolist()[:8]} finished their episodes; "
                               "reset them with reset(options={'reset_mask': mask}) before stepping")
        computed = self._decisions(actions)

        steps = self._current_steps(observed=False)
        # The action and conventional Top-K routing as two decisions per step, in one evaluation.
        counts = self.cost_model.node_counts(computed)
        both = np.stack([counts, self._rows(self._topk_counts)], axis=1)
        uplink, downlink, compute, failed = self.cost_model.energy_at(
            steps.gains, both, (self._rows(self._min_up_s), self._rows(self._min_down_s)))
        cost = self.cost_model.decision_cost_batch(steps, computed, counts, uplink[:, 0], downlink[:, 0],
                                                   compute[:, 0], failed[:, 0])
        topk_energy = (uplink[:, 1] + downlink[:, 1] + compute[:, 1]
                       + self.cost_model.failure_energy_per_node_j * np.count_nonzero(failed[:, 1], axis=-1))

        if self.average_budget:
            self._degradation_sum += np.where(active, cost.degradation, 0.0)
        terms = self._reward_terms(cost)
        rewards = np.where(active, terms["energy"] + terms["accuracy_penalty"] + terms["latency_penalty"], 0.0)

        self._step_index += active
        self._moved()
        truncated = active & (self._step_index >= self.max_steps)
        next_token = active & ~truncated & (self._step_index % self.num_layers == 0)
        if next_token.any():
            self._start_tokens(np.flatnonzero(next_token))
        observations = self._observations()
        infos = self._step_infos(cost, topk_energy, terms, active)

        if self.autoreset_mode == AutoresetMode.SAME_STEP and truncated.any():
            done = np.flatnonzero(truncated)
            final_obs = np.full(self.num_envs, None, dtype=object)
            for copy in done.tolist():
                final_obs[copy] = observations[copy].copy()
            infos["final_obs"], infos["_final_obs"] = final_obs, truncated.copy()
            infos["final_info"], infos["_final_info"] = _masked_copy(infos, truncated), truncated.copy()
            self._reset_copies(done)
            observations[done] = self._observations()[done]
            infos["privileged"] = self._privileged()
            infos["step"] = self._step_index.copy()
        else:
            self._finished = truncated.copy()
        terminated = np.zeros(self.num_envs, dtype=bool)
        return observations, rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        self._gate_sources = None

    # -- masks and views ------------------------------------------------------

    def action_masks(self) -> np.ndarray:
        """Masks for sb3-contrib's MaskablePPO, one row per copy, as the single env and wrapper define them.

        With ``MultiBinary(E)`` actions: ``[may be 0, may be 1]`` per expert,
        flattened to ``2E``, where an expert may be 1 when its node can serve
        one expert in time by the observed CSI. With ``discrete_subsets``: the
        ``2^K`` subsets whose experts all sit on such nodes.
        """
        reachable = self._reachable_experts()
        if self.discrete_subsets:
            top_reachable = np.take_along_axis(reachable, self._rows(self._token_top_k), axis=-1)
            return np.all(~self._subset_bits[None] | top_reachable[:, None, :], axis=-1)
        masks = np.ones((self.num_envs, self.num_experts, 2), dtype=bool)
        masks[:, :, 1] = reachable
        return masks.reshape(self.num_envs, -1)

    def step_batch(self, csi: str = "true") -> StepBatch:
        """Build the ``StepBatch`` that the next actions apply to, on the true or the observed channel."""
        if csi not in ("true", "observed"):
            raise ValueError(f"invalid csi: expected 'true' or 'observed', got {csi!r}")
        steps = self._current_steps(observed=csi == "observed")
        return self.cost_model.make_batch(steps.layer, steps.token, steps.gates, steps.gains)

    # -- per-copy episode state -----------------------------------------------

    def _reset_copies(self, copies: np.ndarray) -> None:
        """Start new episodes for ``copies``, drawing their generators' seeds as ``WideDecodeEnv.reset`` does."""
        if copies.size == 0:
            return
        channel_rngs, gate_rngs = [], []
        for copy in copies.tolist():
            channel_seed, gate_seed = self._copy_rngs[copy].integers(0, _SEED_BOUND, size=2)
            channel_rngs.append(np.random.default_rng(channel_seed))
            gate_rngs.append(np.random.default_rng(gate_seed))
        self.channel.reset(copies, channel_rngs)
        if self._synthetic is not None:
            self._gate_noise.reset(copies, gate_rngs)
        elif self._trace is not None:
            last_start = max(0, self._trace.trace.num_tokens - self._trace.tokens_per_episode)
            self._trace_start[copies] = [int(rng.integers(0, last_start + 1)) for rng in gate_rngs]
            self._trace_offset[copies] = 0
        else:
            for copy, rng in zip(copies.tolist(), gate_rngs):
                self._gate_sources[copy].reset(rng)
        self._step_index[copies] = 0
        self._moved()
        self._degradation_sum[copies] = 0.0
        self._finished[copies] = False
        self._start_tokens(copies)

    def _start_tokens(self, copies: np.ndarray) -> None:
        """Draw the next token of ``copies`` and compute what its L steps need but the actions.

        The arithmetic is the single env's ``_start_token`` over a leading copy axis.
        """
        layers = self.num_layers
        first_token = self._step_index[copies] == 0
        gates = _softmax(self._next_logits(copies, first_token))
        top_k, weights = _top_k_weights(gates, self.top_k, self.profile.architecture.renormalize)
        top_k_masks = np.zeros(gates.shape, dtype=bool)
        np.put_along_axis(top_k_masks, top_k, True, axis=-1)

        true_gains = np.empty((copies.size, layers, self.num_nodes))
        observed_gains = true_gains if self._perfect_csi else np.empty_like(true_gains)
        for group in (copies[first_token], copies[~first_token]):
            if group.size == copies.size:
                true_gains, observed_gains = self.channel.emit(group, layers)
            elif group.size:
                rows = np.isin(copies, group)
                true, observed = self.channel.emit(group, layers)
                true_gains[rows] = true
                if observed_gains is not true_gains:
                    observed_gains[rows] = observed

        everyone = copies.size == self.num_envs
        self._store("_gates", copies, gates, everyone)
        self._store("_token_top_k", copies, top_k, everyone)
        self._store("_token_weights", copies, weights, everyone)
        self._store("_topk_counts", copies, self.cost_model.node_counts(top_k_masks), everyone)
        self._store("_true_gains", copies, true_gains, everyone)
        min_up, min_down = self.cost_model.min_link_times(true_gains)
        self._store("_min_up_s", copies, min_up, everyone)
        self._store("_min_down_s", copies, min_down, everyone)
        if self._perfect_csi:
            self._observed_gains = self._true_gains
        else:
            self._store("_observed_gains", copies, observed_gains, everyone)

        channel = np.clip(self.channel.standardise_db(observed_gains), -CHANNEL_OBS_LIMIT, CHANNEL_OBS_LIMIT)
        token = self._step_index[copies] // layers
        positions = np.empty((copies.size, layers, 2))
        positions[..., 0] = np.arange(layers) / layers
        positions[..., 1] = (token / self.scenario.tokens_per_episode)[:, None]
        rows = np.concatenate([gates, channel, positions], axis=-1).astype(np.float32)
        self._store("_observation_rows", copies, rows, everyone)

    def _store(self, name: str, copies: np.ndarray, value: np.ndarray, everyone: bool) -> None:
        """Write the rows of ``copies`` of the token array ``name``; ``everyone`` means copies is 0..B-1."""
        if everyone:
            setattr(self, name, value)
        else:
            getattr(self, name)[copies] = value

    def _next_logits(self, copies: np.ndarray, first_token: np.ndarray) -> np.ndarray:
        """Router logits ``(len(copies), L, E)`` of each copy's next token."""
        shape = (self.num_layers, self.num_experts)
        if self._gate_sources is not None:
            return np.stack([self._gate_sources[copy].next_token() for copy in copies.tolist()])
        if self._trace is not None:
            trace = self._trace.trace
            positions = (self._trace_start[copies] + self._trace_offset[copies]) % trace.num_tokens
            self._trace_offset[copies] += 1
            return trace.router_logits[positions][:, self._trace.layer_map].astype(np.float64)
        source = self._synthetic
        noise = self._gate_noise.take(copies, 1)[:, 0]
        correlation = source.token_correlation
        state = np.where(first_token[:, None, None], noise,
                         correlation * self._gate_state[copies] + np.sqrt(1.0 - correlation * correlation) * noise)
        self._gate_state[copies] = state
        return source.popularity + source.logit_std * state

    # -- one step -------------------------------------------------------------

    def _position(self) -> tuple[np.ndarray, np.ndarray]:
        """Layer and token of each copy's current step; a finished copy stays at its last step."""
        if self._position_cache is None:
            step = np.minimum(self._step_index, self.max_steps - 1)
            layer = step % self.num_layers
            # One layer for all copies, the usual case, lets _rows take views instead of gathering.
            shared = int(layer[0]) if (layer == layer[0]).all() else None
            self._position_cache = (layer, step // self.num_layers, shared)
        return self._position_cache[:2]

    def _moved(self) -> None:
        """Forget the cached positions after ``_step_index`` changed."""
        self._position_cache = None

    def _rows(self, per_layer: np.ndarray) -> np.ndarray:
        """Return each copy's row of a ``(B, L, ...)`` token array at its current layer."""
        layer, _ = self._position()
        shared = self._position_cache[2]
        if shared is not None:
            return per_layer[:, shared]
        return per_layer[self._copies, layer]

    def _current_steps(self, observed: bool) -> StepBatch:
        layer, token = self._position()
        gains = self._rows(self._observed_gains if observed else self._true_gains)
        return StepBatch(layer=layer, token=token, gates=self._rows(self._gates),
                         top_k=self._rows(self._token_top_k), weights=self._rows(self._token_weights), gains=gains,
                         tables=None)

    def _decisions(self, actions) -> np.ndarray:
        """Validate a batch of actions and return the computed-expert masks ``(B, E)``."""
        array = np.asarray(actions)
        if self.discrete_subsets:
            if array.dtype.kind not in "iu" or array.shape != (self.num_envs,):
                raise ValueError(f"invalid actions: expected {self.num_envs} integers in [0, {2**self.top_k - 1}] "
                                 f"(Discrete({2**self.top_k}) per copy), got dtype {array.dtype} "
                                 f"and shape {array.shape}")
            if array.min() < 0 or array.max() >= 2**self.top_k:
                raise ValueError(f"invalid actions: expected integers in [0, {2**self.top_k - 1}], "
                                 f"got values in [{array.min()}, {array.max()}]")
            computed = np.zeros((self.num_envs, self.num_experts), dtype=bool)
            np.put_along_axis(computed, self._rows(self._token_top_k), self._subset_bits[array], axis=-1)
            return computed
        expected = (self.num_envs, self.num_experts)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"invalid actions: expected a numeric or boolean array of 0/1 values of shape {expected}, "
                            f"got dtype {array.dtype}")
        if array.shape != expected:
            raise ValueError(f"invalid actions: expected shape {expected} of 0/1 values "
                             f"(MultiBinary({self.num_experts}) per copy), got shape {array.shape}")
        if array.dtype.kind != "b":
            valid = (array.min() >= 0 and array.max() <= 1) if array.dtype.kind in "iu" else \
                bool(((array == 0) | (array == 1)).all())
            if not valid:
                bad = array[(array != 0) & (array != 1)]
                raise ValueError(f"invalid actions: expected shape {expected} of 0/1 values, "
                                 f"got entries {bad[:4].tolist()}")
        return array.astype(bool)

    def _reward_terms(self, cost: DecisionCostBatch) -> dict[str, np.ndarray]:
        sc = self.scenario
        energy = -cost.energy_j / self.reference_energy_j
        latency = np.where(cost.latency_ok, 0.0, -sc.latency_violation_penalty)
        if not self.average_budget:
            accuracy = np.where(cost.accuracy_ok, 0.0, -sc.accuracy_violation_penalty)
        else:
            last = self._step_index + 1 >= self.max_steps
            accuracy = np.where(last, average_budget_penalty(self._degradation_sum, sc, self.max_steps), 0.0)
        return {"energy": energy, "accuracy_penalty": accuracy, "latency_penalty": latency}

    def _observations(self) -> np.ndarray:
        """Observation of every copy at its current step."""
        rows = self._rows(self._observation_rows)
        if not self.average_budget:
            return rows.copy()
        total = self.scenario.accuracy_budget * self.max_steps
        if total > 0:
            unused = 1.0 - self._degradation_sum / total
        else:
            unused = np.where(self._degradation_sum != 0, 0.0, 1.0)
        observations = np.empty((self.num_envs, rows.shape[1] + 1), dtype=np.float32)
        observations[:, :-1] = rows
        observations[:, -1] = np.clip(unused, -BUDGET_OBS_LIMIT, BUDGET_OBS_LIMIT)
        return observations

    def _reachable_experts(self) -> np.ndarray:
        gains = self._rows(self._observed_gains)
        ones = np.ones((self.num_envs, self.num_nodes + 1), dtype=np.int64)
        _, _, _, in_time = self.cost_model.node_terms(gains, ones)
        return in_time[:, self.cost_model.expert_nodes]

    # -- infos ----------------------------------------------------------------

    def _privileged(self) -> dict[str, np.ndarray]:
        # Copies, so that the arrays in an info dict do not change when later tokens are drawn.
        layer, token = self._position()
        return {"layer": layer.copy(), "token": token.copy(), "gates": self._rows(self._gates).copy(),
                "true_gains": self._rows(self._true_gains).copy(),
                "observed_gains": self._rows(self._observed_gains).copy()}

    def _step_infos(self, cost: DecisionCostBatch, topk_energy: np.ndarray, terms: dict[str, np.ndarray],
                    active: np.ndarray) -> dict[str, Any]:
        values = cost.as_info()
        values["topk_energy_j"] = topk_energy
        if self.average_budget:
            values["accuracy_violation"] = terms["accuracy_penalty"] < 0
            values["episode_mean_degradation"] = self._degradation_sum / np.maximum(self._step_index, 1)
        infos = _with_masks(values, active)
        infos["reward_terms"], infos["_reward_terms"] = _with_masks(terms, active), active.copy()
        everyone = np.ones(self.num_envs, dtype=bool)
        infos["step"], infos["_step"] = self._step_index.copy(), everyone
        infos["privileged"], infos["_privileged"] = _with_masks(self._privileged(), everyone), everyone
        return infos

    def _reset_infos(self, mask: np.ndarray) -> dict[str, Any]:
        everyone = np.ones(self.num_envs, dtype=bool)
        infos = {"step": self._step_index.copy(), "_step": mask.copy()}
        infos["privileged"], infos["_privileged"] = _with_masks(self._privileged(), everyone), everyone
        return infos

    # -- helpers --------------------------------------------------------------

    def _seed_list(self, seed) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + index for index in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"invalid seed: a list of seeds needs one entry per copy ({self.num_envs}), "
                             f"got {len(seeds)}")
        return seeds

    def _check_reset_mask(self, mask) -> np.ndarray:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"invalid options['reset_mask']: expected a boolean numpy array of shape "
                             f"({self.num_envs},), got {type(mask).__name__} {getattr(mask, 'shape', '')}")
        if not mask.any():
            raise ValueError("invalid options['reset_mask']: it selects no copy")
        return mask


def _with_masks(values: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    """``values`` plus the ``"_" + key`` masks of Gymnasium's vector infos, all sharing ``mask``."""
    infos: dict[str, Any] = {}
    for key, value in values.items():
        infos[key] = value
        infos["_" + key] = mask
    return infos


def _masked_copy(infos: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    """Copy of ``infos`` whose masks are restricted to ``mask``, for ``final_info``."""
    copy: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            copy[key] = value & mask
        elif isinstance(value, dict):
            copy[key] = _masked_copy(value, mask)
        else:
            copy[key] = value.copy() if isinstance(value, np.ndarray) else value
    return copy


# -- Stable-Baselines3 --------------------------------------------------------


@functools.cache
def _sb3_adapter_class():
    # Imported here so that the Gymnasium vector env does not load torch through SB3.
    from stable_baselines3.common.vec_env import VecEnv

    class WideDecodeSB3VecEnv(VecEnv):
        """SB3 ``VecEnv`` view of a ``WideDecodeVectorEnv`` in ``SAME_STEP`` autoreset mode.

        It follows SB3's conventions: ``step_wait`` returns ``dones`` and a list
        of info dicts, and a finished copy's dict contains ``terminal_observation``
        and ``TimeLimit.truncated``. The cost terms and the privileged state are
        left out, so a learning agent cannot read them; ``vector_env`` gives
        access to the batched env itself.
        """

        def __init__(self, vector_env: WideDecodeVectorEnv):
            if vector_env.autoreset_mode != AutoresetMode.SAME_STEP:
                raise ValueError("the SB3 adapter needs autoreset_mode=SAME_STEP, "
                                 f"got {vector_env.autoreset_mode.value}")
            self.vector_env = vector_env
            self._actions: np.ndarray | None = None
            super().__init__(vector_env.num_envs, vector_env.single_observation_space,
                             vector_env.single_action_space)

        def reset(self):
            seeds = None if all(seed is None for seed in self._seeds) else self._seeds
            options = self._options[0] if any(self._options) else None
            observations, _ = self.vector_env.reset(seed=seeds, options=options)
            self.reset_infos = [{} for _ in range(self.num_envs)]
            self._reset_seeds()
            self._reset_options()
            return observations

        def step_async(self, actions: np.ndarray) -> None:
            self._actions = actions

        def step_wait(self):
            observations, rewards, terminated, truncated, infos = self.vector_env.step(self._actions)
            dones = terminated | truncated
            list_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
            for copy in np.flatnonzero(dones).tolist():
                list_infos[copy] = {"terminal_observation": infos["final_obs"][copy],
                                    "TimeLimit.truncated": bool(truncated[copy] and not terminated[copy])}
            return observations, rewards.astype(np.float32), dones, list_infos

        def close(self) -> None:
            self.vector_env.close()

        def get_attr(self, attr_name: str, indices=None) -> list[Any]:
            value = getattr(self.vector_env, attr_name)
            return [value for _ in self._get_indices(indices)]

        def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
            raise AttributeError(f"cannot set {attr_name!r} per copy of a batched env; set it on vector_env")

        def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
            """Call a method of the batched env; a result with one row per copy is split into those rows."""
            result = getattr(self.vector_env, method_name)(*method_args, **method_kwargs)
            selected = list(self._get_indices(indices))
            if isinstance(result, np.ndarray) and result.shape[:1] == (self.num_envs,):
                return [result[index] for index in selected]
            return [result for _ in selected]

        def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
            return [False for _ in self._get_indices(indices)]

        def get_images(self):
            raise NotImplementedError("WideDecodeVectorEnv does not render images")

    return WideDecodeSB3VecEnv


def __getattr__(name: str):
    if name == "WideDecodeSB3VecEnv":
        return _sb3_adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_sb3_vec_env(num_envs: int, seed: int | None = None, scenario: ScenarioConfig | dict | str | None = None,
                     discrete_subsets: bool = False, monitor_path: str | None = None, **overrides: Any):
    """Build ``num_envs`` copies of ``WIDE-Decode-v0`` as one SB3 ``VecEnv``, wrapped in ``VecMonitor``.

    Copy ``i`` is seeded with ``seed + i`` at the first ``reset``, as SB3's
    ``make_vec_env`` seeds its envs, so the copies produce the transitions of
    ``num_envs`` single envs under those seeds. ``discrete_subsets`` gives each
    copy the ``Discrete(2^K)`` actions of ``TopKSubsetAction`` (for DQN).
    ``monitor_path`` is passed to ``VecMonitor`` as its CSV file name.
    """
    from stable_baselines3.common.vec_env import VecMonitor

    vector_env = WideDecodeVectorEnv(num_envs, scenario, autoreset_mode=AutoresetMode.SAME_STEP,
                                     discrete_subsets=discrete_subsets, **overrides)
    adapter = _sb3_adapter_class()(vector_env)
    if seed is not None:
        adapter.seed(seed)
    return VecMonitor(adapter, filename=monitor_path)


def _block_rows(num_copies: int, values_per_row: int, max_rows: int) -> int:
    """Rows of random numbers to draw ahead per copy within ``RANDOM_BLOCK_BYTES``, from 1 to ``max_rows``."""
    row_bytes = 8 * max(1, values_per_row) * num_copies
    return int(min(max_rows, max(1, RANDOM_BLOCK_BYTES // row_bytes)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """``profile.softmax`` with the maximum and the sum taken column by column, exact and faster for short rows."""
    largest = logits[..., 0].copy()
    for column in range(1, logits.shape[-1]):
        np.maximum(largest, logits[..., column], out=largest)
    exp = np.exp(logits - largest[..., None])
    return exp / sum_last_axis(exp)[..., None]


def _top_k_weights(gates: np.ndarray, top_k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``profile.top_k_weights`` by ``top_k`` passes of ``argmax``, faster than a sort for short rows.

    ``argmax`` returns the first of equal maxima, as the stable sort of
    ``top_k_weights`` orders ties by index, so both return the same experts.
    """
    work = gates.copy()
    order = np.empty(gates.shape[:-1] + (top_k,), dtype=np.int64)
    for rank in range(top_k):
        best = work.argmax(axis=-1)[..., None]
        order[..., rank:rank + 1] = best
        np.put_along_axis(work, best, -np.inf, axis=-1)
    weights = np.take_along_axis(gates, order, axis=-1)
    if renormalize:
        weights = weights / sum_last_axis(weights)[..., None]
    return order, weights


__all__ = ["WideDecodeVectorEnv", "make_sb3_vec_env"]
