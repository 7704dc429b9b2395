"""Megatron-Core ``torch_dist`` checkpoint -> HF safetensors, one layer at a time.

Two targets: the family's ``*ForCausalLM`` (the default; a model with an MLP reward head is written back
in Qwen2.5-Math-PRM's ``*ForProcessRewardModel`` layout instead), or ``*ForTokenClassification`` with two
labels whose ``score`` rows are the LM-head rows of the good and bad reward tokens, so that a serving
engine's token classifier gives the PRM's P(good) at every step tag without custom code. Beside the
weights, ``prm_serving.json`` says how to serve the export (see ``serving.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from megatron_prm.checkpoint_consistency import check_tied_embeddings
from megatron_prm.checkpoint import CONFIG_NAME, MODEL_CONFIG_NAME, TOKENIZER_DIR, check_integrity, resolve_checkpoint
from megatron_prm.config import LEGACY_TOKENIZATION, ConfigError, PRMArguments, read_config_file
from megatron_prm.conversion.importer import DTYPES, copy_tokenizer_files
from megatron_prm.conversion.mapping import (
    EMBEDDING,
    LM_HEAD,
    ParamRule,
    Transform,
    checkpoint_key,
    experts_of,
    hf_shapes,
    layers_of,
    layers_stacked,
    megatron_shape,
    rules_for,
    to_hf,
)
from megatron_prm.conversion.safetensors_io import CheckpointFormatError, PlannedTensor, ShardedSafetensorsWriter
from megatron_prm.conversion.serving import (
    CAUSAL_LM,
    MLP_HEAD,
    SERVING_FILE,
    TOKEN_CLASSIFIER,
    ServingInfo,
    describe_serving,
    write_serving_info,
)
from megatron_prm.conversion.staging import staged_output
from megatron_prm.conversion.torch_dist_writer import single_process_dcp
from megatron_prm.model.architecture import Architecture, read_hf_config
from megatron_prm.progress import progress as show_progress
from megatron_prm.safe_loading import SafeFileSystemReader, load_errors_named
from megatron_prm.tokenizer import TokenizerError, load_tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TARGETS = (CAUSAL_LM, TOKEN_CLASSIFIER)
LABELS = ("good", "bad")  # the token classifier's label order: P(good) is the softmax's first column
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class _Slice:
    """A destination buffer for the part of a stored tensor that starts at ``offsets``."""

    buffer: torch.Tensor
    offsets: tuple[int, ...]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.shape)]


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Reads only the requested slices (one layer of a stacked tensor) straight into their buffers."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default set-up replaces objects that are not tensors (our slices) with None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].buffer


def _load(reader: SafeFileSystemReader, rules: list[ParamRule], layer: Optional[int], arch: Architecture,
          metadata: dict) -> list[torch.Tensor]:
    """The Megatron tensors of ``rules`` for one layer (or the non-layer ones), read from the checkpoint
    (by rule, in order): one slice of a stacked tensor, or the layer's own key in a model of mixed layers."""
    request = {}
    sliced = []
    for rule in rules:
        key = checkpoint_key(rule, arch, layer)
        stored = metadata[key]
        shape = tuple(stored.size)
        sliced.append(rule.per_layer and layers_stacked(arch))
        if sliced[-1]:
            request[key] = _Slice(torch.empty((1,) + shape[1:], dtype=stored.properties.dtype),
                                  (layer,) + (0,) * (len(shape) - 1))
        else:
            request[key] = _Slice(torch.empty(shape, dtype=stored.properties.dtype), (0,) * len(shape))
    with load_errors_named(Path(reader.path), "the weights"), single_process_dcp():
        dcp.load(request, storage_reader=reader, planner=_SliceLoadPlanner(), no_dist=True)
    return [piece.buffer[0] if one_slice else piece.buffer for one_slice, piece in zip(sliced, request.values())]


def _hf_tensors(rule: ParamRule, layer: Optional[int], tensor: torch.Tensor, arch: Architecture):
    """(HF name, tensor) of one layer's Megatron tensor of ``rule``; an expert tensor gives every expert's
    own names (``mlp.experts.{i}.gate_proj.weight``), as transformers' ``save_pretrained`` writes them."""
    for expert in experts_of(rule, arch):
        piece = tensor if expert is None else tensor[expert]
        yield from zip(rule.hf_names(layer, expert), to_hf(rule, piece, arch))


def _check_stored(metadata: dict, rules: tuple[ParamRule, ...], arch: Architecture, where: Path) -> None:
    problems = []
    for rule in rules:
        for layer in layers_of(rule, arch) if not layers_stacked(arch) else [None]:
            key = checkpoint_key(rule, arch, layer)
            stored = metadata.get(key)
            if stored is None or not hasattr(stored, "size"):
                problems.append(f"{key} is missing")
                continue
            size = tuple(stored.size)
            expected = megatron_shape(rule, arch, padded_vocab=size[0])
            if rule.per_layer and layers_stacked(arch):
                expected = (arch.num_hidden_layers,) + expected
            if size != expected or (rule.transform is Transform.VOCAB and size[0] < arch.vocab_size):
                problems.append(f"{key} has shape {list(size)}, {MODEL_CONFIG_NAME} implies {list(expected)}")
    if problems:
        raise CheckpointFormatError(f"{where} does not match its {MODEL_CONFIG_NAME}: " + "; ".join(problems[:8]))


