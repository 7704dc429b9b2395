"""Build this rank's Megatron-Core model chunks from a resolved architecture and parallel layout."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_prm import megatron_compat, optional
from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture, LinearRopeScaling, Llama3RopeScaling, YarnRopeScaling
from megatron_prm.model.attention import PackedSDPAttention
from megatron_prm.model.load_balancing import megatron_load_balancing_coefficient
from megatron_prm.model.moe import MixtureOfExperts
from megatron_prm.model.norm import RMSNorm
from megatron_prm.model.prm_model import PRMGPTModel
from megatron_prm.model.recompute import RecomputedSelfAttention

# Megatron pads the vocabulary so that every tensor-parallel shard has a multiple of this many rows.
VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class Precision:
    bf16: bool = False
    fp16: bool = False
    fp16_opt_level: str = "O2"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def fp32_residual(self) -> bool:
        """fp16 O1 keeps the residual stream (and gradient reduction) in fp32."""
        return self.fp16 and self.fp16_opt_level == "O1"


@dataclass(frozen=True)
class Recompute:
    granularity: str = "full"  # full | full_attn | core_attn
    method: str = "uniform"
    num_layers: int = 1


@dataclass(frozen=True)
class ModelBuildOptions:
    """How this process builds its share of the model."""

    precision: Precision = Precision()
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    recompute: Optional[Recompute] = None
    use_transformer_engine: bool = False
    use_cpu_initialization: bool = False
    # Tokens of one micro batch (max_seq_len x micro batch size) that Transformer Engine's userbuffers
    # are sized for when tensor-parallel communication overlaps the GEMMs; 0: no such overlap.
    tp_comm_overlap_tokens: int = 0
    # MoE bases: the router z-loss coefficient (0: off), and the coefficient of Megatron-Core's own per-layer
    # load-balancing loss: 0 except under pipeline parallelism, where transformers' pooled one
    # (model/load_balancing.py, installed on the training model only) cannot be computed.
    moe_z_loss_coeff: float = 0.0
    megatron_aux_loss_coeff: float = 0.0

    @classmethod
    def from_config(cls, config: RunConfig, layout: ParallelLayout, use_transformer_engine: bool,
                    use_cpu_initialization: bool, arch_moe: Optional[MixtureOfExperts] = None) -> "ModelBuildOptions":
        t, p = config.training, config.parallel
        if t.fp8:
            optional.require("transformer_engine", "fp8")
            if not use_transformer_engine:
                raise ConfigError("fp8 needs Transformer Engine on a GPU; there is no GPU here")
        if p.tp_comm_overlap and not use_transformer_engine:
            raise ConfigError("tp_comm_overlap needs Transformer Engine on a GPU; it is not available here")
        return cls(
            precision=Precision(t.bf16, t.fp16, t.fp16_opt_level, t.fp8, t.fp8_recipe, t.fp8_amax_history_len,
                                t.fp8_amax_compute_algo),
            layout=layout,
            recompute=Recompute(p.recompute_granularity, p.recompute_method, p.recompute_num_layers) if p.recompute else None,
            use_transformer_engine=use_transformer_engine,
            use_cpu_initialization=use_cpu_initialization,
            tp_comm_overlap_tokens=(config.data.max_seq_len * t.per_device_train_batch_size
                                    if p.tp_comm_overlap else 0),
            moe_z_loss_coeff=t.moe_z_loss_coeff,
            megatron_aux_loss_coeff=megatron_load_balancing_coefficient(arch_moe, t.moe_aux_loss_coeff, layout),
        )


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _recompute_settings(recompute: Optional[Recompute]) -> dict:
    if recompute is None or recompute.granularity == "full_attn":  # full_attn lives in the layer spec
        return {}
    if recompute.granularity == "core_attn":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": recompute.method,
            "recompute_num_layers": recompute.num_layers}


def _fp8_settings(precision: Precision) -> dict:
    if not precision.fp8:
        return {}
    return {"fp8": precision.fp8, "fp8_recipe": precision.fp8_recipe,
            "fp8_amax_history_len": precision.fp8_amax_history_len,
            "fp8_amax_compute_algo": precision.fp8_amax_compute_algo}


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """TransformerConfig with the YaRN fields that GPTModel's ``position_embedding_type="yarn"`` and the
    attention's cos/sin scaling (``_yarn_get_concentration_factor_from_config``) read from the config by
    name; Megatron-Core declares them on its MLA config only. Checked on megatron-core 0.16.1 and 0.19.2."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True


