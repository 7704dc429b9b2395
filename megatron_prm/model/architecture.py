"""The model architecture (Llama, Mistral, Qwen2/2.5, Qwen3; Mixture-of-Experts: Mixtral, Qwen2-MoE,
Qwen3-MoE), resolved from an HF ``config.json`` and/or explicit fields.

The families share one network (pre-norm decoder, RMSNorm, SwiGLU, RoPE, grouped-query attention) and
differ in a few traits, declared once in :data:`FAMILIES`: Qwen2 adds a bias to the Q, K and V
projections; Qwen3 normalises every query and key head with its own RMSNorm (Megatron's
``q_layernorm`` / ``k_layernorm``) and states ``head_dim`` explicitly. The MoE families replace the
layers' MLP by routed experts (:mod:`megatron_prm.model.moe`; Qwen's may keep some layers dense); their
attention is that of their dense relatives (Mixtral: Mistral's, Qwen2-MoE: Qwen2's, Qwen3-MoE: Qwen3's).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from megatron_prm.config import ConfigError, ModelArguments, check_rope_scaling
from megatron_prm.hub import is_hub_id, local_path
from megatron_prm.model.moe import MixtureOfExperts, MoEFamily, moe_from_hf, moe_to_hf
from megatron_prm.run_directory import MODEL_CONFIG_NAME, resolve_checkpoint


@dataclass(frozen=True)
class Family:
    """What sets a model family apart in this project's shared network."""

    model_type: str
    hf_prefix: str  # transformers class names: {prefix}ForCausalLM, {prefix}ForTokenClassification
    qkv_bias: bool = False
    qk_norm: bool = False
    moe: Optional[MoEFamily] = None  # a Mixture-of-Experts family: its (sparse) layers' MLP is routed experts
    dense_relative: Optional[str] = None  # a MoE family's dense family, whose attention it shares

    @property
    def dense(self) -> str:
        """The dense family whose parameters (other than the MLP) this family has."""
        return self.dense_relative or self.model_type


_QWEN_MOE = dict(experts_keys=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
                 hf_block="mlp", hf_projections=("gate_proj", "up_proj", "down_proj"), dense_layers_configurable=True)
