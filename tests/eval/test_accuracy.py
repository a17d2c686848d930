"""Tests of the measured-accuracy evaluation inside a real (tiny) MoE language model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from agents.base import Policy
from eval.accuracy import accuracy_scenario, measure_policy_accuracy
from wide_env.moe_lm import MoELanguageModel, MoELMConfig, save_checkpoint
from wide_env.trace import MoELMAccess, record_trace, save_trace

TINY = MoELMConfig(context_length=32, hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2,
                   expert_ffn_size=16)
# Near nodes with strong line of sight: every node is always reachable, so Top-K never loses an expert.
REACHABLE = {"distance_max_m": 30.0, "fading": "rician", "rician_k_db": 30.0}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, above all on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    directory = tmp_path_factory.mktemp("accuracy")
    torch.manual_seed(0)
    model = MoELanguageModel(TINY).eval()
    save_checkpoint(model, directory / "tiny.pt")
    rng = np.random.default_rng(0)
    access = MoELMAccess(model, {"name": "tiny", "checkpoint": "tiny.pt"})
    trace = record_trace(access, rng.integers(0, 256, 97), rng.integers(0, 256, 256), quantile=0.95)
    return save_trace(trace, directory / "tiny.trace.npz")


def scenario_for(trace_path, **overrides):
    return {"gate_source": "trace", "gate_trace_path": str(trace_path), **overrides}


class AllExpertsPolicy(Policy):
    name = "all"

    def decide(self, observation, info):
        return np.ones(self.num_experts, dtype=np.int8)


def test_top_k_policy_matches_reference_exactly(tiny_trace):
    report = measure_policy_accuracy(["topk"], scenario_for(tiny_trace, **REACHABLE), tokens=64, window=32)
    topk = report.by_policy()["topk"]
    assert report.tokens == 64
    assert topk.cross_entropy_increase == 0.0
    assert topk.perplexity_increase == 0.0
    assert topk.top1_agreement == 1.0
    assert topk.mean_deviation == 0.0
    assert topk.mean_bound == 0.0
    assert topk.rounds == 1
    assert topk.converged


def test_random_policy_degrades_accuracy(tiny_trace):
    report = measure_policy_accuracy(["random"], scenario_for(tiny_trace, **REACHABLE), tokens=64, window=32)
    random = report.by_policy()["random"]
    assert random.cross_entropy_increase != 0.0
    assert random.mean_deviation > 0.0
    assert random.mean_bound > 0.0
    assert random.top1_agreement < 1.0
    assert random.energy_ratio < 1.0
    assert random.converged
    assert random.rounds <= TINY.num_layers + 1


def test_oracle_meets_budget_with_reachable_nodes(tiny_trace):
    report = measure_policy_accuracy(["oracle"], scenario_for(tiny_trace, **REACHABLE), tokens=64, window=32)
    oracle = report.by_policy()["oracle"]
    assert oracle.accuracy_violation_rate == 0.0
    assert oracle.latency_violation_rate == 0.0
    assert oracle.mean_bound <= 0.15 + 1e-9
    assert oracle.energy_ratio <= 1.0 + 1e-9
    assert 0.0 <= oracle.bound_held_rate <= 1.0
    assert oracle.converged


def test_custom_policy_factory(tiny_trace):
    report = measure_policy_accuracy(["all"], scenario_for(tiny_trace, **REACHABLE), tokens=32, window=32,
                                     policy_factory=lambda spec, env, seed: AllExpertsPolicy(env))
    everything = report.by_policy()["all"]
    assert everything.cross_entropy_increase == 0.0
    assert everything.experts_computed == TINY.num_experts


def test_report_table_lists_policies(tiny_trace):
    report = measure_policy_accuracy(["topk", "random"], scenario_for(tiny_trace), tokens=32, window=32)
    table = report.format_table()
    assert "topk" in table
    assert "random" in table
    assert [row["policy"] for row in report.rows()] == ["topk", "random"]


def test_accuracy_scenario_uses_model_layers(tiny_trace):
    from wide_env.config import ScenarioConfig

    scenario = accuracy_scenario(ScenarioConfig(), tiny_trace, 2)
    assert scenario.architecture.num_layers == 2
    assert scenario.gate_source == "trace"


def test_checkpoint_not_fitting_trace_names_file(tiny_trace, tmp_path):
    other = MoELanguageModel(dataclasses.replace(TINY, num_layers=3))
    path = save_checkpoint(other, tmp_path / "three_layers.pt")
    with pytest.raises(ValueError, match=r"three_layers\.pt has \(layers, experts, top_k, renormalize\) = "
                                         r"\(3, 8, 2, True\), but trace .*tiny\.trace\.npz"):
        measure_policy_accuracy(["topk"], scenario_for(tiny_trace), checkpoint=path, tokens=32, window=32)


def test_trace_not_fitting_scenario_names_file(tiny_trace):
    with pytest.raises(ValueError, match=r"trace .*tiny\.trace\.npz does not fit moe_preset 'olmoe-1b-7b'"):
        measure_policy_accuracy(["topk"], scenario_for(tiny_trace, moe_preset="olmoe-1b-7b"), tokens=32, window=32)


def test_too_few_tokens_for_a_window(tiny_trace):
    with pytest.raises(ValueError, match="tokens=16 is less than one window of 32 tokens"):
        measure_policy_accuracy(["topk"], scenario_for(tiny_trace), tokens=16, window=32)
