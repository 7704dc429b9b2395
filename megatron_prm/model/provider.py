"""Build the Megatron-Core model chunks of this rank from a resolved architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_prm.model.architecture import LlamaArchitecture
from megatron_prm.model.prm_model import PRMGPTModel

# Megatron pads the vocabulary so that every tensor-parallel shard has a multiple of this many rows.
VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class Precision:
    bf16: bool = False
    fp16: bool = False

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass(frozen=True)
class ModelBuildOptions:
    """How this process builds its share of the model."""

    precision: Precision = Precision()
    use_transformer_engine: bool = False
    use_cpu_initialization: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config(arch: LlamaArchitecture, options: ModelBuildOptions) -> TransformerConfig:
    """Megatron's TransformerConfig for a Llama/Mistral-family model (RMSNorm, SwiGLU, RoPE, GQA)."""
    te = options.use_transformer_engine
    return TransformerConfig(
        num_layers=arch.num_hidden_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        bf16=options.precision.bf16,
        fp16=options.precision.fp16,
        params_dtype=options.precision.params_dtype,
        pipeline_dtype=options.precision.params_dtype,
        tensor_model_parallel_size=options.tensor_parallel_size,
        pipeline_model_parallel_size=options.pipeline_parallel_size,
        use_cpu_initialization=options.use_cpu_initialization,
        # The loss function returns (sum, count); Megatron divides by the global count.
        calculate_per_token_loss=True,
        # Fused kernels exist only with Transformer Engine on a GPU.
        masked_softmax_fusion=False,
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=te,
    )


def layer_spec(use_transformer_engine: bool) -> ModuleSpec:
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _apply_rope_scaling(model: PRMGPTModel, arch: LlamaArchitecture) -> None:
    """Llama-3 frequency scaling with the checkpoint's own factors.

    Megatron's RotaryEmbedding hard-codes low/high frequency factors 1/4 and an original context of
    8192; HF configs state them, so the inverse frequencies are recomputed from the config's values.
    """
    if arch.rope_scaling is None or not hasattr(model, "rotary_pos_emb"):
        return
    rotary = model.rotary_pos_emb
    scaling = arch.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def build_model_chunks(
    arch: LlamaArchitecture,
    reward_token_ids: tuple[int, int],
    max_seq_len: int,
    options: ModelBuildOptions,
) -> list[PRMGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), not yet wrapped for DDP."""
    config = transformer_config(arch, options)
    spec = layer_spec(options.use_transformer_engine)
    vocab = padded_vocab_size(arch.vocab_size, options.tensor_parallel_size)
    chunks = []
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    for vp_stage in range(vp_size):
        model = PRMGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=max(max_seq_len, arch.max_position_embeddings),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            vp_stage=vp_stage if vp_size > 1 else None,
            reward_token_ids=reward_token_ids,
        )
        _apply_rope_scaling(model, arch)
        if not options.use_cpu_initialization:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
