import json

import pytest

from megatron_prm.config import ConfigError, RunConfig, build_config, load_config, parse_overrides


def test_recipe_defaults():
    config = RunConfig()
    assert config.prm.placeholder_token == "ки"
    assert config.prm.reward_tokens == "+,-"
    assert config.prm.process_reward is True
    assert config.data.max_seq_len == 4096
    assert config.data.max_prompt_len == 2048
    assert config.training.learning_rate == 1e-6
    assert config.training.gradient_accumulation_steps == 8
    assert config.training.per_device_train_batch_size == 1
    assert (config.training.eval_steps, config.training.save_steps, config.training.logging_steps) == (100, 500, 1)
    assert config.training.bf16 is True


def test_file_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-5\nmax_seq_len: 1024\nmax_prompt_len: 512\nbf16: true\nrope_scaling: null\n")
    config = load_config(path, ["--learning_rate", "3e-5", "--bf16", "false", "--process-reward=false"])
    assert config.training.learning_rate == 3e-5
    assert config.data.max_seq_len == 1024
    assert config.training.bf16 is False
    assert config.prm.process_reward is False


def test_json_file_and_dict_values(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "max_steps": 5}))
    config = load_config(path, ["--tensorboard_dir", "tb"])
    assert config.model.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    assert config.training.max_steps == 5
    assert config.training.tensorboard_dir == "tb"


def test_unknown_key_lists_close_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "learning_rat" in str(err.value) and "learning_rate" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="placeholder_token"):
        load_config(None, ["--placeholder_tokn", "x"])


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="max_seq_len must be int"):
        build_config({"max_seq_len": "many"})
    with pytest.raises(ConfigError, match="bf16 must be bool"):
        build_config({"bf16": "perhaps"})
    with pytest.raises(ConfigError, match="max_prompt_len"):
        build_config({"max_seq_len": 128, "max_prompt_len": 128})
    with pytest.raises(ConfigError, match="reward_tokens"):
        build_config({"reward_tokens": "+"})
    with pytest.raises(ConfigError, match="bf16 and fp16"):
        build_config({"fp16": True})


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(None, ["--learning_rate", "2e-5", "--reward_tokens", "good,bad", "--num_hidden_layers", "2"])
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config
    assert not (tmp_path / "config.json.tmp").exists()


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--flag", "--b=x y"]) == {"a": "1", "flag": "true", "b": "x y"}
    with pytest.raises(ConfigError):
        parse_overrides(["value-without-name"])


def test_readme_argument_table_matches_the_dataclasses():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("argument_table", REPO / "tools" / "argument_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.readme_table((REPO / "README.md").read_text()) == module.argument_table(), (
        "README.md's argument table is stale: run python tools/argument_table.py --write"
    )
