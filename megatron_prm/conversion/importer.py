"""HF checkpoint (Llama, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE; causal LM or MLP-head PRM,
or for scoring this project's token-classifier export) -> Megatron-Core ``torch_dist`` checkpoint, one tensor
at a time."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_prm.checkpoint import MODEL_CONFIG_NAME, TOKENIZER_DIR, TRAIN_STATE_NAME, TrainState
from megatron_prm.checkpoint_manifest import write_manifest
from megatron_prm.config import ConfigError
from megatron_prm.conversion.mapping import (
    IGNORED_HF_SUFFIXES,
    ParamRule,
    Transform,
    checkpoint_key,
    experts_of,
    hf_shapes,
    layers_of,
    layers_stacked,
    megatron_shape,
    rules_for,
    to_megatron,
)
from megatron_prm.conversion.safetensors_io import CheckpointFormatError, SafetensorsReader
from megatron_prm.conversion.serving import TOKEN_CLASSIFIER, export_kind_of
from megatron_prm.conversion.staging import staged_output
from megatron_prm.conversion.token_classifier import ScoreRowsAsLMHead, causal_lm_config
from megatron_prm.conversion.torch_dist_writer import LazyTensor, stacked, stacked_experts, whole, write_torch_dist
from megatron_prm.hub import local_path
from megatron_prm.layout import model_split_problems
from megatron_prm.model.architecture import Architecture, read_hf_config
from megatron_prm.model.provider import padded_vocab_size
from megatron_prm.progress import progress as show_progress
from megatron_prm.tokenizer import TOKENIZER_FILES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_tensors(reader: SafetensorsReader | ScoreRowsAsLMHead, rules: tuple[ParamRule, ...], arch: Architecture) -> None:
    """Every tensor the config implies is present with the implied shape, and nothing else is there."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        for layer in layers_of(rule, arch):
            for expert in experts_of(rule, arch):
                expected.update(zip(rule.hf_names(layer, expert), hf_shapes(rule, arch)))
    present = reader.names()
    problems = [f"{name} is missing" for name in sorted(expected.keys() - present)]
    for name in sorted(expected.keys() & present):
        found = reader.entries[name].shape
        if found != expected[name]:
            problems.append(f"{name} has shape {list(found)} in {reader.entries[name].file.name}, "
                            f"the config implies {list(expected[name])}")
    unexpected = sorted(n for n in present - expected.keys() if not n.endswith(IGNORED_HF_SUFFIXES))
    problems += [f"{name} is not a parameter of this architecture" for name in unexpected[:5]]
    if problems:
        raise CheckpointFormatError(
            f"{reader.directory}: the tensors do not match config.json "
            f"(e.g. tie_word_embeddings={arch.tie_word_embeddings}): " + "; ".join(problems[:8]))


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if copied:
        target.mkdir(exist_ok=True)
        for name in copied:
            shutil.copy2(source / name, target / name)
    return copied


# What an HF model directory holds that an import reads (fetched from the Hub cache for a Hub ID).
HF_MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)


def hf_model_directory(name_or_path: str, what: str) -> Path:
    """The local HF model directory behind a path or Hub ID given as the argument ``what``."""
    return local_path(name_or_path, what, HF_MODEL_FILES)


def import_hf(hf_dir: Path, out_dir: Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              dtype: Optional[str] = None, progress: bool = True,
              reward_ids: Optional[tuple[int, int]] = None, extra_files: Optional[dict] = None) -> dict:
    """Convert ``hf_dir`` into a Megatron checkpoint at ``out_dir``; returns a summary.

    The checkpoint is layout-independent; ``tensor_parallel`` / ``pipeline_parallel`` are checked
    against the model, and the vocabulary is padded as a run with that tensor-parallel size pads it.
    A token-classifier export becomes its causal LM, its score rows the LM-head rows of ``reward_ids``
    (good, bad): the ids the scorer will read. ``extra_files`` (name: JSON value) are written into it too.
    """
    config = read_hf_config(hf_dir)
    config_path = hf_dir / "config.json"
    token_classifier = export_kind_of(config, str(config_path)) == TOKEN_CLASSIFIER
    if token_classifier:
        if reward_ids is None:
            raise ConfigError(f"{config_path}: a token classifier ({config['architectures'][0]}) is read only by "
                              "`megatron-prm score --hf`; import the causal-LM export to train")
        config = causal_lm_config(config)
    arch = Architecture.from_hf_config(config, str(config_path))
    problems = model_split_problems(arch, tensor_parallel, pipeline_parallel)
    if problems:
        raise ConfigError(f"{config_path}: cannot split for --tp {tensor_parallel} --pp {pipeline_parallel}: "
                          + "; ".join(problems))
    reader = SafetensorsReader(hf_dir)
    if token_classifier:
        reader = ScoreRowsAsLMHead(reader, arch, *reward_ids)
    rules = rules_for(arch)
    check_tensors(reader, rules, arch)
    first = reader.entries[rules[0].hf_names()[0]]
    target_dtype = DTYPES[dtype] if dtype else first.dtype
    padded_vocab = padded_vocab_size(arch.vocab_size, tensor_parallel)

    def converter(rule: ParamRule):
        def produce(layer: Optional[int] = None, expert: Optional[int] = None) -> torch.Tensor:
            if rule.transform is Transform.ZEROS:
                return torch.zeros(megatron_shape(rule, arch, padded_vocab), dtype=target_dtype)
            tensors = [reader.read(name) for name in rule.hf_names(layer, expert)]
            return to_megatron(rule, tensors, arch, padded_vocab)
        return produce

    tensors: dict[str, LazyTensor] = {}
    for rule in rules:
        shape = megatron_shape(rule, arch, padded_vocab)
        produce = converter(rule)
        if not rule.per_layer:
            tensors[checkpoint_key(rule, arch)] = whole(shape, target_dtype, produce)
        elif layers_stacked(arch):
            layers = arch.num_hidden_layers
            tensors[checkpoint_key(rule, arch)] = (
                stacked_experts(shape[1:], target_dtype, layers, arch.moe.num_experts, produce) if rule.per_expert
                else stacked(shape, target_dtype, layers, produce))
        else:  # one key per layer; a layer's experts stacked along axis 0
            for layer in layers_of(rule, arch):
                tensors[checkpoint_key(rule, arch, layer)] = (
                    stacked(shape[1:], target_dtype, arch.moe.num_experts,
                            lambda expert, layer=layer, produce=produce: produce(layer, expert)) if rule.per_expert
                    else whole(shape, target_dtype, lambda layer=layer, produce=produce: produce(layer)))
    total = sum(len(t.chunks) for t in tensors.values())
    with staged_output(out_dir) as staging, show_progress(total=total, desc="import", unit="tensor", enabled=progress) as bar:
        write_torch_dist(staging, tensors, on_chunk=lambda key: bar.update())
        if token_classifier:
            (staging / MODEL_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(config_path, staging / MODEL_CONFIG_NAME)  # verbatim: export writes it back unchanged
        (staging / TRAIN_STATE_NAME).write_text(json.dumps(dataclasses.asdict(TrainState()), indent=2))
        tokenizer_files = copy_tokenizer_files(hf_dir, staging / TOKENIZER_DIR)
        for name, value in (extra_files or {}).items():
            (staging / name).write_text(json.dumps(value, indent=2) + "\n")
        write_manifest(staging)
    return {"output": str(out_dir), "model_type": config["model_type"], "layers": arch.num_hidden_layers,
            "vocab_size": arch.vocab_size, "padded_vocab_size": padded_vocab, "dtype": str(target_dtype),
            "tensors": total, "tokenizer_files": tokenizer_files}
