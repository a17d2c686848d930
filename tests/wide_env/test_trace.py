"""Tests of the trace format, the recorders and trace replay in the environment."""

from __future__ import annotations

import functools
import json
import zipfile

import numpy as np
import pytest
import torch

from wide_env.config import BUILTIN_TRACE_FILES, ScenarioConfig
from wide_env.env import WideDecodeEnv
from wide_env.moe_lm import MoELanguageModel, MoELMConfig
from wide_env.profile import build_gate_source, build_profile, softmax
from wide_env.trace import (
    BUILTIN_TRACES,
    MoELMAccess,
    Trace,
    TraceFormatError,
    TraceGateSource,
    load_trace,
    make_header,
    record_run,
    record_trace,
    save_trace,
    trace_layer_map,
    window_plan,
)

TINY = MoELMConfig(context_length=16, hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2,
                   expert_ffn_size=16)
MODEL_METADATA = {"num_layers": 2, "num_experts": 8, "top_k": 2, "renormalize": True, "hidden_size": 32,
                  "expert_ffn_size": 16, "name": "test"}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, above all on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



def synthetic_trace(tokens: int = 40, layers: int = 2, experts: int = 8, top_k: int = 2, renormalize: bool = True,
                    dtype=np.float32, costs: bool = True, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    model = {**MODEL_METADATA, "num_layers": layers, "num_experts": experts, "top_k": top_k,
             "renormalize": renormalize}
    skip = replace = None
    if costs:
        skip = rng.uniform(0.5, 1.5, size=(layers, experts))
        upper = np.triu(rng.uniform(0.1, 1.0, size=(layers, experts, experts)), k=1)
        replace = upper + np.swapaxes(upper, 1, 2)
    return Trace(router_logits=rng.standard_normal((tokens, layers, experts)).astype(dtype),
                 header=make_header(model, {"split": "test"}, {"quantile": 0.99} if costs else None),
                 token_ids=rng.integers(0, 256, size=tokens), skip_cost=skip, replace_cost=replace)


@pytest.fixture
def trace_file(tmp_path):
    return save_trace(synthetic_trace(), tmp_path / "tiny.trace.npz")


# -- format -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_trace_round_trip_is_exact(tmp_path, dtype):
    trace = synthetic_trace(dtype=dtype)
    loaded = load_trace(save_trace(trace, tmp_path / "t.npz"))
    assert loaded == trace
    assert loaded.router_logits.dtype == dtype
    assert np.array_equal(loaded.replace_cost, trace.replace_cost)


def test_trace_round_trip_without_costs(tmp_path):
    trace = synthetic_trace(costs=False)
    loaded = load_trace(save_trace(trace, tmp_path / "t.npz"))
    assert loaded == trace
    assert not loaded.has_costs


def test_trace_save_keeps_exact_path(tmp_path):
    path = save_trace(synthetic_trace(), tmp_path / "plain.trace")
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["plain.trace"]


def test_trace_truncated_file_names_file(tmp_path, trace_file):
    data = trace_file.read_bytes()
    trace_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match=r"cannot read trace file .*tiny\.trace\.npz: it is truncated or corrupt"):
        load_trace(trace_file)


def test_trace_corrupt_member_names_file(tmp_path, trace_file):
    data = bytearray(trace_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    trace_file.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"tiny\.trace\.npz"):
        load_trace(trace_file)


def test_trace_not_a_zip_names_file(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("not a trace", encoding="utf-8")
    with pytest.raises(TraceFormatError, match=r"cannot read trace file .*text\.npz"):
        load_trace(path)


def test_trace_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_trace(tmp_path / "absent.npz")


def test_trace_missing_logits_names_file(tmp_path):
    path = tmp_path / "nologits.npz"
    header = json.dumps(synthetic_trace().header).encode()
    np.savez(path, header=np.frombuffer(header, dtype=np.uint8))
    with pytest.raises(TraceFormatError, match=r"nologits\.npz has no router_logits array"):
        load_trace(path)


def test_trace_header_shape_mismatch_names_file(tmp_path):
    trace = synthetic_trace()
    path = tmp_path / "bad.npz"
    header = dict(trace.header, model={**trace.header["model"], "num_experts": 4})
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             router_logits=trace.router_logits)
    with pytest.raises(TraceFormatError, match=r"bad\.npz router_logits has shape \(40, 2, 8\), but the header "
                                               r"expects .*num_experts=4"):
        load_trace(path)