def _hf_config(saved: dict, arch: Architecture, dtype: torch.dtype, target: str) -> dict:
    """The saved HF config; only the dtype field changes, and only if the weights' dtype differs. A token
    classifier names its class and its two labels."""
    config = dict(saved)
    config.setdefault("architectures", [arch.family.hf_prefix + "ForCausalLM"])
    if target == TOKEN_CLASSIFIER:
        config.pop("auto_map", None)
        config["architectures"] = [arch.family.hf_prefix + "ForTokenClassification"]
        config["id2label"] = dict(enumerate(LABELS))
        config["label2id"] = {label: i for i, label in enumerate(LABELS)}
    name = DTYPE_NAMES[dtype]
    key = "dtype" if "dtype" in config else "torch_dtype"
    if config.get(key) != name:
        config[key] = name
    return config


def step_tokens(checkpoint: Path, step_tag: Optional[str], reward_tokens: Optional[str]) -> PRMArguments:
    """The step tag and reward tokens: the run's settings (or the defaults), ``step_tag`` /
    ``reward_tokens`` overriding them."""
    run_config = read_config_file(checkpoint / CONFIG_NAME) if (checkpoint / CONFIG_NAME).is_file() else {}
    defaults = PRMArguments()
    # An option given empty is refused by PRMArguments, not replaced by the run's value.
    return PRMArguments(
        placeholder_token=step_tag if step_tag is not None else run_config.get("placeholder_token") or defaults.placeholder_token,
        reward_tokens=reward_tokens if reward_tokens is not None else run_config.get("reward_tokens") or defaults.reward_tokens)


def serving_info(checkpoint: Path, kind: str, architecture: str, dtype: torch.dtype, model_dir: Path,
                 step_tag: Optional[str], reward_tokens: Optional[str]) -> ServingInfo:
    """The serving facts of the export, its ids from the checkpoint's tokenizer."""
    prm = step_tokens(checkpoint, step_tag, reward_tokens)
    if not (checkpoint / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"{checkpoint} carries no tokenizer/ directory: the step tag and reward token ids are unknown")
    return describe_serving(load_tokenizer(str(checkpoint / TOKENIZER_DIR)), kind, architecture, DTYPE_NAMES[dtype],
                            prm.placeholder_token, prm.reward_token_list, str(model_dir),
                            trained_tokenization(checkpoint))


def trained_tokenization(checkpoint: Path) -> Optional[str]:
    """The tokenization the checkpoint's run trained with (per_step where its settings predate the key);
    None for a checkpoint without run settings (an imported model)."""
    if not (checkpoint / CONFIG_NAME).is_file():
        return None
    return read_config_file(checkpoint / CONFIG_NAME).get("tokenization") or LEGACY_TOKENIZATION


def _serving_or_reason(checkpoint: Path, kind: str, architecture: str, dtype: torch.dtype, model_dir: Path,
                       step_tag: Optional[str], reward_tokens: Optional[str]) -> tuple[Optional[ServingInfo], str]:
    """The export's serving facts, or None and why not (an imported base model's default step tag may not be
    one token; a checkpoint may carry no tokenizer). A token classifier's rows need them, and so do tokens
    named by the options: there the error stands."""
    try:
        return serving_info(checkpoint, kind, architecture, dtype, model_dir, step_tag, reward_tokens), ""
    except (ConfigError, TokenizerError, OSError, RuntimeError) as err:  # SentencePiece raises the last two
        if kind == TOKEN_CLASSIFIER or step_tag is not None or reward_tokens is not None:
            raise
        return None, f"no {SERVING_FILE}: {err} (--step-tag / --reward-tokens name them)"


def _reward_rows(reader: SafeFileSystemReader, rule: ParamRule, arch: Architecture, reward_ids: list[int],
                 metadata: dict) -> torch.Tensor:
    """The LM-head (or tied embedding) rows of the good and bad tokens, ``[2, h]``, read row by row."""
    key = checkpoint_key(rule, arch)
    stored = metadata[key]
    rows = []
    for row in reward_ids:
        piece = _Slice(torch.empty((1, stored.size[1]), dtype=stored.properties.dtype), (row, 0))
        with load_errors_named(Path(reader.path), "the reward rows"):
            dcp.load({key: piece}, storage_reader=reader, planner=_SliceLoadPlanner(), no_dist=True)
        rows.append(piece.buffer)
    return torch.cat(rows)


