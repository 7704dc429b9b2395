"""Every config value is checked once, where the config is built; errors name the key and the value."""

import json

import pytest

from megatron_prm.cli import main
from megatron_prm.config import ConfigError, build_config, load_config

BAD = [
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1.*got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be at least 1.*got 0"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads 6 must be a multiple of num_key_value_heads 4"),
    ({"hidden_size": -64}, "hidden_size must be at least 1.*got -64"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be positive.*got 0"),
    ({"max_grad_norm": -1}, "max_grad_norm must not be negative.*got -1"),
    ({"adam_beta1": 1.0}, r"adam_beta1 must lie in \[0, 1\), got 1.0"),
    ({"adam_beta2": -0.1}, r"adam_beta2 must lie in \[0, 1\), got -0.1"),
    ({"adam_epsilon": 0}, "adam_epsilon must be positive, got 0"),
    ({"learning_rate": 0}, "learning_rate must be positive, got 0"),
    ({"weight_decay": -0.1}, "weight_decay must not be negative, got -0.1"),
    ({"learning_rate": "nan"}, "learning_rate must be a finite number, got 'nan'"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number, got inf"),
    ({"num_train_epochs": "inf"}, "num_train_epochs must be a finite number, got 'inf'"),
    ({"max_steps": 10, "warmup_steps": 10}, r"warmup_steps \(10\) must be below max_steps \(10\)"),
    ({"sharding": "stage2"}, "sharding 'stage2' is not supported.*would silently run as stage1"),
    ({"sharding": "stage3"}, "sharding 'stage3' is not supported"),
    # rules that tie sections together, checked here rather than when the data or the model is built
    ({"zero_padding": True, "per_device_train_batch_size": 2}, "one packed row: set per_device_train_batch_size to 1 "
                                                               r"\(got 2\)"),
    ({"lazy": True, "max_steps": -1}, r"lazy=True .* set max_steps \(got -1\)"),
    ({"lazy": True, "max_steps": 10, "save_strategy": "epoch"}, "save_strategy 'epoch' needs a known epoch length"),
]


@pytest.mark.parametrize("values, message", BAD, ids=[",".join(f"{k}={v}" for k, v in values.items()) for values, _ in BAD])
def test_bad_values_are_refused_when_the_config_is_built(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_output_dir_that_is_a_file_and_a_lazy_store_are_refused(tmp_path):
    file = tmp_path / "runs"
    file.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"output_dir '{file}' is a file"):
        load_config(None, ["--output_dir", str(file)])
    (tmp_path / "store.meta.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a preprocessed store"):
        build_config({"lazy": True, "max_steps": 5, "train_dataset_path": str(tmp_path / "store")})


@pytest.mark.parametrize("option, value", [("--nodes", "0"), ("--gpus-per-node", "-8"), ("--gpu-memory-gib", "0")])
def test_plan_refuses_an_empty_cluster(tmp_path, capsys, option, value):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                  "num_attention_heads": 4, "vocab_size": 1000, "tensor_parallel_degree": 1}))
    with pytest.raises(SystemExit) as exit_:  # a usage error: the option's range is in option_ranges.OPTION_RANGES
        main(["plan", "--config", str(config), option, value])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{option}: must be" in error and value in error
