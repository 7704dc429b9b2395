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
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2}}, "explicit attention_factor"),
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
    # Qwen2 configs state a window that use_sliding_window switches off (Qwen2.5-Math: 4096 of 4096).
    qwen2 = {**mistral, "model_type": "qwen2", "use_sliding_window": False}
    arch = resolve_architecture(ModelArguments(model_config=write_config(tmp_path, qwen2)), 256, 128)
    assert arch.family.qkv_bias and not arch.family.qk_norm


def test_vocabulary_grows_only_by_added_special_tokens(tmp_path):
    path = write_config(tmp_path, {**LLAMA31, "vocab_size": 300})
    assert resolve_architecture(ModelArguments(model_config=path), 301, 128, added_tokens=1).vocab_size == 301
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        resolve_architecture(ModelArguments(model_config=path), 302, 128, added_tokens=1)


def test_mlp_reward_head_is_read_from_the_config_and_must_be_chosen(tmp_path):
    prm = {**LLAMA31, "model_type": "qwen2", "architectures": ["Qwen2ForProcessRewardModel"]}
    path = write_config(tmp_path, prm)
    with pytest.raises(ConfigError, match="set reward_head: mlp"):
        resolve_architecture(ModelArguments(model_config=path), 256, 128)
    arch = resolve_architecture(ModelArguments(model_config=path), 256, 128, reward_head="mlp")
    assert arch.reward_head == "mlp" and arch.to_hf_config()["architectures"] == ["Qwen2ForProcessRewardModel"]


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


QWEN2_MOE = {**LLAMA31, "model_type": "qwen2_moe", "rope_scaling": None, "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}


@pytest.mark.parametrize("change, message", [
    ({"mlp_only_layers": [0, 5]}, r"mlp_only_layers \[5\] name layers beyond the 2 there are"),
    ({"mlp_only_layers": [0, 1]}, "no layer of 'qwen2_moe' is sparse"),
    ({"decoder_sparse_step": 4}, "no layer of 'qwen2_moe' is sparse"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
    ({"mlp_only_layers": "0"}, "mlp_only_layers must be a list of layer indices"),
    ({"mlp_only_layers": [-1]}, "mlp_only_layers must list layer indices"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 exceeds num_experts 4"),
    ({"shared_expert_intermediate_size": None}, "lacks shared_expert_intermediate_size"),
    ({"qkv_bias": False}, "qkv_bias False is not supported"),
])
def test_bad_moe_configs_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_architecture(ModelArguments(model_config=write_config(tmp_path, {**QWEN2_MOE, **change})), 256, 128)


@pytest.mark.parametrize("step, only", [(1, []), (2, []), (1, [0, 3]), (3, [2]), (2, [5])])
def test_sparse_layers_are_those_transformers_builds(step, only):
    """``decoder_sparse_step`` / ``mlp_only_layers`` pick the same sparse layers as transformers' Qwen2-MoE
    and Qwen3-MoE decoder layers; Mixtral's are all sparse whatever its config says."""
    transformers = pytest.importorskip("transformers")
    from megatron_prm.model.architecture import Architecture

    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                 decoder_sparse_step=step, mlp_only_layers=only)
    for name, extra in (("Qwen2Moe", {"shared_expert_intermediate_size": 8}), ("Qwen3Moe", {"head_dim": 8})):
        config = getattr(transformers, f"{name}Config")(**shape, **extra)
        model = getattr(transformers, f"{name}ForCausalLM")(config)
        built = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.layers]
        arch = Architecture.from_hf_config(config.to_dict(), name)
        assert [arch.layer_is_sparse(i) for i in range(6)] == built, name
        assert arch.mixed_layers == (0 < sum(built) < 6)
    mixtral = Architecture.from_hf_config({**shape, "model_type": "mixtral", "num_local_experts": 2}, "mixtral")
    assert all(mixtral.layer_is_sparse(i) for i in range(6))


def test_expert_layout_is_checked(tmp_path):
    from megatron_prm.layout import model_split_problems

    moe = resolve_architecture(ModelArguments(model_config=write_config(tmp_path, QWEN2_MOE)), 256, 128)
    assert moe.moe.shared_expert_intermediate_size == 48 and not moe.moe.norm_topk_prob
    assert model_split_problems(moe, 2, 1, ep=2) == []
    assert model_split_problems(moe, 1, 1, ep=3, etp=3) == [
        "num_experts 4 is not divisible by expert_parallel_degree 3",
        "moe_intermediate_size 32 is not divisible by expert_tensor_parallel_degree 3"]
    dense = resolve_architecture(ModelArguments(model_config=write_config(tmp_path, LLAMA31)), 256, 128)
    assert "apply to Mixture-of-Experts models only" in model_split_problems(dense, 1, 1, ep=2)[0]