def export_hf(megatron_dir: Path, out_dir: Path, dtype: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True, target: str = CAUSAL_LM,
              step_tag: Optional[str] = None, reward_tokens: Optional[str] = None) -> dict:
    """Write the weights of a Megatron checkpoint (a run directory's ``latest`` or one ``iter_*``) as an
    HF model directory that ``AutoModelForCausalLM`` (``target="causal-lm"``) or
    ``AutoModelForTokenClassification`` (``"token-classifier"``) loads without custom code, with its
    ``prm_serving.json``; prints one line on how to serve it."""
    if target not in TARGETS:
        raise ConfigError(f"export target {target!r} is not one of {', '.join(TARGETS)}")
    checkpoint = resolve_checkpoint(megatron_dir)
    check_integrity(checkpoint, checksums=True)
    config_path = checkpoint / MODEL_CONFIG_NAME
    saved_config = read_hf_config(config_path)  # the stored config as it is; refuses unsupported architectures
    arch = Architecture.from_hf_config(saved_config, str(config_path))
    rules = rules_for(arch)
    reader = SafeFileSystemReader(checkpoint)
    metadata = reader.read_metadata().state_dict_metadata
    check_tied_embeddings(metadata, arch.tie_word_embeddings, checkpoint, MODEL_CONFIG_NAME)
    _check_stored(metadata, rules, arch, checkpoint)
    target_dtype = DTYPES[dtype] if dtype else metadata[checkpoint_key(rules[0], arch)].properties.dtype
    if target == TOKEN_CLASSIFIER and arch.reward_head == "mlp":
        raise ConfigError(f"{checkpoint} has an MLP reward head; a token classifier holds one linear layer "
                          "(export it as causal-lm: the *ForProcessRewardModel layout)")
    hf_config = _hf_config(saved_config, arch, target_dtype, target)
    kind = MLP_HEAD if arch.reward_head == "mlp" else target
    serving, no_serving = _serving_or_reason(checkpoint, kind, hf_config["architectures"][0], target_dtype, out_dir,
                                             step_tag, reward_tokens)
    if kind == TOKEN_CLASSIFIER:
        hf_config["prm_step_tag"], hf_config["prm_step_tag_id"] = serving.step_tag, serving.step_tag_id
        vocab_rule = EMBEDDING if arch.tie_word_embeddings else LM_HEAD
        rules = tuple(r for r in rules if r is not LM_HEAD)
    rules = tuple(r for r in rules if r.transform is not Transform.ZEROS)  # the unused LM head of an MLP PRM

    groups: list[tuple[Optional[int], list[ParamRule]]] = [(None, [rules[0]])]
    groups += [(layer, [r for r in rules if r.per_layer and layer in layers_of(r, arch)])
               for layer in range(arch.num_hidden_layers)]
    groups.append((None, [r for r in rules[1:] if not r.per_layer]))
    planned = [PlannedTensor(name, target_dtype, shape)
               for layer, group in groups for rule in group for expert in experts_of(rule, arch)
               for name, shape in zip(rule.hf_names(layer, expert), hf_shapes(rule, arch))]
    if kind == TOKEN_CLASSIFIER:
        planned += [PlannedTensor("score.weight", target_dtype, (2, arch.hidden_size)),
                    PlannedTensor("score.bias", target_dtype, (2,))]

    with staged_output(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, planned, max_shard_bytes)
        for layer, group in show_progress(groups, desc="export", unit="layer", enabled=progress):
            for rule, loaded in zip(group, _load(reader, group, layer, arch, metadata)):
                for name, tensor in _hf_tensors(rule, layer, loaded, arch):
                    writer.write(name, tensor.to(target_dtype))
        if kind == TOKEN_CLASSIFIER:
            rows = _reward_rows(reader, vocab_rule, arch, serving.reward_token_ids, metadata)
            writer.write("score.weight", rows.to(target_dtype))
            writer.write("score.bias", torch.zeros(2, dtype=target_dtype))
        writer.close()
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer_files = copy_tokenizer_files(checkpoint / TOKENIZER_DIR, staging)
        if serving is not None:
            write_serving_info(staging, serving)
    summary = {"output": str(out_dir), "checkpoint": str(checkpoint), "model_type": saved_config["model_type"],
               "architecture": hf_config["architectures"][0], "dtype": str(target_dtype),
               "files": writer.file_names, "tokenizer_files": tokenizer_files}
    if serving is None:
        print(no_serving, file=sys.stderr)
        return summary
    print(serving.one_line(out_dir / SERVING_FILE), file=sys.stderr)
    summary.update(serving=str(out_dir / SERVING_FILE), export_kind=kind, step_tag=serving.step_tag,
                   step_tag_id=serving.step_tag_id, reward_token_ids=serving.reward_token_ids,
                   reward_token_pieces=serving.reward_token_pieces, p_good_column=serving.p_good_column)
    return summary
