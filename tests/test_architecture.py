"""Model shape from HF config.json or arguments; Llama-3 RoPE scaling as HF computes it."""

import json

import pytest
import torch

from megatron_prm.config import ConfigError, ModelArguments
from megatron_prm.model.architecture import resolve_architecture

LLAMA31 = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def write_config(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_hf_config_is_read(tmp_path):
    arch = resolve_architecture(ModelArguments(model_config=write_config(tmp_path, LLAMA31)), 256, 128)
    assert (arch.num_hidden_layers, arch.hidden_size, arch.num_key_value_heads, arch.head_dim) == (2, 64, 2, 8)
    assert arch.rope_theta == 500000.0 and arch.tie_word_embeddings and arch.vocab_size == 300
    assert arch.rope_scaling.factor == 32.0 and arch.rope_scaling.original_max_position_embeddings == 64


def test_explicit_fields_must_agree_with_the_config(tmp_path):
    path = write_config(tmp_path, LLAMA31)
    assert resolve_architecture(ModelArguments(model_config=path, hidden_size=64), 256, 128).hidden_size == 64
    with pytest.raises(ConfigError, match="hidden_size=128 contradicts 64"):
        resolve_architecture(ModelArguments(model_config=path, hidden_size=128), 256, 128)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"vocab_size": 100}, "smaller than the tokenizer"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_bad_configs_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_architecture(ModelArguments(model_config=write_config(tmp_path, {**LLAMA31, **change})), 256, 128)


def test_mistral_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    mistral = {**LLAMA31, "model_type": "mistral", "rope_scaling": None, "sliding_window": 64}
    with pytest.raises(ConfigError, match="sliding_window 64"):
        resolve_architecture(ModelArguments(model_config=write_config(tmp_path, mistral)), 256, 128)
    assert resolve_architecture(ModelArguments(model_config=write_config(tmp_path, mistral)), 256, 64)


def test_shape_from_arguments_alone():
    arch = resolve_architecture(ModelArguments(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4), 1000, 256)
    assert (arch.num_key_value_heads, arch.head_dim, arch.vocab_size, arch.max_position_embeddings) == (4, 8, 1000, 256)
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_architecture(ModelArguments(hidden_size=32), 1000, 256)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    arch = resolve_architecture(ModelArguments(model_config=write_config(tmp_path, LLAMA31)), 256, 128)
    init_runtime("cpu", seed=0)
    try:
        model = build_model_chunks(arch, (1, 2), 128, ModelBuildOptions(use_cpu_initialization=True))[0]
        ours = model.rotary_pos_emb.inv_freq
    finally:
        shutdown()
    hf_config = LlamaConfig(**{k: v for k, v in LLAMA31.items() if k != "model_type"})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    torch.testing.assert_close(ours.float(), expected.float(), rtol=1e-6, atol=0)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    assert not torch.allclose(ours.float(), plain)  # the scaling did change something
