"""The Llama/Mistral-family architecture, resolved from an HF ``config.json`` and/or explicit fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_prm.config import ConfigError, ModelArguments
from megatron_prm.run_directory import MODEL_CONFIG_NAME, resolve_checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """HF ``rope_scaling`` with ``rope_type: llama3`` (Llama 3.1 and later)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, value: dict, where: str) -> "Llama3RopeScaling":
        rope_type = value.get("rope_type", value.get("type"))
        if rope_type != "llama3":
            raise ConfigError(f"{where}: rope_scaling type {rope_type!r} is not supported (only 'llama3')")
        try:
            return cls(
                factor=float(value["factor"]),
                low_freq_factor=float(value.get("low_freq_factor", 1.0)),
                high_freq_factor=float(value.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(value.get("original_max_position_embeddings", 8192)),
            )
        except KeyError as err:
            raise ConfigError(f"{where}: rope_scaling lacks {err}") from None


@dataclass(frozen=True)
class LlamaArchitecture:
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
    rope_scaling: Optional[Llama3RopeScaling] = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], where: str) -> "LlamaArchitecture":
        """The architecture an HF ``config.json`` (already read by :func:`read_hf_config`) describes."""
        values = shape_values(config)
        missing = [n for n in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if n not in values]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}")
        values.setdefault("max_position_embeddings", 4096)
        return _complete(values, where)

    def to_hf_config(self) -> dict[str, Any]:
        """The fields of an HF LlamaConfig describing this architecture."""
        config = {k: v for k, v in dataclasses.asdict(self).items() if k != "rope_scaling"}
        config["rope_scaling"] = (
            {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)} if self.rope_scaling else None
        )
        return config


# Defaults used where neither config.json nor the arguments say otherwise (Llama conventions).
_DEFAULTS = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}

_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "tie_word_embeddings", "initializer_range",
)


def shape_values(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields an HF config sets. RoPE settings are read from both spellings:
    ``rope_theta`` + ``rope_scaling`` (transformers 4) and ``rope_parameters`` (transformers 5)."""
    values = {k: config[k] for k in _SHAPE_FIELDS if config.get(k) is not None}
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
    """Read an HF ``config.json`` (or the one in a directory) of a supported model type."""
    path = Path(path)
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
        raise ConfigError(f"{path}: attention_bias / mlp_bias are not supported (Llama and Mistral have none)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    return config


def resolve_architecture(
    args: ModelArguments, tokenizer_vocab_size: int, max_seq_len: int
) -> LlamaArchitecture:
    """Merge ``model_config`` and the explicit fields; a field set in both must agree."""
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
        values = shape_values(hf)
        window = hf.get("sliding_window")
        if window is not None and window < max_seq_len:
            raise ConfigError(
                f"{where}: sliding_window {window} is shorter than max_seq_len {max_seq_len}; sliding-window "
                "attention is not implemented, lower max_seq_len to at most the window"
            )
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
        raise ConfigError(
            f"vocab_size {values['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab_size} ids"
        )
    if max_seq_len > values["max_position_embeddings"]:
        raise ConfigError(
            f"max_seq_len {max_seq_len} exceeds max_position_embeddings {values['max_position_embeddings']}"
        )
    return _complete(values, where)


def _complete(values: dict[str, Any], where: str) -> LlamaArchitecture:
    """The architecture from the fields given, with Llama's defaults for the rest."""
    for name, default in _DEFAULTS.items():
        values.setdefault(name, default)
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    scaling = values.pop("rope_scaling", None)
    return LlamaArchitecture(
        **values,
        rope_scaling=Llama3RopeScaling.from_hf(scaling, where) if scaling else None,
    )
