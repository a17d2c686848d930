"""Tests of the small MoE language model, its corpus and its training command."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from train.moe_lm import TrainSettings, evaluate, learning_rate_at, train_model
from wide_env.config import ScenarioConfig
from wide_env.corpus import ByteTokenizer, load_corpus, unigram_perplexity
from wide_env.moe_lm import (
    MODEL_PRESETS,
    CheckpointError,
    MoELanguageModel,
    MoELMConfig,
    load_checkpoint,
    save_checkpoint,
)
from wide_env.trace import DATA_DIR

TINY = MoELMConfig(context_length=16, hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2,
                   expert_ffn_size=16)
SHIPPED = {"mixtral-like": DATA_DIR / "mixtral_like.pt", "olmoe-like": DATA_DIR / "olmoe_like.pt"}


def tiny_model(config: MoELMConfig = TINY, seed: int = 0) -> MoELanguageModel:
    torch.manual_seed(seed)
    return MoELanguageModel(config).eval()


@pytest.fixture
def one_thread():
    # One thread is faster for tiny models on a busy machine, and training reproducibility assumes a fixed count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def text_file(tmp_path):
    words = ["expert", "router", "token", "layer", "energy", "channel", "node", "gate", "skip", "replace"]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=3000)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


# -- corpus -----------------------------------------------------------------------


def test_corpus_default_is_pydoc_topics():
    corpus = load_corpus()
    assert corpus.source == "pydoc_data.topics"
    assert len(corpus.tokens) > 100_000
    assert corpus.tokens.min() >= 0
    assert corpus.tokens.max() < 256


def test_corpus_splits_partition_the_text(text_file):
    corpus = load_corpus(text_file, block_size=256)
    parts = [corpus.split(name) for name in ("train", "validation", "heldout")]
    assert sum(len(p) for p in parts) == len(corpus.tokens)
    assert len(parts[1]) > 0
    assert len(parts[2]) > 0
    assert np.array_equal(parts[1][:256], corpus.tokens[8 * 256:9 * 256])
    assert np.array_equal(parts[2][:256], corpus.tokens[9 * 256:10 * 256])


def test_corpus_splits_are_deterministic(text_file):
    first = load_corpus(text_file, block_size=256)
    second = load_corpus(text_file, block_size=256)
    assert first.sha256 == second.sha256
    for name in ("train", "validation", "heldout"):
        assert np.array_equal(first.split(name), second.split(name))


def test_corpus_empty_file_names_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus .*empty\.txt is empty"):
        load_corpus(path)


def test_corpus_too_short_names_file(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.txt is too short: 16 bytes"):
        load_corpus(path, block_size=64)


def test_corpus_missing_file():
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus("/nonexistent/corpus.txt")


def test_corpus_invalid_split(text_file):
    with pytest.raises(ValueError, match="invalid split 'test'"):
        load_corpus(text_file, block_size=256).split("test")


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "naïve λ-calculus\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unigram_perplexity_of_uniform_text():
    tokens = np.arange(256).repeat(4)
    assert unigram_perplexity(tokens, tokens) == pytest.approx(256.0)


# -- model ------------------------------------------------------------------------


def test_model_presets_match_scenario_presets():
    pairs = {"mixtral-like": "mixtral-8x7b", "olmoe-like": "olmoe-1b-7b"}
    for model_preset, scenario_preset in pairs.items():
        config = MODEL_PRESETS[model_preset]
        architecture = ScenarioConfig(moe_preset=scenario_preset).architecture
        assert (config.num_experts, config.top_k, config.renormalize) == \
            (architecture.num_experts, architecture.top_k, architecture.renormalize)


def test_fine_grained_preset_has_many_experts():
    config = MODEL_PRESETS["olmoe-like"]
    assert config.num_experts >= 32
    assert config.top_k in (4, 8)


def test_forward_shapes_and_loss():
    model = tiny_model()
    ids = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        out = model(ids, ids, capture=True)
    assert out.logits.shape == (3, 16, 256)
    assert len(out.router_logits) == TINY.num_layers
    assert out.router_logits[0].shape == (3, 16, TINY.num_experts)
    assert out.moe_inputs[0].shape == (3, 16, TINY.hidden_size)
    assert math.isfinite(float(out.loss))
    assert float(out.loss) == pytest.approx(float(out.lm_loss) + TINY.aux_loss_coef * float(out.aux_loss))


def test_forward_rejects_long_input():
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        tiny_model()(torch.zeros((1, 17), dtype=torch.long))


def test_moe_layer_equals_dense_top_k_sum():
    model = tiny_model()
    layer = model.blocks[0].moe
    x = torch.randn(2, 16, TINY.hidden_size)
    with torch.no_grad():
        out = layer(x)
        _, indices, weights = layer.top_k_weights(out.router_logits)
        all_outputs = layer.all_expert_outputs(x.reshape(-1, TINY.hidden_size)).reshape(2, 16, 8, -1)
        chosen = torch.gather(all_outputs, 2, indices[..., None].expand(-1, -1, -1, TINY.hidden_size))
        expected = (chosen * weights[..., None]).sum(2)
    assert torch.allclose(out.output, expected, atol=1e-6)


def test_renormalised_top_k_weights_sum_to_one():
    layer = tiny_model().blocks[0].moe
    _, _, weights = layer.top_k_weights(torch.randn(5, 8))
    assert torch.allclose(weights.sum(-1), torch.ones(5))


def test_unnormalised_top_k_weights_are_probabilities():
    config = dataclasses.replace(TINY, renormalize=False)
    layer = tiny_model(config).blocks[0].moe
    probs, _, weights = layer.top_k_weights(torch.randn(5, 8))
    assert torch.all(weights.sum(-1) < 1.0)
    assert torch.allclose(weights, probs.topk(2, dim=-1).values)


def test_routing_override_with_top_k_matches_forward():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 16))

    def top_k_routing(layer_index, logits):
        _, indices, weights = model.blocks[layer_index].moe.top_k_weights(logits)
        return torch.zeros_like(logits).scatter(-1, indices, weights)

    with torch.no_grad():
        plain = model(ids).logits
        overridden = model(ids, routing=top_k_routing).logits
    assert torch.allclose(plain, overridden, atol=1e-6)


def test_routing_override_skipping_everything_removes_moe():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        out = model(ids, routing=lambda layer, logits: torch.zeros_like(logits), capture=True)
    assert all(torch.count_nonzero(o) == 0 for o in out.moe_outputs)


def test_routing_override_wrong_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"returned shape \(1, 16, 3\), expected \(1, 16, 8\)"):
        model(torch.zeros((1, 16), dtype=torch.long), routing=lambda layer, logits: logits[..., :3])


def test_aux_loss_is_one_for_uniform_router():
    model = tiny_model()
    for block in model.blocks:
        torch.nn.init.zeros_(block.moe.router.weight)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (4, 16)))
    # All-zero logits give P_e = 1/E, so E * sum_e f_e * P_e = sum_e f_e = 1 however the ties are broken.
    assert float(out.aux_loss) == pytest.approx(1.0)


def test_config_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="invalid top_k: expected at most num_experts=4, got 5"):
        MoELMConfig(num_experts=4, top_k=5)


# -- training ---------------------------------------------------------------------


def test_training_is_reproducible_from_seed(text_file, one_thread):
    corpus = load_corpus(text_file, block_size=256)
    settings = TrainSettings(steps=4, batch_size=4, warmup_steps=2, eval_every=0, seed=3)
    first = train_model(TINY, corpus, settings, log_every=0).model.state_dict()
    second = train_model(TINY, corpus, settings, log_every=0).model.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_training_seed_changes_weights(text_file, one_thread):
    corpus = load_corpus(text_file, block_size=256)
    settings = TrainSettings(steps=2, batch_size=4, warmup_steps=1, eval_every=0, seed=0)
    first = train_model(TINY, corpus, settings, log_every=0).model.state_dict()
    second = train_model(TINY, corpus, dataclasses.replace(settings, seed=1), log_every=0).model.state_dict()
    assert not torch.equal(first["token_embedding.weight"], second["token_embedding.weight"])


def test_training_lowers_validation_loss(text_file, one_thread):
    corpus = load_corpus(text_file, block_size=256)
    settings = TrainSettings(steps=20, batch_size=8, warmup_steps=5, eval_every=20, seed=0)
    result = train_model(TINY, corpus, settings, log_every=0)
    assert result.history[-1]["validation_loss"] < math.log(256) - 1.0


def test_learning_rate_schedule_endpoints():
    settings = TrainSettings(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    assert learning_rate_at(0, settings) == pytest.approx(1e-4)
    assert learning_rate_at(9, settings) == pytest.approx(1e-3)
    assert learning_rate_at(100, settings) == pytest.approx(1e-4)


# -- checkpoints ------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "model.pt", {"note": "tiny", "value": 1.5})
    loaded, metadata = load_checkpoint(path, expected=TINY)
    assert metadata == {"note": "tiny", "value": 1.5}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.float16).float()), name


def test_checkpoint_wrong_tensor_shape_names_file_and_tensor(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["blocks.0.moe.router.weight"] = torch.zeros(4, TINY.hidden_size, dtype=torch.float16)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt has the wrong shape for blocks\.0\.moe\.router\.weight: "
                                              r"\(4, 32\), but its config needs \(8, 32\)"):
        load_checkpoint(path)


def test_checkpoint_of_other_config_names_fields(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt has the wrong shape: num_experts=8 \(expected 16\)"):
        load_checkpoint(path, expected=dataclasses.replace(TINY, num_experts=16))


def test_checkpoint_truncated_names_file(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read model checkpoint .*model\.pt"):
        load_checkpoint(path)


def test_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_checkpoint_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tiny_model(), tmp_path / "model.pt", {"array": np.zeros(2)})


# -- shipped checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(SHIPPED))
def test_shipped_checkpoint_beats_unigram(preset, one_thread):
    path = SHIPPED[preset]
    if not path.is_file():
        pytest.skip(f"{path} is not built")
    model, metadata = load_checkpoint(path, expected=MODEL_PRESETS[preset])
    corpus = load_corpus()
    validation = corpus.split("validation")[:4097]
    unigram = unigram_perplexity(corpus.split("train"), corpus.split("validation"))
    perplexity = evaluate(model, validation)["perplexity"]
    assert perplexity < unigram / 2
    assert metadata["validation_perplexity"] < metadata["unigram_validation_perplexity"] / 2
