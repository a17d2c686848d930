"""Scenario configuration: defaults, presets, validation messages and YAML loading."""

import dataclasses
import math

import pytest
import yaml

from wide_env.config import MOE_PRESETS, MoEArchitecture, ScenarioConfig, resolve_scenario

# -- defaults and presets -----------------------------------------------------


def test_defaults_match_reference_scenario():
    scenario = ScenarioConfig()

    assert scenario.moe_preset == "mixtral-8x7b"
    assert scenario.activation_bits == 16
    assert scenario.num_nodes == 4
    assert scenario.expert_nodes() == (1, 1, 2, 2, 3, 3, 4, 4)
    assert scenario.local_experts == ()
    assert (scenario.distance_min_m, scenario.distance_max_m) == (20.0, 160.0)
    assert scenario.carrier_frequency_ghz == 3.5
    assert scenario.bandwidth_total_hz == 80e6
    assert scenario.access == "fdma"
    assert scenario.node_bandwidth_hz == 20e6
    assert scenario.noise_psd_dbm_per_hz == -174.0
    assert scenario.noise_figure_db == 7.0
    assert scenario.source_tx_power_dbm == 23.0
    assert scenario.node_tx_power_dbm == 30.0
    assert scenario.latency_budget_s == 2e-3
    assert scenario.node_flops_per_s == 20e12
    assert scenario.node_energy_j_per_flop == 0.5e-12
    assert scenario.pathloss_model == "umi-nlos"
    assert scenario.fading == "rayleigh"
    assert scenario.fading_mode == "fast"
    assert scenario.doppler_hz == 100.0
    assert scenario.fading_step_s == 2e-3
    assert scenario.csi_delay_steps == 0
    assert scenario.csi_error_std == 0.0
    assert scenario.accuracy_budget_mode == "per_step"
    assert scenario.accuracy_budget == 0.15
    assert scenario.tokens_per_episode == 16
    assert scenario.steps_per_episode == 512


def test_default_derived_quantities():
    scenario = ScenarioConfig()

    assert scenario.payload_bits == 65536.0
    assert scenario.noise_psd_w_per_hz == pytest.approx(10.0 ** (-19.7), rel=1e-12)
    assert scenario.source_tx_power_w == pytest.approx(0.19953, rel=1e-4)
    assert scenario.node_tx_power_w == pytest.approx(1.0)
    assert scenario.architecture.flops_per_expert == 6.0 * 4096 * 14336


@pytest.mark.parametrize(
    "name, layers, hidden, ffn, experts, top_k, renormalize",
    [
        ("mixtral-8x7b", 32, 4096, 14336, 8, 2, True),
        ("olmoe-1b-7b", 16, 2048, 1024, 64, 8, False),
        ("qwen1.5-moe-a2.7b", 24, 2048, 1408, 60, 4, False),
        ("deepseek-v2-lite", 26, 2048, 1408, 64, 6, False),
        ("qwen3-30b-a3b", 48, 2048, 768, 128, 8, True),
        ("deepseek-v3", 58, 7168, 2048, 256, 8, True),
    ],
)
def test_preset_architecture_numbers(name, layers, hidden, ffn, experts, top_k, renormalize):
    assert MOE_PRESETS[name] == MoEArchitecture(name, layers, hidden, ffn, experts, top_k, renormalize)


def test_tdma_uses_whole_band():
    assert ScenarioConfig(access="tdma").node_bandwidth_hz == 80e6


def test_step_duration_overrides_fading_step():
    assert ScenarioConfig(step_duration_s=1e-3).fading_step_s == 1e-3


def test_top_k_override():
    scenario = ScenarioConfig(top_k=3)

    assert scenario.architecture.top_k == 3
    assert scenario.architecture.num_experts == 8
    assert MOE_PRESETS["mixtral-8x7b"].top_k == 2


def test_preset_sets_episode_length():
    assert ScenarioConfig(moe_preset="olmoe-1b-7b", tokens_per_episode=4).steps_per_episode == 64


def test_contiguous_placement_with_local_experts():
    scenario = ScenarioConfig(local_experts=[0, 5])

    assert scenario.local_experts == (0, 5)
    assert scenario.expert_nodes() == (0, 1, 2, 2, 3, 0, 4, 4)


def test_explicit_placement_list_becomes_tuple():
    scenario = ScenarioConfig(placement=[4, 3, 2, 1, 0, 1, 2, 3])

    assert scenario.placement == (4, 3, 2, 1, 0, 1, 2, 3)
    assert scenario.expert_nodes() == (4, 3, 2, 1, 0, 1, 2, 3)
    assert hash(scenario) == hash(ScenarioConfig(placement=(4, 3, 2, 1, 0, 1, 2, 3)))