def _yarn_settings(scaling: YarnRopeScaling) -> dict:
    # HF uses mscale / mscale_all_dim only when both are set and non-zero; Megatron-Core only when both
    # are not None: passing None otherwise gives both the default factor 0.1 ln(factor) + 1.
    both = bool(scaling.mscale and scaling.mscale_all_dim)
    return {"yarn_rotary_scaling_factor": scaling.factor,
            "yarn_original_max_position_embeddings": scaling.original_max_position_embeddings,
            "yarn_beta_fast": scaling.beta_fast, "yarn_beta_slow": scaling.beta_slow,
            "yarn_mscale": scaling.mscale if both else None,
            "yarn_mscale_all_dim": scaling.mscale_all_dim if both else None,
            "yarn_correction_range_round_to_int": scaling.truncate}


def _moe_settings(arch: Architecture, options: ModelBuildOptions) -> dict:
    """Megatron's MoE layer for a MoE family: dropless top-k routing (no capacity factor), the all-to-all
    token dispatcher, grouped GEMM where Transformer Engine provides it (SequentialMLP otherwise), the router
    z-loss with the configured coefficient. Megatron's load-balancing loss is off (the training model computes
    transformers' own, :mod:`megatron_prm.model.load_balancing`) except under pipeline parallelism."""
    moe = arch.moe
    if moe is None:
        return {}
    shared = moe.shared_expert_intermediate_size
    return {
        "num_moe_experts": moe.num_experts,
        # Qwen's dense layers among the sparse ones: Megatron's per-layer pattern (1: MoE). Every layer alike
        # stays the integer 1, whose checkpoint stacks the layers along one axis.
        "moe_layer_freq": [int(arch.layer_is_sparse(i)) for i in range(arch.num_hidden_layers)] if arch.mixed_layers else 1,
        "moe_router_topk": moe.num_experts_per_tok,
        "moe_ffn_hidden_size": moe.moe_intermediate_size,
        # HF takes a softmax over all experts, then the top k, renormalised if norm_topk_prob (always in
        # Mixtral). Renormalised equals Megatron's default (top k of the logits, softmax over those k);
        # not renormalised is Megatron's pre-softmax routing (softmax over all, then top k).
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not moe.norm_topk_prob,
        "moe_router_load_balancing_type": "aux_loss" if options.megatron_aux_loss_coeff else "none",
        "moe_aux_loss_coeff": options.megatron_aux_loss_coeff,
        "moe_z_loss_coeff": options.moe_z_loss_coeff or None,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": options.use_transformer_engine,
        # Qwen2-MoE: shared expert output x sigmoid(x . shared_expert_gate)
        "moe_shared_expert_intermediate_size": shared,
        "moe_shared_expert_gate": shared is not None,
    }