FAMILIES = {
    "llama": Family("llama", "Llama"),
    "mistral": Family("mistral", "Mistral"),
    "qwen2": Family("qwen2", "Qwen2", qkv_bias=True),
    "qwen3": Family("qwen3", "Qwen3", qk_norm=True),
    "mixtral": Family("mixtral", "Mixtral", moe=MoEFamily(
        experts_keys=("num_local_experts",), expert_size_key="intermediate_size", hf_block="block_sparse_moe",
        hf_projections=("w1", "w3", "w2"), normalizes_top_k=True), dense_relative="mistral"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2Moe", qkv_bias=True, moe=MoEFamily(**_QWEN_MOE, shared_expert=True),
                        dense_relative="qwen2"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3Moe", qk_norm=True, moe=MoEFamily(**_QWEN_MOE), dense_relative="qwen3"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# The reward heads a model can carry: the LM-head rows of the reward tokens, or Qwen2.5-Math-PRM's MLP.
REWARD_HEADS = ("lm_head", "mlp")
# HF's class name for a Qwen2.5-Math-PRM-style model (an MLP classifier named `score` on the base model).
PRM_CLASS_SUFFIX = "ForProcessRewardModel"


@dataclass(frozen=True)
class Llama3RopeScaling:
    """HF ``rope_scaling`` with ``rope_type: llama3`` (Llama 3.1 and later)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: ClassVar[str] = "llama3"


@dataclass(frozen=True)
class LinearRopeScaling:
    """HF ``rope_type: linear``: positions divided by ``factor`` (Megatron's ``seq_len_interpolation_factor``)."""

    factor: float
    rope_type: ClassVar[str] = "linear"


@dataclass(frozen=True)
class YarnRopeScaling:
    """HF ``rope_type: yarn`` (the long-context setting Qwen2.5 and Qwen3 ship), as Megatron-Core's
    ``YarnRotaryEmbedding`` computes it. ``mscale`` / ``mscale_all_dim`` count only together, as in HF."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    rope_type: ClassVar[str] = "yarn"


RopeScaling = Union[Llama3RopeScaling, LinearRopeScaling, YarnRopeScaling]
_ROPE_SCALINGS = {cls.rope_type: cls for cls in (Llama3RopeScaling, LinearRopeScaling, YarnRopeScaling)}


def rope_scaling_from_hf(value: dict, max_position_embeddings: int, where: str) -> RopeScaling:
    """The scaling an HF ``rope_scaling`` / ``rope_parameters`` dict describes; other types are refused."""
    rope_type = value.get("rope_type", value.get("type"))
    cls = _ROPE_SCALINGS.get(rope_type)
    if cls is None:
        raise ConfigError(f"{where}: rope_scaling type {rope_type!r} is not supported "
                          f"(supported: {', '.join(_ROPE_SCALINGS)})")
    if rope_type == "yarn" and value.get("attention_factor") is not None:
        raise ConfigError(f"{where}: rope_scaling yarn with an explicit attention_factor is not supported "
                          "(Megatron-Core derives it from factor, mscale and mscale_all_dim)")
    problem = check_rope_scaling(value)
    if problem:
        raise ConfigError(f"{where}: rope_scaling {problem}")
    values = {f.name: value[f.name] for f in dataclasses.fields(cls) if value.get(f.name) is not None}
    if rope_type == "yarn":
        values.setdefault("original_max_position_embeddings", max_position_embeddings)
        if "factor" not in values:  # HF: the ratio of the context lengths
            values["factor"] = max_position_embeddings / values["original_max_position_embeddings"]
    if "factor" not in values:
        raise ConfigError(f"{where}: rope_scaling lacks 'factor'")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: rope_scaling {value!r}: {err}") from None


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build the network; HF names, validated."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    initializer_range: float
    rope_scaling: Optional[RopeScaling] = None
    model_type: str = "llama"
    reward_head: str = "lm_head"
    moe: Optional[MixtureOfExperts] = None  # the experts of a MoE family

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if (self.moe is None) != (self.family.moe is None):
            raise ConfigError(f"model_type {self.model_type!r} "
                              + ("is a Mixture-of-Experts family: its experts come from its HF config.json"
                                 if self.moe is None else "has no experts"))
        if self.moe is not None and (self.moe.shared_expert_intermediate_size is not None) != self.family.moe.shared_expert:
            raise ConfigError(f"model_type {self.model_type!r} "
                              f"{'needs' if self.family.moe.shared_expert else 'has no'} shared expert")
        if self.moe is not None:
            beyond = [layer for layer in self.moe.mlp_only_layers if layer >= self.num_hidden_layers]
            if beyond:
                raise ConfigError(f"mlp_only_layers {beyond} name layers beyond the {self.num_hidden_layers} there are")
            if self.sparse_layer_count == 0:
                raise ConfigError(f"no layer of {self.model_type!r} is sparse (decoder_sparse_step "
                                  f"{self.moe.decoder_sparse_step}, mlp_only_layers {list(self.moe.mlp_only_layers)}): "
                                  "a model without experts is its dense family")
        if self.reward_head not in REWARD_HEADS:
            raise ConfigError(f"reward_head must be one of {', '.join(REWARD_HEADS)}, got {self.reward_head!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} is odd; rotary embeddings rotate pairs of channels, so it "
                              "must be even")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def layer_is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (from 0) has routed experts rather than the dense MLP."""
        return self.moe is not None and self.moe.is_sparse(layer)

    @property
    def sparse_layer_count(self) -> int:
        return sum(self.layer_is_sparse(layer) for layer in range(self.num_hidden_layers))

    @property
    def mixed_layers(self) -> bool:
        """Dense and sparse layers in one model: Megatron builds them from a per-layer pattern
        (``moe_layer_freq``) and stores each layer's tensors under its own checkpoint keys."""
        return 0 < self.sparse_layer_count < self.num_hidden_layers

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], where: str) -> "Architecture":
        """The architecture an HF ``config.json`` (already read by :func:`read_hf_config`) describes."""
        values = shape_values(config, where)
        missing = [n for n in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if n not in values]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}")
        values.setdefault("max_position_embeddings", 4096)
        return _complete(values, where)

    def megatron_shape(self) -> dict[str, int]:
        """The network's shape in Megatron's names (TransformerConfig's fields, flops.ModelShape's)."""
        return dict(num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                    ffn_hidden_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
                    num_query_groups=self.num_key_value_heads, kv_channels=self.head_dim)

    def to_hf_config(self) -> dict[str, Any]:
        """The fields of the family's HF config describing this architecture."""
        config = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("rope_scaling", "reward_head", "moe")}
        if self.moe is not None:
            config.update(moe_to_hf(self.moe, self.family.moe))
        scaling = self.rope_scaling
        config["rope_scaling"] = (
            {"rope_type": scaling.rope_type,
             **{k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}} if scaling else None
        )
        if self.reward_head == "mlp":
            config["architectures"] = [self.family.hf_prefix + PRM_CLASS_SUFFIX]
        return config


# Defaults used where neither config.json nor the arguments say otherwise (Llama conventions).
_DEFAULTS = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "model_type": "llama",
    "reward_head": "lm_head",
}

_COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "vocab_size", "max_position_embeddings")
_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "tie_word_embeddings", "initializer_range",
)


def reward_head_of(config: dict[str, Any]) -> str:
    """``mlp`` for a Qwen2.5-Math-PRM-style config (``*ForProcessRewardModel``), else ``lm_head``."""
    names = config.get("architectures") or []
    return "mlp" if any(str(n).endswith(PRM_CLASS_SUFFIX) for n in names) else "lm_head"


