"""Hugging Face <-> Megatron-Core parameter mapping, declared as data, and its tensor transforms.

One table per model family: each rule names the HF tensor(s), the Megatron tensor, how one becomes the
other and the axis Megatron splits under tensor parallelism. ``{layer}`` stands for the layer index.

Megatron names are those of its checkpoints, which are also the Transformer Engine spec's module names
(the norm fused into the following linear layer: ``linear_qkv.layer_norm_weight``); the local spec
names the two norms differently in its modules (``input_layernorm``, ``pre_mlp_layernorm``) and maps them
to the same checkpoint names. In the checkpoint, a layer's tensors are stacked along a leading layer axis
under one key without the layer index (``decoder.layers.self_attention.linear_qkv.weight``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_prm.model.architecture import LlamaArchitecture

LAYER = "{layer}"
LAYER_PREFIX = "decoder.layers.{layer}."


class Transform(enum.Enum):
    COPY = "copy"
    QKV = "qkv"  # HF q, k, v  <->  Megatron [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]
    GATE_UP = "gate_up"  # HF gate, up  <->  Megatron fc1 = [gate; up] (SwiGLU)
    VOCAB = "vocab"  # copy, rows padded to Megatron's padded vocabulary on import, unpadded on export


@dataclass(frozen=True)
class ParamRule:
    hf: tuple[str, ...]
    megatron: str
    transform: Transform
    tp_axis: Optional[int]  # None: replicated on every tensor-parallel rank
    local: Optional[str] = None  # the local layer spec's module name, where it differs

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    @property
    def checkpoint_key(self) -> str:
        """The key in a torch_dist checkpoint (layers stacked along axis 0 under one key)."""
        return self.megatron.replace(LAYER_PREFIX, "decoder.layers.")

    def hf_names(self, layer: Optional[int] = None) -> list[str]:
        return [name.replace(LAYER, str(layer)) for name in self.hf]

    def megatron_name(self, layer: Optional[int] = None, spec: str = "te") -> str:
        name = self.local if spec == "local" and self.local else self.megatron
        return name.replace(LAYER, str(layer))


_L = "model.layers.{layer}."
LLAMA_RULES: tuple[ParamRule, ...] = (
    ParamRule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", Transform.VOCAB, 0),
    ParamRule((_L + "input_layernorm.weight",), LAYER_PREFIX + "self_attention.linear_qkv.layer_norm_weight",
              Transform.COPY, None, local=LAYER_PREFIX + "input_layernorm.weight"),
    ParamRule((_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
              LAYER_PREFIX + "self_attention.linear_qkv.weight", Transform.QKV, 0),
    ParamRule((_L + "self_attn.o_proj.weight",), LAYER_PREFIX + "self_attention.linear_proj.weight", Transform.COPY, 1),
    ParamRule((_L + "post_attention_layernorm.weight",), LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight",
              Transform.COPY, None, local=LAYER_PREFIX + "pre_mlp_layernorm.weight"),
    ParamRule((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), LAYER_PREFIX + "mlp.linear_fc1.weight",
              Transform.GATE_UP, 0),
    ParamRule((_L + "mlp.down_proj.weight",), LAYER_PREFIX + "mlp.linear_fc2.weight", Transform.COPY, 1),
    ParamRule(("model.norm.weight",), "decoder.final_layernorm.weight", Transform.COPY, None),
    ParamRule(("lm_head.weight",), "output_layer.weight", Transform.VOCAB, 0),
)
# Mistral (7B v0.1-v0.3) uses Llama's parameter names and layout unchanged.
MISTRAL_RULES = LLAMA_RULES
FAMILY_RULES = {"llama": LLAMA_RULES, "mistral": MISTRAL_RULES}
# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(model_type: str, arch: LlamaArchitecture) -> tuple[ParamRule, ...]:
    """The family's rules, without the output layer when the embeddings are tied."""
    rules = FAMILY_RULES[model_type]
    return tuple(r for r in rules if not (arch.tie_word_embeddings and r.megatron == "output_layer.weight"))


def hf_shapes(rule: ParamRule, arch: LlamaArchitecture) -> list[tuple[int, ...]]:
    """The shapes of the rule's HF tensors (one layer)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    n, g = arch.num_attention_heads, arch.num_key_value_heads
    if rule.transform is Transform.QKV:
        return [(n * d, h), (g * d, h), (g * d, h)]
    if rule.transform is Transform.GATE_UP:
        return [(f, h), (f, h)]
    if rule.transform is Transform.VOCAB:
        return [(arch.vocab_size, h)]
    if rule.megatron.endswith("linear_proj.weight"):
        return [(h, n * d)]
    if rule.megatron.endswith("linear_fc2.weight"):
        return [(h, f)]
    return [(h,)]


def megatron_shape(rule: ParamRule, arch: LlamaArchitecture, padded_vocab: int) -> tuple[int, ...]:
    """The shape of the rule's Megatron tensor (one layer, all tensor-parallel shards together)."""
    shapes = hf_shapes(rule, arch)
    if rule.transform is Transform.VOCAB:
        return (padded_vocab, arch.hidden_size)
    if rule.transform in (Transform.QKV, Transform.GATE_UP):
        return (sum(s[0] for s in shapes), arch.hidden_size)
    return shapes[0]


def to_megatron(rule: ParamRule, tensors: list[torch.Tensor], arch: LlamaArchitecture, padded_vocab: int) -> torch.Tensor:
    """Merge the rule's HF tensors (one layer) into its Megatron tensor."""
    if rule.transform is Transform.COPY:
        return tensors[0]
    if rule.transform is Transform.GATE_UP:
        return torch.cat(tensors, dim=0)
    if rule.transform is Transform.VOCAB:
        (table,) = tensors
        if padded_vocab == table.shape[0]:
            return table
        padded = table.new_zeros((padded_vocab, table.shape[1]))
        padded[: table.shape[0]] = table
        return padded
    q, k, v = tensors
    g, d, h = arch.num_key_value_heads, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // g
    return torch.cat([q.reshape(g, per_group * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def to_hf(rule: ParamRule, tensor: torch.Tensor, arch: LlamaArchitecture) -> list[torch.Tensor]:
    """Split the rule's Megatron tensor (one layer) into its HF tensors."""
    if rule.transform is Transform.COPY:
        return [tensor]
    if rule.transform is Transform.GATE_UP:
        return list(tensor.chunk(2, dim=0))
    if rule.transform is Transform.VOCAB:
        return [tensor[: arch.vocab_size]]
    g, d, h = arch.num_key_value_heads, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // g
    grouped = tensor.reshape(g, (per_group + 2) * d, h)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]