def transformer_config(arch: Architecture, options: ModelBuildOptions) -> TransformerConfig:
    """Megatron's TransformerConfig for the architecture (RMSNorm, SwiGLU, RoPE, GQA, the family's
    Q/K/V bias or per-head Q/K norm, and its experts)."""
    te = options.use_transformer_engine
    layout = options.layout
    precision = options.precision
    yarn = isinstance(arch.rope_scaling, YarnRopeScaling)
    config_class = YarnTransformerConfig if yarn else TransformerConfig
    return config_class(
        **arch.megatron_shape(),
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.family.qkv_bias,
        qk_layernorm=arch.family.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        bf16=precision.bf16,
        fp16=precision.fp16,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        fp32_residual_connection=precision.fp32_residual,
        tensor_model_parallel_size=layout.tensor_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=(
            layout.virtual_pipeline_parallel_size if layout.virtual_pipeline_parallel_size > 1 else None
        ),
        sequence_parallel=layout.sequence_parallel,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_size,
        # Transformer Engine's attention exchanges keys and values this way; the local spec's attention
        # (model/context_parallel_attention.py) all-gathers them.
        cp_comm_type=layout.cp_comm_type if te and layout.context_parallel_size > 1 else None,
        tp_comm_overlap=options.tp_comm_overlap_tokens > 0,
        use_cpu_initialization=options.use_cpu_initialization,
        # The loss function returns (sum, count); Megatron divides by the global count.
        calculate_per_token_loss=True,
        # Fused kernels exist only with Transformer Engine on a GPU.
        masked_softmax_fusion=False,
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te and not yarn,  # the fused kernel does not apply YaRN's cos/sin factor
        persist_layer_norm=False,
        gradient_accumulation_fusion=te,
        # Megatron-LM's choice for the interleaved schedule (Megatron-Core's default differs): with
        # batched p2p and two pipeline ranks, a rank's "previous" and "next" stage are the same peer
        # and its activation and gradient messages get paired the wrong way round.
        overlap_p2p_comm=layout.virtual_pipeline_parallel_size > 1,
        batch_p2p_comm=layout.virtual_pipeline_parallel_size == 1,
        **_recompute_settings(options.recompute),
        **_fp8_settings(precision),
        **(_yarn_settings(arch.rope_scaling) if yarn else {}),
        **_moe_settings(arch, options),
    )


def layer_spec(config: TransformerConfig, options: ModelBuildOptions, vp_stage: Optional[int]) -> ModuleSpec:
    """The transformer block of one model chunk.

    With Transformer Engine: TE's layer spec (fused norm + linear, fused attention, FP8; packed THD rows
    get TE's ``padding_causal`` masks). Without: the local spec with :class:`RMSNorm`, which supports
    sequence parallelism, and :class:`PackedSDPAttention`, which supports packed rows; Qwen3's per-head
    Q/K norms are :class:`RMSNorm` too (their gradients, partial per tensor-parallel rank, are summed by
    Megatron's ``finalize_model_grads`` under ``qk_layernorm``). ``full_attn`` recompute swaps in
    :class:`RecomputedSelfAttention`. A MoE model with dense layers among its sparse ones gets each layer's
    kind from ``moe_layer_freq``, for the layers of this chunk.
    """
    te = options.use_transformer_engine
    layer = _one_layer_spec(config, options, config.num_moe_experts)
    if isinstance(config.moe_layer_freq, list):
        dense = _one_layer_spec(config, options, None)
        first = get_transformer_layer_offset(config, vp_stage=vp_stage)
        pattern = config.moe_layer_freq[first:first + get_num_layers_to_build(config, vp_stage=vp_stage)]
        specs = [layer if sparse else dense for sparse in pattern]
    elif te:
        return layer  # TransformerBlock repeats it, with TE's final norm
    else:
        specs = [layer] * get_num_layers_to_build(config, vp_stage=vp_stage)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=specs,
                                                                                     layer_norm=final_norm))


def _one_layer_spec(config: TransformerConfig, options: ModelBuildOptions, num_experts: Optional[int]) -> ModuleSpec:
    """One decoder layer: with routed experts where ``num_experts`` is set, else with the dense MLP."""
    qk_norm = config.qk_layernorm
    experts = dict(num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm)
    if options.use_transformer_engine:
        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm, **experts)
    else:
        layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm, **experts))
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = PackedSDPAttention
        if qk_norm:
            attention.q_layernorm = RMSNorm
            attention.k_layernorm = RMSNorm
        if num_experts:
            # TE's MoE layer stores its pre-MLP norm as pre_mlp_layernorm (no linear to fuse it into); the
            # local spec would rename it after the dense MLP's fused norm. One name for both specs.
            keys = layer.submodules.sharded_state_dict_keys_map
            layer.submodules.sharded_state_dict_keys_map = {k: v for k, v in keys.items() if k != "pre_mlp_layernorm."}
    if options.recompute is not None and options.recompute.granularity == "full_attn":
        layer = copy.deepcopy(layer)
        layer.submodules.self_attention.module = RecomputedSelfAttention
    return layer


