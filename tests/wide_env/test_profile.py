"""MoE profile: synthetic cost tables, Top-K weights and the synthetic gate source."""

import numpy as np
import pytest

from wide_env.config import MOE_PRESETS, ScenarioConfig
from wide_env.profile import (
    SyntheticGateSource,
    build_gate_source,
    build_profile,
    softmax,
    synthetic_cost_tables,
    top_k_weights,
)

# -- cost tables --------------------------------------------------------------


@pytest.mark.parametrize("preset, cluster_size", [("mixtral-8x7b", 2), ("olmoe-1b-7b", 4), ("qwen1.5-moe-a2.7b", 7)])
def test_synthetic_tables_follow_model_ranges(preset, cluster_size):
    architecture = MOE_PRESETS[preset]
    experts = architecture.num_experts

    skip, replace, clusters = synthetic_cost_tables(architecture, cluster_size, np.random.default_rng(0))

    assert skip.shape == (architecture.num_layers, experts)
    assert replace.shape == (architecture.num_layers, experts, experts)
    assert clusters.shape == (architecture.num_layers, experts)
    assert np.all((skip >= 0.8) & (skip <= 1.2))
    for layer in range(architecture.num_layers):
        table = replace[layer]
        same = clusters[layer][:, None] == clusters[layer][None, :]
        off_diagonal = ~np.eye(experts, dtype=bool)
        np.testing.assert_array_equal(np.diag(table), 0.0)
        np.testing.assert_array_equal(table, table.T)
        within = table[same & off_diagonal]
        across = table[~same]
        assert np.all((within >= 0.2) & (within <= 0.5))
        assert np.all((across >= 0.9) & (across <= 1.4))
        assert np.all(table <= skip[layer][:, None] + skip[layer][None, :])


def test_synthetic_clusters_have_requested_size():
    architecture = MOE_PRESETS["qwen1.5-moe-a2.7b"]

    _, _, clusters = synthetic_cost_tables(architecture, 7, np.random.default_rng(1))

    for layer in range(architecture.num_layers):
        sizes = np.bincount(clusters[layer])
        # 60 experts in clusters of 7: eight full clusters and one of 4.
        assert sorted(sizes.tolist()) == [4] + [7] * 8


def test_clusters_differ_between_layers():
    _, _, clusters = synthetic_cost_tables(MOE_PRESETS["olmoe-1b-7b"], 4, np.random.default_rng(2))

    assert not np.array_equal(clusters[0], clusters[1])


def test_build_profile_depends_only_on_seed():
    first = build_profile(ScenarioConfig(profile_seed=3, gate_source="synthetic"))
    again = build_profile(ScenarioConfig(profile_seed=3, access="tdma", gate_source="synthetic"))
    other = build_profile(ScenarioConfig(profile_seed=4, gate_source="synthetic"))

    np.testing.assert_array_equal(first.replace_cost, again.replace_cost)
    np.testing.assert_array_equal(first.skip_cost, again.skip_cost)
    assert not np.array_equal(first.replace_cost, other.replace_cost)


def test_build_profile_uses_scenario_placement():
    profile = build_profile(ScenarioConfig(local_experts=(1,), top_k=3, gate_source="synthetic"))

    assert profile.expert_nodes.tolist() == [1, 0, 2, 2, 3, 3, 4, 4]
    assert profile.top_k == 3
    assert profile.num_experts == 8
    assert profile.num_layers == 32


# -- Top-K weights and softmax ------------------------------------------------


def test_top_k_weights_renormalised():
    gates = np.array([0.1, 0.4, 0.05, 0.3, 0.15])

    order, weights = top_k_weights(gates, 2, renormalize=True)

    assert order.tolist() == [1, 3]
    np.testing.assert_allclose(weights, [0.4 / 0.7, 0.3 / 0.7])


def test_top_k_weights_raw():
    gates = np.array([0.1, 0.4, 0.05, 0.3, 0.15])

    order, weights = top_k_weights(gates, 3, renormalize=False)

    assert order.tolist() == [1, 3, 4]
    np.testing.assert_allclose(weights, [0.4, 0.3, 0.15])


def test_top_k_weights_ties_keep_lower_index_first():
    order, _ = top_k_weights(np.array([0.2, 0.3, 0.2, 0.3]), 3, renormalize=True)

    assert order.tolist() == [1, 3, 0]


def test_top_k_weights_batched():
    gates = softmax(np.random.default_rng(3).standard_normal((5, 6, 8)))

    order, weights = top_k_weights(gates, 2, renormalize=True)

    assert order.shape == (5, 6, 2)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(order[..., 0], gates.argmax(axis=-1))


def test_softmax_sums_to_one_and_handles_large_logits():
    probabilities = softmax(np.array([[1000.0, 1000.0, 0.0], [-5.0, 0.0, 5.0]]))

    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0)
    np.testing.assert_allclose(probabilities[0], [0.5, 0.5, 0.0], atol=1e-12)


# -- gate source --------------------------------------------------------------


def make_gate_source(**overrides):
    return build_gate_source(ScenarioConfig(**{"gate_source": "synthetic", **overrides}))


def test_gate_source_shape_and_determinism():
    first, second = make_gate_source(), make_gate_source()
    first.reset(np.random.default_rng(5))
    second.reset(np.random.default_rng(5))

    tokens_a = [first.next_token() for _ in range(3)]
    tokens_b = [second.next_token() for _ in range(3)]

    assert isinstance(first, SyntheticGateSource)
    assert tokens_a[0].shape == (32, 8)
    for a, b in zip(tokens_a, tokens_b):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(tokens_a[0], tokens_a[1])


def test_gate_source_popularity_fixed_by_profile_seed():
    assert np.array_equal(make_gate_source(profile_seed=1).popularity, make_gate_source(profile_seed=1).popularity)
    assert not np.array_equal(make_gate_source(profile_seed=1).popularity, make_gate_source(profile_seed=2).popularity)


def test_gate_source_reset_restarts_process():
    source = make_gate_source()
    source.reset(np.random.default_rng(6))
    first = source.next_token()
    source.next_token()

    source.reset(np.random.default_rng(6))

    np.testing.assert_array_equal(source.next_token(), first)


def test_gate_source_token_correlation():
    correlation = 0.5
    source = make_gate_source(moe_preset="olmoe-1b-7b", gate_token_correlation=correlation, gate_logit_std=0.75)
    source.reset(np.random.default_rng(7))

    noise = np.array([(source.next_token() - source.popularity) / 0.75 for _ in range(300)])

    assert noise.std() == pytest.approx(1.0, abs=0.02)
    lag1 = np.corrcoef(noise[1:].ravel(), noise[:-1].ravel())[0, 1]
    lag2 = np.corrcoef(noise[2:].ravel(), noise[:-2].ravel())[0, 1]
    assert lag1 == pytest.approx(correlation, abs=0.02)
    assert lag2 == pytest.approx(correlation**2, abs=0.02)


def test_gate_source_top1_weight():
    # SyntheticGateSource promises that with logit_std = 1 the mixtral Top-1 weight averages about 0.6.
    source = make_gate_source(gate_logit_std=1.0)
    source.reset(np.random.default_rng(8))

    top1 = [top_k_weights(softmax(source.next_token()), 2, True)[1][:, 0] for _ in range(200)]

    assert np.mean(top1) == pytest.approx(0.6, abs=0.05)


def test_gate_source_before_reset_raises():
    with pytest.raises(RuntimeError, match=r"next_token\(\) called before reset\(\)"):
        make_gate_source().next_token()