def test_trace_header_invalid_json_names_file(tmp_path):
    path = tmp_path / "badjson.npz"
    np.savez(path, header=np.frombuffer(b"{not json", dtype=np.uint8), router_logits=np.zeros((2, 2, 8)))
    with pytest.raises(TraceFormatError, match=r"badjson\.npz has a header that is not valid JSON"):
        load_trace(path)


def test_trace_rejects_asymmetric_replace_cost(tmp_path):
    trace = synthetic_trace()
    trace.replace_cost[0, 0, 1] += 0.5
    with pytest.raises(TraceFormatError, match="replace_cost is not symmetric"):
        save_trace(trace, tmp_path / "asymmetric.npz")
    assert not (tmp_path / "asymmetric.npz").exists()


def test_trace_rejects_nan_logits(tmp_path):
    trace = synthetic_trace()
    trace.router_logits[3, 1, 2] = np.nan
    with pytest.raises(TraceFormatError, match="NaN or infinite"):
        save_trace(trace, tmp_path / "nan.npz")


def test_trace_file_is_a_plain_npz(trace_file):
    with zipfile.ZipFile(trace_file) as archive:
        names = sorted(archive.namelist())
    assert names == ["header.npy", "replace_cost.npy", "router_logits.npy", "skip_cost.npy", "token_ids.npy"]


# -- replay -----------------------------------------------------------------------


def test_layer_map_blocks_of_scenario_layers():
    layer_map = trace_layer_map(32, 4)
    assert np.array_equal(layer_map, np.repeat(np.arange(4), 8))


def test_layer_map_identity_and_subsampling():
    assert np.array_equal(trace_layer_map(4, 4), np.arange(4))
    assert np.array_equal(trace_layer_map(2, 4), [0, 2])


def test_gate_source_replays_consecutive_tokens():
    trace = synthetic_trace(tokens=40)
    source = TraceGateSource(trace, num_layers=6, tokens_per_episode=5)
    source.reset(np.random.default_rng(1))
    first = source.next_token()
    start = source.position
    second = source.next_token()
    assert 0 <= start <= 35
    assert source.position == start + 1
    layer_map = trace_layer_map(6, 2)
    assert np.array_equal(first, trace.router_logits[start][layer_map])
    assert np.array_equal(second, trace.router_logits[start + 1][layer_map])


def test_gate_source_starts_vary_with_generator():
    source = TraceGateSource(synthetic_trace(tokens=200), num_layers=2, tokens_per_episode=4)
    starts = set()
    for seed in range(20):
        source.reset(np.random.default_rng(seed))
        source.next_token()
        starts.add(source.position)
    assert len(starts) > 10


def test_gate_source_seek_and_wrap():
    trace = synthetic_trace(tokens=10)
    source = TraceGateSource(trace, num_layers=2, tokens_per_episode=4)
    source.seek(9)
    source.reset(np.random.default_rng(0))
    source.next_token()
    assert source.position == 9
    assert np.array_equal(source.next_token(), trace.router_logits[0])


def test_gate_source_requires_reset():
    source = TraceGateSource(synthetic_trace(), num_layers=2, tokens_per_episode=4)
    with pytest.raises(RuntimeError, match="before reset"):
        source.next_token()


def test_scenario_trace_builds_measured_profile(trace_file):
    scenario = ScenarioConfig(gate_source="trace", gate_trace_path=str(trace_file))
    trace = load_trace(trace_file)
    profile = build_profile(scenario)
    layer_map = trace_layer_map(32, 2)
    assert np.array_equal(profile.skip_cost, trace.skip_cost[layer_map])
    assert np.array_equal(profile.replace_cost, trace.replace_cost[layer_map])
    assert isinstance(build_gate_source(scenario), TraceGateSource)


def test_env_replays_trace_gates(trace_file):
    trace = load_trace(trace_file)
    env = WideDecodeEnv(gate_source="trace", gate_trace_path=str(trace_file), tokens_per_episode=3)
    _, info = env.reset(seed=4)
    start = env.gate_source.position
    layer_map = trace_layer_map(env.num_layers, trace.num_layers)
    for step in range(env.max_steps):
        state = info["privileged"]["state"]
        expected = softmax(trace.router_logits[start + state.token, layer_map[state.layer]].astype(np.float64))
        assert np.allclose(state.gates, expected)
        _, _, _, truncated, info = env.step(np.ones(env.num_experts, dtype=np.int8))
    assert truncated