def shape_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The architecture fields an HF config sets, with its model type, reward head and experts. RoPE
    settings are read from both spellings: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
    ``rope_parameters`` (transformers 5)."""
    values = {k: config[k] for k in _SHAPE_FIELDS if config.get(k) is not None}
    values["model_type"] = config.get("model_type", "llama")
    values["reward_head"] = reward_head_of(config)
    family = FAMILIES.get(values["model_type"])
    if family is not None and family.moe is not None:
        values["moe"] = moe_from_hf(config, family.moe, where)
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        if "rope_theta" in parameters:
            values["rope_theta"] = parameters["rope_theta"]
        if parameters.get("rope_type", parameters.get("type", "default")) != "default":
            values["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
    scaling = values.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        del values["rope_scaling"]
    return values


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Read an HF ``config.json`` (or the one in a directory, or in a Hub ID's) of a supported model type."""
    path = local_path(str(path), "model config", ("config.json",)) if is_hub_id(str(path)) else Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(f"{path}: attention_bias / mlp_bias are not supported ({model_type} is built without "
                          "them; Qwen2's Q/K/V bias is part of its family)")
    if "qkv_bias" in config and bool(config["qkv_bias"]) != FAMILIES[model_type].qkv_bias:
        raise ConfigError(f"{path}: qkv_bias {config['qkv_bias']} is not supported for {model_type}")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    return config


def sliding_window(config: dict[str, Any]) -> Optional[int]:
    """The attention window an HF config switches on (Qwen2/3 declare one that ``use_sliding_window`` disables)."""
    if config.get("use_sliding_window") is False:
        return None
    return config.get("sliding_window")


def resolve_architecture(
    args: ModelArguments, tokenizer_vocab_size: int, max_seq_len: int, reward_head: str = "lm_head",
    added_tokens: int = 0,
) -> Architecture:
    """Merge ``model_config`` and the explicit fields; a field set in both must agree.

    A vocabulary smaller than the tokenizer's because ``added_tokens`` special tokens were added is
    enlarged to it: the new rows of the embedding and output layer start at zero (as Megatron's padding
    rows do when a checkpoint is loaded into a larger vocabulary). ``reward_head`` is
    the run's; a checkpoint with an MLP head may only continue as one.
    """
    values: dict[str, Any] = {}
    where = "model arguments"
    if args.model_config and args.model_name_or_path:
        raise ConfigError("model_config and model_name_or_path both give the architecture; set one")
    source = args.model_config or (Path(args.model_name_or_path) if args.model_name_or_path else None)
    if source is not None:
        if args.model_name_or_path:
            source = resolve_checkpoint(source) / MODEL_CONFIG_NAME
        where = str(source)
        hf = read_hf_config(source)
        values = shape_values(hf, where)
        window = sliding_window(hf)
        if window is not None and window < max_seq_len:
            raise ConfigError(
                f"{where}: sliding_window {window} is shorter than max_seq_len {max_seq_len}; sliding-window "
                "attention is not implemented, lower max_seq_len to at most the window"
            )
    if values.get("reward_head") == "mlp" and reward_head != "mlp":
        raise ConfigError(f"{where} holds a model with an MLP reward head (score.0 / score.2); set reward_head: mlp")
    values["reward_head"] = reward_head
    for name in _SHAPE_FIELDS:
        explicit = getattr(args, name)
        if explicit is None:
            continue
        if name in values and values[name] != explicit:
            raise ConfigError(
                f"{name}={explicit!r} contradicts {values[name]!r} in {where}; drop one of them"
            )
        values[name] = explicit

    missing = [n for n in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
               if n not in values]
    if missing:
        raise ConfigError(f"the model shape is incomplete: set model_config or {', '.join(missing)}")
    values.setdefault("vocab_size", tokenizer_vocab_size)
    values.setdefault("max_position_embeddings", max_seq_len)
    if values["vocab_size"] < tokenizer_vocab_size:
        if args.vocab_size is not None or values["vocab_size"] < tokenizer_vocab_size - added_tokens:
            raise ConfigError(
                f"vocab_size {values['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab_size} ids"
            )
        values["vocab_size"] = tokenizer_vocab_size
    if max_seq_len > values["max_position_embeddings"]:
        raise ConfigError(
            f"max_seq_len {max_seq_len} exceeds max_position_embeddings {values['max_position_embeddings']}"
        )
    return _complete(values, where)


def _complete(values: dict[str, Any], where: str) -> Architecture:
    """The architecture from the fields given, with Llama's defaults for the rest."""
    for name, default in _DEFAULTS.items():
        values.setdefault(name, default)
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    for name in _COUNTS:  # a model config file may hold anything
        value = values.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    if "head_dim" not in values and values["hidden_size"] % values["num_attention_heads"]:
        raise ConfigError(f"{where}: hidden_size {values['hidden_size']} is not a multiple of num_attention_heads "
                          f"{values['num_attention_heads']}, and no head_dim is given")
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    scaling = values.pop("rope_scaling", None)
    return Architecture(
        **values,
        rope_scaling=rope_scaling_from_hf(scaling, values["max_position_embeddings"], where) if scaling else None,
    )
