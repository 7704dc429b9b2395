"""FLOPs by Megatron-LM's num_floating_point_operations (megatron/training/training.py, dense path)."""

import json

import pytest

from megatron_prm.flops import ModelShape, flops_per_token, training_flops
from megatron_prm.model.architecture import Architecture

LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, kv_channels=128, vocab_size=128256)


def megatron_transformer_flops(shape: ModelShape, batch_size: int, seq_length: int) -> float:
    """Megatron-LM's transformer_flops() for a dense model with GQA and SwiGLU, term by term as written
    there (MHA/GQA branch, no MoE, no MTP, no output gate)."""
    forward_backward_expansion_factor = 3
    fma_expansion_factor = 2
    ffn_expansion_factor = 3  # swiglu
    query_projection_size = shape.kv_channels * shape.num_attention_heads
    key_projection_size = shape.kv_channels * shape.num_query_groups
    value_projection_size = shape.kv_channels * shape.num_query_groups
    standard_self_attn_term = forward_backward_expansion_factor * fma_expansion_factor * (
        shape.hidden_size * (query_projection_size + key_projection_size + value_projection_size)
        + query_projection_size * seq_length / 2 * 2
        + query_projection_size * shape.hidden_size)
    self_attn_term = standard_self_attn_term * shape.num_layers
    return batch_size * seq_length * (
        forward_backward_expansion_factor * fma_expansion_factor * shape.hidden_size
        * (shape.ffn_hidden_size * ffn_expansion_factor) * shape.num_layers
        + self_attn_term
        + forward_backward_expansion_factor * fma_expansion_factor * shape.hidden_size * shape.vocab_size)


def test_llama3_8b_reference_figures():
    assert flops_per_token(LLAMA3_8B, 4096, with_logits=True) == pytest.approx(4.824918e10, rel=1e-6)
    assert flops_per_token(LLAMA3_8B, 4096, with_logits=False) == pytest.approx(4.509716e10, rel=1e-6)


@pytest.mark.parametrize("shape", [
    LLAMA3_8B,
    ModelShape(num_layers=3, hidden_size=96, ffn_hidden_size=250, num_attention_heads=6, num_query_groups=2,
               kv_channels=24, vocab_size=1024),  # head_dim x heads != hidden, as Qwen3
])
def test_equals_megatron_formula(shape):
    for seq in (1, 37, 2048, 8192):
        assert training_flops(shape, [seq] * 3, with_logits=True) == pytest.approx(
            megatron_transformer_flops(shape, 3, seq), rel=1e-12)


def test_packed_row_attention_belongs_to_each_sample():
    shape = LLAMA3_8B
    packed = training_flops(shape, [1000, 3000, 96], with_logits=False)
    separately = sum(flops_per_token(shape, s, with_logits=False) * s for s in (1000, 3000, 96))
    assert packed == pytest.approx(separately, rel=1e-12)
    assert packed < flops_per_token(shape, 4096, with_logits=False) * 4096
    assert training_flops(shape, [], with_logits=True) == 0.0
    with pytest.raises(ValueError):
        training_flops(shape, [-1], with_logits=True)


def test_shape_from_architecture():
    arch = Architecture(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             initializer_range=0.02)
    assert ModelShape.from_architecture(arch, 128256) == LLAMA3_8B
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_architecture(arch, 0)


def test_plan_prints_flops_per_token(capsys):
    from megatron_prm.cli import main

    code = main(["plan", "--config", "examples/configs/llama3_8b_prm.yaml", "--model_name_or_path", "",
                 "--model_config", "examples/configs/llama3_8b_config.json", "--tensor_parallel_degree", "1",
                 "--sequence_parallel", "false", "--gpu-memory-gib", "10000"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["flops_per_token"] == pytest.approx(4.509716e10, rel=1e-6)
    assert result["flops_per_token_with_lm_logits"] == pytest.approx(4.824918e10, rel=1e-6)
    assert "training FLOPs per token at max_seq_len (Megatron-LM's formula): 4.5097e+10" in captured.err


def test_moe_counts_the_active_experts_by_hand():
    """A tiny Qwen2-MoE (h 64, 8 heads of 8, 2 KV heads, 4 experts of 32 of which 2 per token, a shared
    expert of 48, 2 layers, padded vocabulary 384) at s = 10, counted GEMM by GEMM."""
    arch = Architecture.from_hf_config({
        "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}, "test")
    shape = ModelShape.from_architecture(arch, 384)
    # forward multiply-adds per token and layer: QKV 64 x (64 + 2 x 16) = 6144; QK^T and scores x V over
    # half of the 10 x 10 causal scores: 2 x 64 x 10 / 2 = 640; output projection 64 x 64 = 4096;
    # two routed experts 2 x 3 x 64 x 32 = 12288; shared expert 3 x 64 x 48 = 9216 (the unused intermediate
    # size 96 and the two idle experts count nothing). Logits: 64 x 384 = 24576.
    per_layer = 6144 + 640 + 4096 + 12288 + 9216
    forward_backward = 3 * 2  # forward, weight gradient, input gradient; 2 FLOPs per multiply-add
    assert flops_per_token(shape, 10, with_logits=False) == forward_backward * 2 * per_layer
    assert flops_per_token(shape, 10, with_logits=True) == forward_backward * (2 * per_layer + 24576)
    dense = ModelShape.from_architecture(Architecture.from_hf_config({
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 2 * 32 + 48, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300}, "test"), 384)
    assert flops_per_token(dense, 10, with_logits=True) == flops_per_token(shape, 10, with_logits=True)


def test_moe_dense_layers_count_the_dense_mlp():
    """The same Qwen2-MoE with 4 layers, every second one sparse (decoder_sparse_step 2: layers 1 and 3) and
    layer 1 kept dense too (mlp_only_layers [1]): 3 dense layers of 3 x 64 x 96 and 1 sparse one, as
    Megatron-LM's formula weighs ffn_hidden_size by the share of moe_layer_freq zeros."""
    arch = Architecture.from_hf_config({
        "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2, "mlp_only_layers": [1]}, "test")
    assert [arch.layer_is_sparse(i) for i in range(4)] == [False, False, False, True]
    shape = ModelShape.from_architecture(arch, 384)
    assert shape.num_dense_layers == 3
    attention = 6144 + 640 + 4096
    dense_mlp, sparse_mlp = 3 * 64 * 96, 12288 + 9216
    per_token = 4 * attention + 3 * dense_mlp + sparse_mlp
    assert flops_per_token(shape, 10, with_logits=False) == 3 * 2 * per_token