def test_env_rejects_trace_with_other_expert_count(tmp_path):
    path = save_trace(synthetic_trace(experts=4, top_k=2), tmp_path / "four.npz")
    with pytest.raises(ValueError, match=r"trace .*four\.npz does not fit moe_preset 'mixtral-8x7b': it has 4 "
                                         r"experts per layer, the scenario 8"):
        WideDecodeEnv(gate_source="trace", gate_trace_path=str(path))


def test_env_rejects_trace_with_other_top_k(trace_file):
    with pytest.raises(ValueError, match=r"tiny\.trace\.npz does not fit .*routes Top-2, the scenario Top-1"):
        WideDecodeEnv(gate_source="trace", gate_trace_path=str(trace_file), top_k=1)


def test_env_rejects_trace_without_costs(tmp_path):
    path = save_trace(synthetic_trace(costs=False), tmp_path / "nocost.npz")
    with pytest.raises(ValueError, match=r"nocost\.npz has no skip_cost/replace_cost tables"):
        WideDecodeEnv(gate_source="trace", gate_trace_path=str(path))


def test_env_reports_corrupt_trace(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(TraceFormatError, match=r"corrupt\.npz"):
        WideDecodeEnv(gate_source="trace", gate_trace_path=str(path))


def test_trace_source_needs_builtin_or_path():
    scenario = ScenarioConfig(moe_preset="deepseek-v3", num_nodes=8, gate_source="trace")
    with pytest.raises(ValueError, match="moe_preset 'deepseek-v3' has no built-in routing trace"):
        build_profile(scenario)


def test_builtin_trace_table_matches_files():
    assert set(BUILTIN_TRACES) == set(BUILTIN_TRACE_FILES)
    for preset, path in BUILTIN_TRACES.items():
        assert path.name == BUILTIN_TRACE_FILES[preset]


# -- recording --------------------------------------------------------------------


@pytest.mark.parametrize("tokens, context, stride", [(100, 16, 8), (16, 16, 8), (5, 16, 8), (37, 10, 3)])
def test_window_plan_records_each_position_once(tokens, context, stride):
    context = min(context, tokens)
    recorded = np.zeros(tokens, dtype=int)
    for start, first in window_plan(tokens, context, stride):
        assert start + context <= tokens
        recorded[max(start, first):start + context] += 1
        if start > 0:
            assert max(start, first) - start >= context - stride
    assert np.all(recorded == 1)


def test_record_run_matches_single_forward():
    torch.manual_seed(0)
    model = MoELanguageModel(TINY).eval()
    ids = np.random.default_rng(0).integers(0, 256, size=16)
    run = record_run(MoELMAccess(model), ids, keep_inputs=True)
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None], capture=True)
    expected = torch.stack(out.router_logits, dim=2)[0].numpy()
    assert np.allclose(run.router_logits, expected, atol=1e-6)
    assert np.allclose(run.inputs[:, 1], out.moe_inputs[1][0].numpy(), atol=1e-6)


def test_record_run_windows_give_context():
    torch.manual_seed(0)
    model = MoELanguageModel(TINY).eval()
    ids = np.random.default_rng(1).integers(0, 256, size=40)
    run = record_run(MoELMAccess(model), ids, stride=8)
    with torch.no_grad():
        out = model(torch.from_numpy(ids[16:32])[None])
    # Positions 24..31 come from the window starting at 16, so they match a forward over that window.
    assert np.allclose(run.router_logits[24:32, 0], out.router_logits[0][0, 8:].numpy(), atol=1e-6)


def test_record_trace_of_own_model(tmp_path):
    torch.manual_seed(0)
    model = MoELanguageModel(TINY).eval()
    rng = np.random.default_rng(2)
    trace = record_trace(MoELMAccess(model, {"name": "tiny"}), rng.integers(0, 256, 48),
                         rng.integers(0, 256, 64), quantile=0.9)
    assert trace.router_logits.shape == (48, 2, 8)
    assert trace.has_costs
    assert trace.header["costs"]["quantile"] == 0.9
    assert trace.model["name"] == "tiny"
    assert load_trace(save_trace(trace, tmp_path / "own.npz")) == trace


