"""Hugging Face <-> Megatron-Core parameter mapping, declared as data, and its tensor transforms.

One table per model family: each rule names the HF tensor(s), the Megatron tensor, how one becomes the
other and the axis Megatron splits under tensor parallelism. ``{layer}`` stands for the layer index,
``{expert}`` for the expert index in a Mixture-of-Experts layer.

Megatron names are those of its checkpoints, which are also the Transformer Engine spec's module names
(the norm fused into the following linear layer: ``linear_qkv.layer_norm_weight``); the local spec
names the two norms differently in its modules (``input_layernorm``, ``pre_mlp_layernorm``) and maps them
to the same checkpoint names. In the checkpoint, a layer's tensors are stacked along a leading layer axis
under one key without the layer index (``decoder.layers.self_attention.linear_qkv.weight``); an expert's
tensors are stacked further along an expert axis, as Megatron's ``SequentialMLP`` and ``TEGroupedMLP``
store them (``decoder.layers.mlp.experts.experts.linear_fc1.weight``: ``[layers, experts, 2 f, h]``).
A MoE layer's norm before the MLP is its own module in both specs (``pre_mlp_layernorm``, as TE's MoE spec
names it and Megatron-LM's MoE checkpoints store it). A model whose layers are not all alike (dense and
sparse, Qwen's ``decoder_sparse_step`` / ``mlp_only_layers``) is stored as Megatron stores
``non_homogeneous_layers``: every layer under its own keys (``decoder.layers.3.mlp.router.weight``), without
the layer axis.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_prm.model.architecture import Architecture
from megatron_prm.model.moe import MoEFamily

LAYER = "{layer}"
EXPERT = "{expert}"
LAYER_PREFIX = "decoder.layers.{layer}."
# SequentialMLP's module name of one expert, and the checkpoint's name of all of them (an expert axis).
LOCAL_EXPERT = "experts.local_experts.{expert}."
CHECKPOINT_EXPERTS = "experts.experts."


class Transform(enum.Enum):
    COPY = "copy"
    QKV = "qkv"  # HF q, k, v  <->  Megatron [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]
    GATE_UP = "gate_up"  # HF gate, up  <->  Megatron fc1 = [gate; up] (SwiGLU)
    VOCAB = "vocab"  # copy, rows padded to Megatron's padded vocabulary on import, unpadded on export
    ZEROS = "zeros"  # no HF tensor: zeros on import, not exported (the unused LM head of an MLP-head PRM)


class LayerKind(enum.Enum):
    """The layers a per-layer rule holds in: every one, or only the dense or the sparse (MoE) ones."""

    ALL = "all"
    DENSE = "dense"
    SPARSE = "sparse"


@dataclass(frozen=True)
class ParamRule:
    hf: tuple[str, ...]
    megatron: str
    transform: Transform
    tp_axis: Optional[int]  # None: replicated on every tensor-parallel rank
    local: Optional[str] = None  # the local layer spec's module name, where it differs
    layers: LayerKind = LayerKind.ALL

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.megatron

    def hf_names(self, layer: Optional[int] = None, expert: Optional[int] = None) -> list[str]:
        return [name.replace(LAYER, str(layer)).replace(EXPERT, str(expert)) for name in self.hf]

    def megatron_name(self, layer: Optional[int] = None, spec: str = "te", expert: Optional[int] = None) -> str:
        """The module's parameter name (an expert's: SequentialMLP's, the local experts of CPU runs)."""
        name = self.local if spec == "local" and self.local else self.megatron
        return name.replace(LAYER, str(layer)).replace(EXPERT, str(expert))


