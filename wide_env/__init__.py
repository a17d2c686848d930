"""wide-env: Gymnasium environments for energy-efficient expert selection in
wireless distributed Mixture-of-Experts (WIDE) inference.

Importing the package registers ``WIDE-Decode-v0`` and ``WIDE-Prefill-v0``.
"""

from gymnasium.envs.registration import register, registry

from wide_env.config import MOE_PRESETS, MoEArchitecture, ScenarioConfig, resolve_scenario
from wide_env.cost import CostModel, DecisionCost, StepState
from wide_env.env import WideDecodeEnv
from wide_env.prefill import WidePrefillEnv
from wide_env.prefill_cost import PrefillCostModel, PrefillDecisionCost, PrefillState
from wide_env.wrappers import TopKSubsetAction

__version__ = "0.1.0"

if "WIDE-Decode-v0" not in registry:
    # make_vec(..., vectorization_mode="vector_entry_point") builds the batched WideDecodeVectorEnv.
    register(id="WIDE-Decode-v0", entry_point="wide_env.env:WideDecodeEnv",
             vector_entry_point="wide_env.vector:WideDecodeVectorEnv")
if "WIDE-Prefill-v0" not in registry:
    register(id="WIDE-Prefill-v0", entry_point="wide_env.prefill:WidePrefillEnv")

__all__ = [
    "MOE_PRESETS",
    "MoEArchitecture",
    "ScenarioConfig",
    "resolve_scenario",
    "CostModel",
    "DecisionCost",
    "StepState",
    "WideDecodeEnv",
    "WidePrefillEnv",
    "PrefillCostModel",
    "PrefillDecisionCost",
    "PrefillState",
    "TopKSubsetAction",
]