# -- transformers recorders ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_transformers_model(kind: str):
    """Build a tiny random model once per kind; the tests only read it and remove their hooks."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=8, intermediate_size=16, **common)
        model_class = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=16, intermediate_size=16,
                                             shared_expert_intermediate_size=16, norm_topk_prob=False, **common)
        model_class = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(num_experts=8, intermediate_size=16, norm_topk_prob=False, **common)
        model_class = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("gate.weight"):
            # Qwen2-MoE initialises routers to zero; random routers give distinct logits to compare.
            torch.nn.init.normal_(parameter, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_transformers_recorder_without_network(kind, tmp_path, monkeypatch):
    from wide_env.trace import TransformersMoEAccess

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_transformers_model(kind)
    access = TransformersMoEAccess(model)
    assert (access.num_layers, access.num_experts, access.top_k) == (2, 8, 2)
    assert access.renormalize == (kind == "mixtral")
    rng = np.random.default_rng(0)
    trace = record_trace(access, rng.integers(0, 64, 40), rng.integers(0, 64, 64), context_length=20, stride=10)
    assert trace.router_logits.shape == (40, 2, 8)
    assert trace.has_costs
    assert trace.model["source"] == "transformers"
    assert load_trace(save_trace(trace, tmp_path / f"{kind}.npz")) == trace


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_transformers_hooks_match_router_output(kind):
    from wide_env.trace import TransformersMoEAccess

    model = tiny_transformers_model(kind)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 64, (2, 12)))
    output_logits, output_inputs = TransformersMoEAccess(model, method="output").run(ids)
    hook_logits, _ = TransformersMoEAccess(model, method="hooks").run(ids)
    with torch.no_grad():
        direct = model(input_ids=ids, output_router_logits=True).router_logits
    for layer in range(2):
        assert torch.allclose(output_logits[layer], hook_logits[layer])
        assert torch.allclose(output_logits[layer], direct[layer].reshape(-1, 8).float())
        assert output_inputs[layer].shape == (24, 32)


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_transformers_expert_outputs_rebuild_block_output(kind):
    from wide_env.measure import routing_of
    from wide_env.trace import TransformersMoEAccess

    model = tiny_transformers_model(kind)
    access = TransformersMoEAccess(model)
    block_outputs = []
    handle = access.blocks[0].register_forward_hook(lambda m, a, out: block_outputs.append(out))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 64, (1, 12)))
    logits, inputs = access.run(ids)
    handle.remove()
    outputs = access.expert_outputs(0, inputs[0]).double().numpy()
    _, indices, weights = routing_of(logits[0].numpy(), access.top_k, access.renormalize)
    rebuilt = np.einsum("nk,nkd->nd", weights, outputs[np.arange(12)[:, None], indices])
    block = block_outputs[-1][0] if isinstance(block_outputs[-1], tuple) else block_outputs[-1]
    assert np.allclose(rebuilt, block.reshape(12, -1).double().numpy(), atol=1e-5)


def test_transformers_access_rejects_dense_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    from wide_env.trace import TransformersMoEAccess

    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE blocks"):
        TransformersMoEAccess(transformers.LlamaForCausalLM(config))


# -- built-in traces ----------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(BUILTIN_TRACES))
def test_builtin_trace_fits_its_preset(preset):
    path = BUILTIN_TRACES[preset]
    if not path.is_file():
        pytest.skip(f"{path} is not built")
    trace = load_trace(path)
    architecture = ScenarioConfig(moe_preset=preset).architecture
    assert (trace.num_experts, trace.top_k, trace.renormalize) == \
        (architecture.num_experts, architecture.top_k, architecture.renormalize)
    assert trace.has_costs
    assert (path.parent / trace.model["checkpoint"]).is_file()
    oracle = {row["decisions"]: row for row in trace.header["bound_report"]["rows"]}["oracle"]
    assert oracle["bound_held_rate"] >= 0.95


def test_shipped_data_under_size_limit():
    files = [p for p in BUILTIN_TRACES["mixtral-8x7b"].parent.glob("*") if p.suffix in (".pt", ".npz")]
    if not files:
        pytest.skip("no shipped data built")
    assert sum(p.stat().st_size for p in files) < 20e6