_L = "model.layers.{layer}."
_ATTENTION = LAYER_PREFIX + "self_attention."
EMBEDDING = ParamRule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", Transform.VOCAB, 0)
LM_HEAD = ParamRule(("lm_head.weight",), "output_layer.weight", Transform.VOCAB, 0)
LLAMA_RULES: tuple[ParamRule, ...] = (
    EMBEDDING,
    ParamRule((_L + "input_layernorm.weight",), _ATTENTION + "linear_qkv.layer_norm_weight",
              Transform.COPY, None, local=LAYER_PREFIX + "input_layernorm.weight"),
    ParamRule((_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
              _ATTENTION + "linear_qkv.weight", Transform.QKV, 0),
    ParamRule((_L + "self_attn.o_proj.weight",), _ATTENTION + "linear_proj.weight", Transform.COPY, 1),
    ParamRule((_L + "post_attention_layernorm.weight",), LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight",
              Transform.COPY, None, local=LAYER_PREFIX + "pre_mlp_layernorm.weight"),
    ParamRule((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), LAYER_PREFIX + "mlp.linear_fc1.weight",
              Transform.GATE_UP, 0),
    ParamRule((_L + "mlp.down_proj.weight",), LAYER_PREFIX + "mlp.linear_fc2.weight", Transform.COPY, 1),
    ParamRule(("model.norm.weight",), "decoder.final_layernorm.weight", Transform.COPY, None),
    LM_HEAD,
)


def _after(rules: tuple[ParamRule, ...], megatron: str, *extra: ParamRule) -> tuple[ParamRule, ...]:
    """``rules`` with ``extra`` inserted after the rule of that Megatron name (keeps a layer's order)."""
    index = next(i for i, r in enumerate(rules) if r.megatron == megatron) + 1
    return rules[:index] + extra + rules[index:]


# Mistral (7B v0.1-v0.3) uses Llama's parameter names and layout unchanged.
MISTRAL_RULES = LLAMA_RULES
# Qwen2 / Qwen2.5: Llama plus a bias on Q, K and V, interleaved per query group like the weight.
QWEN2_RULES = _after(LLAMA_RULES, _ATTENTION + "linear_qkv.weight", ParamRule(
    (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
    _ATTENTION + "linear_qkv.bias", Transform.QKV, 0))
# Qwen3: Llama plus an RMSNorm over each query and key head (one weight of head_dim, shared by the heads).
QWEN3_RULES = _after(
    LLAMA_RULES, _ATTENTION + "linear_proj.weight",
    ParamRule((_L + "self_attn.q_norm.weight",), _ATTENTION + "q_layernorm.weight", Transform.COPY, None),
    ParamRule((_L + "self_attn.k_norm.weight",), _ATTENTION + "k_layernorm.weight", Transform.COPY, None))
_MLP = LAYER_PREFIX + "mlp."


def moe_rules(rules: tuple[ParamRule, ...], moe: MoEFamily) -> tuple[ParamRule, ...]:
    """``rules`` of the dense relative, their MLP kept for the dense layers, and for the sparse layers the norm
    before the MLP, the router, every expert's SwiGLU MLP and, in Qwen2-MoE, the shared expert and its gate
    (Megatron's ``moe_shared_expert_gate``)."""
    block = _L + moe.hf_block + "."
    expert = block + "experts.{expert}."
    gate, up, down = moe.hf_projections
    sparse = (
        ParamRule((_L + "post_attention_layernorm.weight",), LAYER_PREFIX + "pre_mlp_layernorm.weight",
                  Transform.COPY, None),
        ParamRule((block + "gate.weight",), _MLP + "router.weight", Transform.COPY, None),
        ParamRule((expert + gate + ".weight", expert + up + ".weight"), _MLP + LOCAL_EXPERT + "linear_fc1.weight",
                  Transform.GATE_UP, 0),
        ParamRule((expert + down + ".weight",), _MLP + LOCAL_EXPERT + "linear_fc2.weight", Transform.COPY, 1),
    )
    if moe.shared_expert:
        shared = block + "shared_expert."
        sparse += (
            ParamRule((shared + "gate_proj.weight", shared + "up_proj.weight"), _MLP + "shared_experts.linear_fc1.weight",
                      Transform.GATE_UP, 0),
            ParamRule((shared + "down_proj.weight",), _MLP + "shared_experts.linear_fc2.weight", Transform.COPY, 1),
            ParamRule((block + "shared_expert_gate.weight",), _MLP + "shared_experts.gate_weight", Transform.COPY, None),
        )
    dense_mlp = (_MLP + "linear_fc1.layer_norm_weight", _MLP + "linear_fc1.weight", _MLP + "linear_fc2.weight")
    marked = tuple(dataclasses.replace(r, layers=LayerKind.DENSE) if r.megatron in dense_mlp else r for r in rules)
    return _after(marked, _MLP + "linear_fc2.weight",
                  *(dataclasses.replace(r, layers=LayerKind.SPARSE) for r in sparse))


FAMILY_RULES = {"llama": LLAMA_RULES, "mistral": MISTRAL_RULES, "qwen2": QWEN2_RULES, "qwen3": QWEN3_RULES}
# Qwen2.5-Math-PRM's classifier (``score = Sequential(Linear(h, h), ReLU, Linear(h, 2))``), replicated
# on every tensor-parallel rank (see megatron_prm/model/mlp_head.py).
MLP_HEAD_RULES: tuple[ParamRule, ...] = tuple(
    ParamRule((f"score.{index}.{kind}",), f"mlp_reward_head.{name}.{kind}", Transform.COPY, None)
    for index, name in ((0, "hidden"), (2, "output")) for kind in ("weight", "bias"))
# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(arch: Architecture) -> tuple[ParamRule, ...]:
    """The family's rules that hold in some layer of ``arch`` (a MoE model's dense MLP only where it keeps
    dense layers), without the output layer when the embeddings are tied. A model with an MLP reward head
    has its ``score`` layers instead of an LM head (its unused output layer is zeros)."""
    rules = FAMILY_RULES[arch.family.dense]
    if arch.family.moe is not None:
        rules = tuple(r for r in moe_rules(rules, arch.family.moe) if layers_of(r, arch))
    if arch.reward_head == "mlp":
        rules = tuple(r for r in rules if r is not LM_HEAD) + MLP_HEAD_RULES
        if not arch.tie_word_embeddings:
            rules += (ParamRule((), LM_HEAD.megatron, Transform.ZEROS, 0),)
    return tuple(r for r in rules if not (arch.tie_word_embeddings and r is LM_HEAD))


def layers_of(rule: ParamRule, arch: Architecture) -> list[Optional[int]]:
    """The layers holding the rule's tensors (``[None]`` for a tensor outside the layers)."""
    if not rule.per_layer:
        return [None]
    return [layer for layer in range(arch.num_hidden_layers)
            if rule.layers is LayerKind.ALL or (rule.layers is LayerKind.SPARSE) == arch.layer_is_sparse(layer)]


def experts_of(rule: ParamRule, arch: Architecture) -> list[Optional[int]]:
    """The experts holding the rule's tensors (``[None]`` for a tensor outside the experts)."""
    return list(range(arch.moe.num_experts)) if rule.per_expert else [None]


def layers_stacked(arch: Architecture) -> bool:
    """Whether the checkpoint stacks the layers along a leading axis (every layer alike) or keys each on its own."""
    return not arch.mixed_layers


def checkpoint_key(rule: ParamRule, arch: Architecture, layer: Optional[int] = None) -> str:
    """The rule's key in a torch_dist checkpoint: layers stacked along axis 0 under one key (experts along
    the next), or, in a model of mixed layers, layer ``layer``'s own key (experts along axis 0)."""
    key = rule.megatron.replace(LOCAL_EXPERT, CHECKPOINT_EXPERTS)
    if rule.per_layer and not layers_stacked(arch):
        if layer is None:
            raise ValueError(f"{rule.megatron}: a model of mixed layers keys each layer on its own; name the layer")
        return key.replace(LAYER, str(layer))
    return key.replace(LAYER_PREFIX, "decoder.layers.")


def _ffn_size(rule: ParamRule, arch: Architecture) -> int:
    """The intermediate size of the MLP the rule belongs to: an expert's, the shared expert's or the dense one."""
    if rule.per_expert:
        return arch.moe.moe_intermediate_size
    if ".shared_experts." in rule.megatron:
        return arch.moe.shared_expert_intermediate_size
    return arch.intermediate_size


def hf_shapes(rule: ParamRule, arch: Architecture) -> list[tuple[int, ...]]:
    """The shapes of the rule's HF tensors (one layer, one expert)."""
    h, d, f = arch.hidden_size, arch.head_dim, _ffn_size(rule, arch)
    n, g = arch.num_attention_heads, arch.num_key_value_heads
    if rule.transform is Transform.QKV:
        per_head = () if rule.megatron.endswith(".bias") else (h,)
        return [(n * d, *per_head), (g * d, *per_head), (g * d, *per_head)]
    if rule.transform is Transform.GATE_UP:
        return [(f, h), (f, h)]
    if rule.transform is Transform.VOCAB:
        return [(arch.vocab_size, h)]
    if rule.megatron.endswith("linear_proj.weight"):
        return [(h, n * d)]
    if rule.megatron.endswith("linear_fc2.weight"):
        return [(h, f)]
    if rule.megatron.endswith(("q_layernorm.weight", "k_layernorm.weight")):  # Qwen3 per-head norms
        return [(d,)]
    if rule.megatron.endswith("router.weight"):
        return [(arch.moe.num_experts, h)]
    if rule.megatron.endswith("shared_experts.gate_weight"):
        return [(1, h)]
    if rule.megatron.startswith("mlp_reward_head."):
        rows = 2 if ".output." in rule.megatron else h
        return [(rows, h)] if rule.megatron.endswith("weight") else [(rows,)]
    if rule.transform is Transform.ZEROS:
        return []
    return [(h,)]


def megatron_shape(rule: ParamRule, arch: Architecture, padded_vocab: int) -> tuple[int, ...]:
    """The shape of the rule's Megatron tensor (one layer, all tensor-parallel shards together; an expert
    tensor has all the experts along a leading axis)."""
    shapes = hf_shapes(rule, arch)
    experts = (arch.moe.num_experts,) if rule.per_expert else ()
    if rule.transform in (Transform.VOCAB, Transform.ZEROS):
        return (padded_vocab, arch.hidden_size)
    if rule.transform in (Transform.QKV, Transform.GATE_UP):
        return (*experts, sum(s[0] for s in shapes), *shapes[0][1:])
    return (*experts, *shapes[0])


def to_megatron(rule: ParamRule, tensors: list[torch.Tensor], arch: Architecture, padded_vocab: int) -> torch.Tensor:
    """Merge the rule's HF tensors (one layer, one expert) into its Megatron tensor."""
    if rule.transform is Transform.COPY:
        return tensors[0]
    if rule.transform is Transform.GATE_UP:
        return torch.cat(tensors, dim=0)
    if rule.transform is Transform.ZEROS:
        raise ValueError(f"{rule.megatron} has no HF tensor; the importer writes zeros")
    if rule.transform is Transform.VOCAB:
        (table,) = tensors
        if padded_vocab == table.shape[0]:
            return table
        padded = table.new_zeros((padded_vocab, table.shape[1]))
        padded[: table.shape[0]] = table
        return padded
    q, k, v = tensors
    g, d = arch.num_key_value_heads, arch.head_dim
    per_group, rest = arch.num_attention_heads // g, q.shape[1:]  # rest: (h,) for weights, () for biases
    merged = torch.cat([q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return merged.reshape(-1, *rest)


def to_hf(rule: ParamRule, tensor: torch.Tensor, arch: Architecture) -> list[torch.Tensor]:
    """Split the rule's Megatron tensor (one layer, one expert) into its HF tensors."""
    if rule.transform is Transform.COPY:
        return [tensor]
    if rule.transform is Transform.GATE_UP:
        return list(tensor.chunk(2, dim=0))
    if rule.transform is Transform.VOCAB:
        return [tensor[: arch.vocab_size]]
    if rule.transform is Transform.ZEROS:
        return []
    g, d = arch.num_key_value_heads, arch.head_dim
    per_group, rest = arch.num_attention_heads // g, tensor.shape[1:]
    grouped = tensor.reshape(g, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
