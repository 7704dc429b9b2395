"""User errors reach the command line as one clear message and exit status 2."""

import json

import pytest

from conftest import MISTRAL, run_cli, write_jsonl


def test_unknown_config_key(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1.0e-4\nmax_sequence_len: 512\n")
    result = run_cli(["train", str(tmp_path / "run.yaml")], check=False)
    assert result.returncode == 2
    assert "unknown config key 'max_sequence_len'" in result.stderr and "max_seq_len" in result.stderr


@pytest.mark.one_leg
def test_bad_record_stops_training_before_anything_is_written(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"src": "q", "responses": ["a", "b"], "labels": ["+", "-"]},
        {"src": "q", "responses": ["a", "b"], "labels": ["+"]},
    ])
    config = {"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(data), "dev_dataset_path": None,
              "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "max_seq_len": 64, "max_prompt_len": 32, "device": "cpu", "bf16": False,
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "run.json").write_text(json.dumps(config))
    result = run_cli(["train", str(tmp_path / "run.json")], check=False)
    assert result.returncode == 2
    assert f"{data}: record 1 (line 2), field 'labels': has 1 labels for 2 steps" in result.stderr
    assert not any(p.name.startswith("iter_") for p in (tmp_path / "out").iterdir())
    # The corrected run starts in the same output_dir: what the failed start left is no earlier run.
    write_jsonl(data, [{"src": "q", "responses": ["a", "b"], "labels": ["+", "-"]}] * 4)
    rerun = run_cli(["train", str(tmp_path / "run.json"), "--max_steps", "1", "--per_device_train_batch_size", "1",
                     "--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--save_strategy", "no"], check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # A directory whose log holds a trained step is an earlier run, checkpoint or not.
    import pytest

    from megatron_prm.config import ConfigError
    from megatron_prm.run_directory import check_output_dir

    with pytest.raises(ConfigError, match="is not empty"):
        check_output_dir(tmp_path / "out", resuming=False, overwrite=False)


def test_placeholder_of_several_tokens(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "q", "responses": ["a"], "labels": ["+"]}])
    result = run_cli(["check-data", "--data", str(data), "--tokenizer", MISTRAL, "--placeholder-token", "<step>"],
                     check=False)
    assert result.returncode == 2 and "placeholder_token '<step>'" in result.stderr and "exactly one token" in result.stderr


def test_the_config_is_positional_or_given_with_config_for_train_and_plan(tmp_path, capsys):
    import pytest

    from megatron_prm import cli
    from megatron_prm.config import ConfigError

    split = cli.config_and_overrides
    assert split(["run.yaml", "--max_seq_len", "64"]) == ("run.yaml", ["--max_seq_len", "64"])
    assert split(["--config", "run.yaml", "--max_seq_len", "64"]) == ("run.yaml", ["--max_seq_len", "64"])
    assert split(["--max_seq_len", "64", "--config=run.yaml"]) == ("run.yaml", ["--max_seq_len", "64"])
    assert split(["--max_seq_len", "64"]) == (None, ["--max_seq_len", "64"])
    with pytest.raises(ConfigError, match="two configs given"):
        split(["a.yaml", "--config", "b.yaml"])
    with pytest.raises(ConfigError, match="--config needs a JSON or YAML file"):
        split(["--config", "--max_seq_len", "64"])
    # plan takes both forms (it required --config; train took only the positional form) and says the same.
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                                  "max_seq_len": 128, "max_prompt_len": 64}))
    figures = []
    for form in ([str(config)], ["--config", str(config)]):
        assert cli.main(["plan", *form, "--nodes", "1", "--gpus-per-node", "1"]) == 0
        figures.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert figures[0] == figures[1] and figures[0]["world_size"] == 1
    assert cli.main(["plan", "--nodes", "1"]) == 2
    assert "plan needs the run's config: megatron-prm plan CONFIG (or --config CONFIG)" in capsys.readouterr().err


