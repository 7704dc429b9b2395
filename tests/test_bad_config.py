"""Config values checked where the config is built (issue 27): seed range, heads that divide the hidden size,
an even head dimension, positive RoPE scaling factors, sequence lengths against the model; YAML that is not one
mapping is one line; score --hf of a small model takes its max_position_embeddings as the default length."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli
from megatron_prm import cli
from megatron_prm.config import ConfigError, ModelArguments, build_config, read_config_file
from megatron_prm.model.architecture import resolve_architecture
from megatron_prm.option_ranges import MAX_SEQ_LEN

SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


@pytest.mark.parametrize("values,message", [
    ({"seed": -1}, "seed must lie in"),
    ({"seed": 2 ** 32}, "seed must lie in"),
    ({**SHAPE, "num_attention_heads": 6}, "hidden_size 64 is not a multiple of num_attention_heads 6"),
    ({**SHAPE, "num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({**SHAPE, "head_dim": 15}, "head dimension 15 is odd"),
    ({**SHAPE, "hidden_size": 36, "num_attention_heads": 4}, "head dimension 9 is odd"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": -4.0}}, "factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 0}}, "low_freq_factor must be"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "factor must be a positive number"),
    ({"max_seq_len": 100_000_000}, f"max_seq_len must lie in [2, {MAX_SEQ_LEN}]"),
    ({"max_seq_len": 512, "max_position_embeddings": 256}, "max_seq_len 512 exceeds max_position_embeddings 256"),
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be at least 1"),
])
def test_config_values_are_checked_where_the_config_is_built(values, message):
    with pytest.raises(ConfigError) as refused:
        build_config(values)
    assert message in str(refused.value)


def test_the_bounds_themselves_are_accepted():
    assert build_config({"seed": 0}).training.seed == 0
    assert build_config({"seed": 2 ** 32 - 1}).training.seed == 2 ** 32 - 1
    assert build_config({**SHAPE, "num_attention_heads": 6, "head_dim": 8}).model.head_dim == 8
    assert build_config({"max_seq_len": 256, "max_position_embeddings": 256}).data.max_seq_len == 256


@pytest.mark.parametrize("change,message", [
    ({"num_attention_heads": 6}, "not a multiple of num_attention_heads 6"),
    ({"head_dim": 15}, "head_dim 15 is odd"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": -2.0, "original_max_position_embeddings": 64}},
     "factor must be a positive number"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
])
def test_a_model_config_file_is_checked_the_same_way(tmp_path, change, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **SHAPE, "vocab_size": 100, "max_position_embeddings": 256,
                                  **change}))
    with pytest.raises(ConfigError, match=message):
        resolve_architecture(ModelArguments(model_config=str(config)), 100, 128)


@pytest.mark.parametrize("text,where", [("a: 1\n---\nb: 2\n", "line 2, column 1"), ("? [a]\n: 1\n", "line 1, column 3"),
                                        ("{[1, 2]: 3}\n", "line 1, column 2")])
def test_yaml_that_is_not_one_mapping_is_one_line(tmp_path, capsys, text, where):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=where):
        read_config_file(path)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and where in err and "^" not in err, err


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"seed: 1\nrun_name: \xff\n")
    with pytest.raises(ConfigError, match="run.yaml: not UTF-8 text"):
        read_config_file(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_score_on_cuda_without_cuda_is_one_line_before_any_work(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert cli.main(["score", "--checkpoint", str(tmp_path / "none"), "--data", str(data), "--output",
                     str(tmp_path / "s.jsonl"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is visible" in err, err


def test_score_hf_of_a_small_model_follows_its_max_position_embeddings(tmp_path, capsys):
    from megatron_prm.data.synthetic import write_dataset
    from megatron_prm.tokenizer import load_tokenizer
    from qwen_fixtures import write_qwen2_prm, write_qwen2_tokenizer

    tokenizer_dir = write_qwen2_tokenizer(tmp_path / "tokenizer", extra_special=("<extra_0>",))
    torch.manual_seed(0)
    hf = write_qwen2_prm(tmp_path / "hf", load_tokenizer(str(tokenizer_dir)).vocab_size, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, hf / file.name)
    records = write_dataset(tmp_path / "records.jsonl", 3, seed=5)
    base = ["score", "--hf", str(hf), "--data", str(records), "--placeholder_token", "<extra_0>", "--device", "cpu"]
    result = run_cli([*base, "--output", str(tmp_path / "scores.jsonl")])
    assert json.loads(result.stdout.strip().splitlines()[-1])["records"] == 3
    # Asking for more than the model was built for stays an error, of one line (refused before any process group).
    assert cli.main([*base, "--output", str(tmp_path / "more.jsonl"), "--max_seq_len", "512"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "exceeds max_position_embeddings 256" in errors[0], errors
    assert not (tmp_path / "more.jsonl").exists()