def test_uneven_contiguous_placement_covers_all_nodes():
    nodes = ScenarioConfig(moe_preset="qwen1.5-moe-a2.7b", num_nodes=7).expert_nodes()

    assert len(nodes) == 60
    assert sorted(set(nodes)) == [1, 2, 3, 4, 5, 6, 7]
    assert list(nodes) == sorted(nodes)


def test_scenario_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScenarioConfig().num_nodes = 3


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"bandwidth_total_hz": -1.0}, ValueError, r"invalid bandwidth_total_hz: expected a value in \(0, inf\), got -1\.0"),
        ({"bandwidth_total_hz": 0.0}, ValueError, r"invalid bandwidth_total_hz"),
        ({"latency_budget_s": 0.0}, ValueError, r"invalid latency_budget_s"),
        ({"doppler_hz": math.nan}, ValueError, r"invalid doppler_hz: expected a finite number, got nan"),
        ({"accuracy_budget": -0.1}, ValueError, r"invalid accuracy_budget: expected a value in \[0, 100\]"),
        ({"distance_max_m": 10.0}, ValueError, r"invalid distance_max_m: expected a value in \[20, inf\)"),
        ({"gate_token_correlation": 1.0}, ValueError, r"invalid gate_token_correlation: expected a value in \[0, 1\)"),
        ({"csi_delay_steps": -1}, ValueError, r"invalid csi_delay_steps"),
        ({"top_k": 9}, ValueError, r"invalid top_k: expected a value in \[1, 8\], got 9"),
        ({"top_k": 0}, ValueError, r"invalid top_k: expected a value in \[1, 8\], got 0"),
        ({"moe_preset": "gpt-4"}, ValueError, r"invalid moe_preset: expected one of 'mixtral-8x7b', .*got 'gpt-4'"),
        ({"access": "cdma"}, ValueError, r"invalid access: expected one of 'fdma', 'tdma', got 'cdma'"),
        ({"pathloss_model": "rma"}, ValueError, r"invalid pathloss_model: expected one of 'umi-nlos'"),
        ({"fading_mode": "block"}, ValueError, r"invalid fading_mode: expected one of 'fast', 'slow'"),
        ({"accuracy_budget_mode": "sum"}, ValueError, r"invalid accuracy_budget_mode: expected one of 'per_step'"),
        ({"num_nodes": 9}, ValueError, r"invalid num_nodes: expected at most num_experts=8 for the contiguous"),
        ({"local_experts": (8,)}, ValueError, r"invalid local_experts: expected expert indices in \[0, 7\]"),
        ({"local_experts": (1, 1)}, ValueError, r"invalid local_experts: expected distinct expert indices"),
    ],
)
def test_invalid_value_rejected(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        ScenarioConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"latency_budget_s": True}, r"latency_budget_s must be int or float, got bool True"),
        ({"num_nodes": True}, r"num_nodes must be int, got bool True"),
        ({"latency_budget_s": "2e-3"}, r"latency_budget_s must be int or float, got str '2e-3'"),
        ({"bandwidth_total_hz": "80 MHz"}, r"bandwidth_total_hz must be int or float, got str '80 MHz'"),
        ({"num_nodes": 4.0}, r"num_nodes must be int, got float 4\.0"),
        ({"top_k": 2.0}, r"top_k must be int, got float 2\.0"),
        ({"access": 1}, r"access must be str, got int 1"),
        ({"step_duration_s": "1ms"}, r"step_duration_s must be int or float, got str '1ms'"),
    ],
)
def test_wrong_type_rejected(overrides, pattern):
    with pytest.raises(TypeError, match=pattern):
        ScenarioConfig(**overrides)


def test_integer_accepted_for_float_field():
    assert ScenarioConfig(bandwidth_total_hz=80_000_000).node_bandwidth_hz == 20e6


def test_placement_node_out_of_range():
    with pytest.raises(ValueError, match=r"invalid placement: expert 7 is on node 5, .*num_nodes=4; every expert needs a node"):
        ScenarioConfig(placement=(1, 1, 2, 2, 3, 3, 4, 5))


def test_placement_negative_node():
    with pytest.raises(ValueError, match=r"invalid placement: expert 0 is on node -1"):
        ScenarioConfig(placement=(-1, 1, 2, 2, 3, 3, 4, 4))


def test_placement_non_integer_node():
    with pytest.raises(ValueError, match=r"invalid placement: expert 2 is on node None"):
        ScenarioConfig(placement=(1, 1, None, 2, 3, 3, 4, 4))


@pytest.mark.parametrize("placement", [(1, 2, 3), (1,) * 9])
def test_placement_wrong_length(placement):
    with pytest.raises(ValueError, match=rf"invalid placement: expected one node index per expert \(8 entries\), "
                                         rf"got '{len(placement)} entries'"):
        ScenarioConfig(placement=placement)


