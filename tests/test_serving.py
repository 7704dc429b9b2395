"""Serving facts of an export (``prm_serving.json``, the vLLM command per kind) and the token classifier read
back as its causal LM, without running a model (the end-to-end checks are in tests/test_qwen_prm.py)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import save_file

from megatron_prm.config import ConfigError
from megatron_prm.conversion.safetensors_io import CheckpointFormatError, SafetensorsReader
from megatron_prm.conversion.serving import (
    describe_serving,
    export_kind_of,
    export_scoring_settings,
    read_serving_info,
    write_serving_info,
)
from megatron_prm.conversion.token_classifier import ScoreRowsAsLMHead
from megatron_prm.model.architecture import Architecture


def _option(command: str, name: str):
    words = shlex.split(command)
    return words[words.index(name) + 1]


def test_a_sentencepiece_causal_lm_names_its_reward_pieces_in_the_vllm_command(mistral_tokenizer, tmp_path):
    info = describe_serving(mistral_tokenizer, "causal-lm", "MistralForCausalLM", "float32", "ки", ["+", "-"],
                            "out dir")
    assert info.reward_token_pieces == ["▁+", "▁-"]  # the vocabulary's pieces, not the text
    assert mistral_tokenizer.encode("+") == [info.reward_token_ids[0]]
    assert shlex.split(info.vllm_command)[:3] == ["vllm", "serve", "out dir"]
    assert _option(info.vllm_command, "--dtype") == "float32" and _option(info.vllm_command, "--convert") == "classify"
    assert json.loads(_option(info.vllm_command, "--hf-overrides")) == {
        "architectures": ["MistralForSequenceClassification"], "classifier_from_token": ["▁+", "▁-"],
        "method": "no_post_processing"}
    assert json.loads(_option(info.vllm_command, "--pooler-config")) == {
        "pooling_type": "STEP", "step_tag_id": info.step_tag_id, "task": "token_classify"}
    assert (info.output_classes, info.p_good_column) == (["good", "bad"], 0)

    write_serving_info(tmp_path, info)
    assert read_serving_info(tmp_path) == info
    assert export_scoring_settings(tmp_path, {}) == ["--placeholder_token=ки", "--reward_tokens=+,-"]


def test_the_mlp_head_serves_its_second_column_without_reward_tokens(mistral_tokenizer):
    info = describe_serving(mistral_tokenizer, "mlp-head", "Qwen2ForProcessRewardModel", "bfloat16", "ки",
                            ["+", "-"], "prm")
    assert info.reward_token_ids is None and (info.output_classes, info.p_good_column) == (["bad", "good"], 1)
    assert "--convert" not in info.vllm_command and _option(info.vllm_command, "--dtype") == "bfloat16"


def test_export_kinds_and_a_broken_serving_file(tmp_path):
    assert export_kind_of({}, "c") == "causal-lm"
    assert export_kind_of({"architectures": ["Qwen2ForTokenClassification"]}, "c") == "token-classifier"
    assert export_kind_of({"architectures": ["Qwen2ForProcessRewardModel"]}, "c") == "mlp-head"
    with pytest.raises(ConfigError, match="c: architectures .'LlamaForSequenceClassification'. is none of"):
        export_kind_of({"architectures": ["LlamaForSequenceClassification"]}, "c")
    (tmp_path / "prm_serving.json").write_text(json.dumps({"step_tag": "x"}))
    with pytest.raises(ConfigError, match="prm_serving.json: lacks architecture"):
        read_serving_info(tmp_path)


ARCH = Architecture(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=4, vocab_size=10, max_position_embeddings=16, rope_theta=1e4,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02)


def test_score_rows_become_the_lm_head_rows_of_the_reward_ids(tmp_path):
    score = torch.randn(2, 8)
    save_file({"model.norm.weight": torch.ones(8), "score.weight": score, "score.bias": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    reader = ScoreRowsAsLMHead(SafetensorsReader(tmp_path), ARCH, good_id=7, bad_id=3)
    assert reader.names() == {"model.norm.weight", "lm_head.weight"}
    head = reader.read("lm_head.weight")
    assert head.shape == (10, 8) and torch.equal(head[[7, 3]], score)
    assert head[[0, 1, 2, 4, 5, 6, 8, 9]].abs().sum() == 0

    save_file({"score.weight": score, "score.bias": torch.tensor([0.5, 0.0])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="model.safetensors: score.bias is not zero"):
        ScoreRowsAsLMHead(SafetensorsReader(tmp_path), ARCH, good_id=7, bad_id=3)
