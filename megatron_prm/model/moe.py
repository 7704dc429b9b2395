"""Mixture-of-Experts traits: what a family declares (:class:`MoEFamily`) and what an HF config gives
(:class:`MixtureOfExperts`).

The three MoE families route each token to its top-k experts by a softmax over a linear router and
sum the chosen experts' SwiGLU MLPs weighted by the routing probabilities. They differ in whether the
k probabilities are renormalised to sum to one (Mixtral always; Qwen2-MoE / Qwen3-MoE as
``norm_topk_prob`` says) and in Qwen2-MoE's shared expert, a dense SwiGLU MLP applied to every token
and scaled by ``sigmoid(shared_expert_gate(x))``. The Qwen families may keep some layers dense
(``decoder_sparse_step``, ``mlp_only_layers``): those have the dense SwiGLU MLP of ``intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_prm.config import ConfigError


@dataclass(frozen=True)
class MoEFamily:
    """Where a Mixture-of-Experts family's HF config and checkpoint state its experts."""

    experts_keys: tuple[str, ...]  # config keys of the expert count; the first is written, any is read
    expert_size_key: str  # config key of one expert's intermediate size
    hf_block: str  # the sparse block's module in a layer: "mlp" (Qwen) or "block_sparse_moe" (Mixtral)
    hf_projections: tuple[str, str, str]  # an expert's gate, up and down projection names
    shared_expert: bool = False  # Qwen2-MoE: a sigmoid-gated shared expert
    normalizes_top_k: Optional[bool] = None  # fixed by the family (Mixtral); None: the config's norm_topk_prob
    dense_layers_configurable: bool = False  # Qwen: decoder_sparse_step / mlp_only_layers keep layers dense


@dataclass(frozen=True)
class MixtureOfExperts:
    """The sparse MLP of every layer (HF names)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: Optional[int] = None
    router_aux_loss_coef: float = 0.001  # transformers' default in all three families
    decoder_sparse_step: int = 1  # layer i is sparse where (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not one of these

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_experts {self.num_experts}")
        size = self.shared_expert_intermediate_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"shared_expert_intermediate_size must be a positive integer, got {size!r}")
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in self.mlp_only_layers):
            raise ConfigError(f"mlp_only_layers must list layer indices, got {list(self.mlp_only_layers)!r}")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (from 0) routes to experts, by transformers' rule (``Qwen2MoeDecoderLayer``,
        ``Qwen3MoeDecoderLayer``); the other layers have the dense MLP."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def moe_from_hf(config: dict[str, Any], family: MoEFamily, where: str) -> MixtureOfExperts:
    """The experts an HF config of a MoE family describes (and, where the family has them, which layers stay
    dense; Mixtral's are all sparse, as transformers builds it whatever the config says)."""
    if config.get("router_jitter_noise"):
        raise ConfigError(f"{where}: router_jitter_noise {config['router_jitter_noise']} is not supported")
    experts = next((config[k] for k in family.experts_keys if config.get(k) is not None), None)
    expert_size = config.get(family.expert_size_key)
    top_k = config.get("num_experts_per_tok")
    missing = [name for name, value in ((family.experts_keys[0], experts), (family.expert_size_key, expert_size),
                                        ("num_experts_per_tok", top_k)) if value is None]
    if family.shared_expert and config.get("shared_expert_intermediate_size") is None:
        missing.append("shared_expert_intermediate_size")
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    normalize = family.normalizes_top_k
    if normalize is None:
        normalize = bool(config.get("norm_topk_prob", False))
    layers = {}
    if family.dense_layers_configurable:
        only = config.get("mlp_only_layers") or []
        if not isinstance(only, list):
            raise ConfigError(f"{where}: mlp_only_layers must be a list of layer indices, got {only!r}")
        layers = dict(decoder_sparse_step=config.get("decoder_sparse_step", 1), mlp_only_layers=tuple(only))
    try:
        return MixtureOfExperts(
            num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
            norm_topk_prob=normalize,
            shared_expert_intermediate_size=config["shared_expert_intermediate_size"] if family.shared_expert else None,
            router_aux_loss_coef=float(config.get("router_aux_loss_coef", MixtureOfExperts.router_aux_loss_coef)),
            **layers)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def moe_to_hf(moe: MixtureOfExperts, family: MoEFamily) -> dict[str, Any]:
    """The HF config fields describing ``moe`` (the inverse of :func:`moe_from_hf`)."""
    config: dict[str, Any] = {family.experts_keys[0]: moe.num_experts, family.expert_size_key: moe.moe_intermediate_size,
                              "num_experts_per_tok": moe.num_experts_per_tok,
                              "router_aux_loss_coef": moe.router_aux_loss_coef}
    if family.normalizes_top_k is None:
        config["norm_topk_prob"] = moe.norm_topk_prob
    if moe.shared_expert_intermediate_size is not None:
        config["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    if family.dense_layers_configurable:
        config.update(decoder_sparse_step=moe.decoder_sparse_step, mlp_only_layers=list(moe.mlp_only_layers))
    return config