def test_architecture_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"invalid top_k: expected an integer in \[1, num_experts=4\], got 5"):
        MoEArchitecture("tiny", 2, 16, 32, 4, 5, True)


def test_architecture_rejects_bool_size():
    with pytest.raises(ValueError, match=r"invalid num_layers: expected a positive integer, got True"):
        MoEArchitecture("tiny", True, 16, 32, 4, 2, True)


# -- dictionaries, replace and YAML -------------------------------------------


def test_from_dict_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'bandwith_hz'; valid keys are: .*"
                                         r"bandwidth_total_hz.*latency_budget_s"):
        ScenarioConfig.from_dict({"bandwith_hz": 1.0})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="scenario must be a mapping of field names to values, got list"):
        ScenarioConfig.from_dict([("num_nodes", 2)])


def test_replace_changes_one_field():
    base = ScenarioConfig()

    changed = base.replace(access="tdma")

    assert changed.access == "tdma"
    assert base.access == "fdma"
    assert dataclasses.replace(changed, access="fdma") == base


def test_replace_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'nodes'; valid keys are: .*num_nodes"):
        ScenarioConfig().replace(nodes=2)


def test_replace_validates_new_value():
    with pytest.raises(ValueError, match=r"invalid bandwidth_total_hz"):
        ScenarioConfig().replace(bandwidth_total_hz=-5.0)


def test_dict_round_trip():
    scenario = ScenarioConfig(placement=(1, 1, 2, 2, 3, 3, 4, 0), local_experts=(7,), access="tdma")

    values = scenario.to_dict()

    assert values["placement"] == [1, 1, 2, 2, 3, 3, 4, 0]
    assert ScenarioConfig.from_dict(values) == scenario


def test_yaml_round_trip(tmp_path):
    scenario = ScenarioConfig(moe_preset="olmoe-1b-7b", num_nodes=8, local_experts=(0, 1), shadowing_std_db=4.0)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario.to_dict()), encoding="utf-8")

    assert ScenarioConfig.from_yaml(path) == scenario


def test_yaml_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text("access: tdma\nplacement: [1, 1, 1, 1, 2, 2, 2, 2]\nnum_nodes: 2\n", encoding="utf-8")

    scenario = ScenarioConfig.from_yaml(str(path))

    assert scenario.access == "tdma"
    assert scenario.num_nodes == 2
    assert scenario.placement == (1, 1, 1, 1, 2, 2, 2, 2)
    assert scenario.latency_budget_s == 2e-3


def test_yaml_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")

    assert ScenarioConfig.from_yaml(path) == ScenarioConfig()


def test_yaml_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(FileNotFoundError, match=r"scenario file not found: .*absent\.yaml"):
        ScenarioConfig.from_yaml(path)


@pytest.mark.parametrize("text, kind", [("- access\n- tdma\n", "list"), ("just a string\n", "str")])
def test_yaml_non_mapping_file(tmp_path, text, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ValueError, match=rf"scenario file .*bad\.yaml must contain a YAML mapping, got {kind}"):
        ScenarioConfig.from_yaml(path)


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("acces: tdma\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'acces'; valid keys are: .*access"):
        ScenarioConfig.from_yaml(path)


def test_yaml_exponent_without_dot_is_string(tmp_path):
    # YAML 1.1 (PyYAML) reads 80e6 as a string, so the type check must name the field and value.
    path = tmp_path / "exponent.yaml"
    path.write_text("bandwidth_total_hz: 80e6\n", encoding="utf-8")

    with pytest.raises(TypeError, match=r"bandwidth_total_hz must be int or float, got str '80e6'"):
        ScenarioConfig.from_yaml(path)


# -- resolve_scenario ---------------------------------------------------------


def test_resolve_scenario_inputs(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text("num_nodes: 2\n", encoding="utf-8")
    base = ScenarioConfig(num_nodes=8)

    assert resolve_scenario() == ScenarioConfig()
    assert resolve_scenario(base) is base
    assert resolve_scenario({"num_nodes": 2}).num_nodes == 2
    assert resolve_scenario(path).num_nodes == 2
    assert resolve_scenario(str(path), access="tdma").access == "tdma"
    assert resolve_scenario(base, num_nodes=4).num_nodes == 4


def test_resolve_scenario_rejects_other_types():
    with pytest.raises(TypeError, match="scenario must be a ScenarioConfig, a mapping, a YAML path or None, got int"):
        resolve_scenario(3)


def test_resolve_scenario_unknown_override():
    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'speed'; valid keys are:"):
        resolve_scenario(None, speed=3.0)