def _initialize_te_userbuffers(tokens: int, hidden_size: int, tensor_parallel_size: int, fp8: bool) -> None:
    """Transformer Engine's userbuffers for tensor-parallel communication overlap, sized for micro batches
    of ``tokens`` tokens, as Megatron-LM's ``_initialize_tp_communicators`` does (TE 2.7+ takes
    quantization modes, 1.9+ ``use_fp8``; NCCL bootstraps them). Written against that code; not run here,
    since TE cannot be installed on the machines this project is tested on."""
    import transformer_engine
    from packaging.version import Version
    from transformer_engine.pytorch import module as te_module

    version = Version(transformer_engine.__version__.split("+")[0])
    if version < Version("1.9"):
        raise ConfigError(f"tp_comm_overlap needs Transformer Engine 1.9 or newer, found {version}")
    shape = [tokens, hidden_size]
    if version >= Version("2.7"):
        mode = te_module.base.UserBufferQuantizationMode
        te_module.base.initialize_ub(shape=shape, tp_size=tensor_parallel_size,
                                     quantization_modes=[mode.FP8 if fp8 else mode.NONE], bootstrap_backend="nccl")
    else:
        te_module.base.initialize_ub(shape=shape, tp_size=tensor_parallel_size, use_fp8=fp8, bootstrap_backend="nccl")


def _rope_arguments(arch: Architecture) -> dict:
    """GPTModel's position-embedding arguments: YaRN through Megatron's YarnRotaryEmbedding, linear
    scaling as ``seq_len_interpolation_factor`` (positions divided by the factor, as HF divides the
    frequencies); Llama 3 scaling is applied after construction (:func:`_apply_llama3_rope_scaling`)."""
    if isinstance(arch.rope_scaling, YarnRopeScaling):
        return {"position_embedding_type": "yarn"}
    if isinstance(arch.rope_scaling, LinearRopeScaling):
        return {"position_embedding_type": "rope", "seq_len_interpolation_factor": arch.rope_scaling.factor}
    return {"position_embedding_type": "rope"}


def _apply_llama3_rope_scaling(model: PRMGPTModel, arch: Architecture) -> None:
    """Llama-3 frequency scaling with the checkpoint's own factors.

    Megatron's RotaryEmbedding hard-codes low/high frequency factors 1/4 and an original context of
    8192; HF configs state them, so the inverse frequencies are recomputed from the config's values.
    """
    if not isinstance(arch.rope_scaling, Llama3RopeScaling) or not hasattr(model, "rotary_pos_emb"):
        return
    rotary = model.rotary_pos_emb
    scaling = arch.rope_scaling
    rotary.inv_freq = megatron_compat.llama3_scaled_inv_freq(
        rotary,
        rotary.inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def build_model_chunks(
    arch: Architecture,
    reward_token_ids: tuple[int, int],
    max_seq_len: int,
    options: ModelBuildOptions,
) -> list[PRMGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), not yet wrapped for DDP."""
    config = transformer_config(arch, options)
    if arch.moe is not None:
        megatron_compat.prepare_moe()
    if config.tp_comm_overlap:
        _initialize_te_userbuffers(options.tp_comm_overlap_tokens, arch.hidden_size,
                                   options.layout.tensor_parallel_size, fp8=bool(options.precision.fp8))
    vocab = padded_vocab_size(arch.vocab_size, options.layout.tensor_parallel_size)
    chunks = []
    vp_size = options.layout.virtual_pipeline_parallel_size
    for vp_stage in range(vp_size):
        stage = vp_stage if vp_size > 1 else None
        model = PRMGPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, options, stage),
            vocab_size=vocab,
            max_sequence_length=max(max_seq_len, arch.max_position_embeddings),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            rotary_base=arch.rope_theta,
            **_rope_arguments(arch),
            vp_stage=stage,
            reward_token_ids=reward_token_ids,
            reward_head=arch.reward_head,
        )
        _apply_llama3_rope_scaling(model, arch)
        if not options.use_cpu_initialization:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