def test_raw_public_records_get_the_convert_data_command(tmp_path, capsys):
    from megatron_prm import cli

    raw = write_jsonl(tmp_path / "gsm8k.jsonl", [{"id": "gsm8k-0", "generator": "m", "problem": "1 + 1?",
                                                   "steps": ["1 + 1 = 2", "So 2."], "final_answer_correct": True,
                                                   "label": -1}])
    assert cli.main(["check-data", "--data", str(raw), "--tokenizer", MISTRAL]) == 2
    assert (f"{raw}: record 0 (line 1), field 'src': is missing; the record looks like processbench data: convert "
            "it first with `megatron-prm convert-data --from processbench --input FILE --output FILE.jsonl`"
            ) in capsys.readouterr().err


def test_score_says_which_option_the_other_kind_of_model_directory_needs(tmp_path, capsys):
    from megatron_prm import cli

    run, hf = tmp_path / "run", tmp_path / "hf"
    run.mkdir(), hf.mkdir()
    (run / "latest").write_text("iter_0000004\n")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "model.safetensors").write_bytes(b"")
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "q", "responses": ["a"]}])
    out = str(tmp_path / "scores.jsonl")
    assert cli.main(["score", "--hf", str(run), "--data", str(data), "--output", out]) == 2
    assert f"{run} is a megatron-prm run or checkpoint, not a Hugging Face model: score it with --checkpoint" in (
        capsys.readouterr().err)
    assert cli.main(["score", "--checkpoint", str(hf), "--data", str(data), "--output", out]) == 2
    assert "it is a Hugging Face model directory: `megatron-prm score --hf` reads it" in capsys.readouterr().err


def test_figures_for_people_are_rounded_and_counted_in_words(tmp_path, capsys):
    from megatron_prm import cli
    from megatron_prm.progress import for_people, plural

    assert (plural(1, "process"), plural(2, "process"), plural(1, "cpu process"), plural(3, "item")) == (
        "1 process", "2 processes", "1 cpu process", "3 items")
    assert (for_people(2 / 3), for_people(None), for_people(4)) == ("0.6667", "n/a", "4")
    scores = write_jsonl(tmp_path / "scores.jsonl", [
        {"id": "gsm8k-0", "first_error": 1, "step_scores": [0.9, 0.1 / 3]},
        {"id": "gsm8k-1", "first_error": -1, "step_scores": [0.8, 0.7]},
        {"id": "gsm8k-2", "first_error": 0, "step_scores": [0.7, 0.2]}])
    assert cli.main(["evaluate", "--scores", str(scores), "--benchmark", "processbench"]) == 0
    captured = capsys.readouterr()
    assert "gsm8k: acc_erroneous 0.5000 acc_correct 1.0000 f1 0.6667 (3 items)" in captured.err
    assert "processbench: average_f1 = 0.6667" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["average_f1"] == 2 / 3  # full precision in JSON


def test_hf_conversion_is_a_command_of_the_installed_cli(tmp_path, capsys):
    """`megatron-prm convert-hf` is tools/convert_hf.py's command: same options, same one-line refusals."""
    from megatron_prm import cli

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["convert-hf", "import", "--hf", str(hf), "--out", str(hf)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    with __import__("pytest").raises(SystemExit):
        cli.main(["convert-hf", "--help"])
    assert "convert-hf import --hf DIR --out DIR" in capsys.readouterr().out


def test_convert_hf_takes_no_progress_before_or_after_the_direction():
    from megatron_prm import cli

    parser = cli.build_parser()
    before = parser.parse_args(["convert-hf", "--no-progress", "import", "--hf", "h", "--out", "o"])
    after = parser.parse_args(["convert-hf", "import", "--hf", "h", "--out", "o", "--no-progress"])
    neither = parser.parse_args(["convert-hf", "import", "--hf", "h", "--out", "o"])
    assert before.no_progress and after.no_progress and not neither.no_progress
