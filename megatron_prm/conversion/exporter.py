"""Megatron-Core ``torch_dist`` checkpoint -> HF Llama / Mistral safetensors, one layer at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from tqdm import tqdm

from megatron_prm.checkpoint import MODEL_CONFIG_NAME, TOKENIZER_DIR, resolve_checkpoint
from megatron_prm.conversion.importer import DTYPES, copy_tokenizer_files
from megatron_prm.conversion.mapping import ParamRule, Transform, hf_shapes, megatron_shape, rules_for, to_hf
from megatron_prm.conversion.safetensors_io import CheckpointFormatError, PlannedTensor, ShardedSafetensorsWriter
from megatron_prm.conversion.staging import staged_output
from megatron_prm.conversion.torch_dist_writer import single_process_dcp
from megatron_prm.model.architecture import LlamaArchitecture, read_hf_config

HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


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


def _load(checkpoint: Path, rules: list[ParamRule], layer: Optional[int], metadata: dict) -> dict[str, torch.Tensor]:
    """The Megatron tensors of ``rules`` for one layer (or the non-layer ones), read from the checkpoint."""
    request = {}
    for rule in rules:
        stored = metadata[rule.checkpoint_key]
        shape = tuple(stored.size)
        if rule.per_layer:
            request[rule.checkpoint_key] = _Slice(torch.empty((1,) + shape[1:], dtype=stored.properties.dtype),
                                                  (layer,) + (0,) * (len(shape) - 1))
        else:
            request[rule.checkpoint_key] = _Slice(torch.empty(shape, dtype=stored.properties.dtype), (0,) * len(shape))
    with single_process_dcp():
        dcp.load(request, storage_reader=FileSystemReader(str(checkpoint)), planner=_SliceLoadPlanner(), no_dist=True)
    return {key: piece.buffer[0] if rule.per_layer else piece.buffer
            for rule, (key, piece) in zip(rules, request.items())}


def _check_stored(metadata: dict, rules: tuple[ParamRule, ...], arch: LlamaArchitecture, where: Path) -> None:
    problems = []
    for rule in rules:
        stored = metadata.get(rule.checkpoint_key)
        if stored is None or not hasattr(stored, "size"):
            problems.append(f"{rule.checkpoint_key} is missing")
            continue
        size = tuple(stored.size)
        expected = megatron_shape(rule, arch, padded_vocab=size[0])
        if rule.per_layer:
            expected = (arch.num_hidden_layers,) + expected
        if size != expected or (rule.transform is Transform.VOCAB and size[0] < arch.vocab_size):
            problems.append(f"{rule.checkpoint_key} has shape {list(size)}, {MODEL_CONFIG_NAME} implies {list(expected)}")
    if problems:
        raise CheckpointFormatError(f"{where} does not match its {MODEL_CONFIG_NAME}: " + "; ".join(problems))


def _hf_config(saved: dict, dtype: torch.dtype) -> dict:
    """The saved HF config; only the dtype field changes, and only if the weights' dtype differs."""
    config = dict(saved)
    config.setdefault("architectures", [HF_CLASS[config["model_type"]]])
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    key = "dtype" if "dtype" in config else "torch_dtype"
    if config.get(key) != name:
        config[key] = name
    return config


def export_hf(megatron_dir: Path, out_dir: Path, dtype: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict:
    """Write the weights of a Megatron checkpoint (a run directory's ``latest`` or one ``iter_*``) as an
    HF model directory that ``AutoModelForCausalLM.from_pretrained`` loads without custom code."""
    checkpoint = resolve_checkpoint(megatron_dir)
    config_path = checkpoint / MODEL_CONFIG_NAME
    saved_config = read_hf_config(config_path)  # the stored config as it is; refuses unsupported architectures
    arch = LlamaArchitecture.from_hf_config(saved_config, str(config_path))
    rules = rules_for(saved_config["model_type"], arch)
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    _check_stored(metadata, rules, arch, checkpoint)
    target_dtype = DTYPES[dtype] if dtype else metadata[rules[0].checkpoint_key].properties.dtype

    layer_rules = [r for r in rules if r.per_layer]
    groups: list[tuple[Optional[int], list[ParamRule]]] = [(None, [rules[0]])]
    groups += [(layer, layer_rules) for layer in range(arch.num_hidden_layers)]
    groups.append((None, [r for r in rules[1:] if not r.per_layer]))
    planned = [PlannedTensor(name, target_dtype, shape)
               for layer, group in groups for rule in group
               for name, shape in zip(rule.hf_names(layer), hf_shapes(rule, arch))]

    with staged_output(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, planned, max_shard_bytes)
        for layer, group in tqdm(groups, desc="export", unit="layer", disable=not progress):
            loaded = _load(checkpoint, group, layer, metadata)
            for rule in group:
                for name, tensor in zip(rule.hf_names(layer), to_hf(rule, loaded.pop(rule.checkpoint_key), arch)):
                    writer.write(name, tensor.to(target_dtype))
        writer.close()
        (staging / "config.json").write_text(json.dumps(_hf_config(saved_config, target_dtype), indent=2) + "\n")
        tokenizer_files = copy_tokenizer_files(checkpoint / TOKENIZER_DIR, staging)
    return {"output": str(out_dir), "checkpoint": str(checkpoint), "model_type": saved_config["model_type"],
            "dtype": str(target_dtype), "files": writer.file_names, "tokenizer_files": tokenizer_files}
