"""What a new user meets first: options in both spellings, `train --help`, the progress line, plain
progress off a terminal, strict JSON, defaults that follow from what was given, run provenance."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import sys

import numpy as np
import pytest

from conftest import MISTRAL, REPO, read_log, write_jsonl
from megatron_prm import cli, strict_json
from megatron_prm.config import ARGUMENTS, ConfigError, RunConfig, build_config, load_config, parse_overrides
from megatron_prm.option_ranges import RangeChecked
from megatron_prm.progress import PlainProgress, progress
from megatron_prm.throughput import format_duration, mfu, peak_tflops, progress_line


def _tool_parser(name: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


# Every command line of the project: (program, parser factory, subcommand, the arguments it requires).
COMMAND_LINES = [
    ("megatron-prm", cli.build_parser, "train", []),
    ("megatron-prm", cli.build_parser, "check-data", ["--data", "d", "--tokenizer", "t"]),
    ("megatron-prm", cli.build_parser, "preprocess", ["--data", "d", "--tokenizer", "t", "--output-prefix", "p"]),
    ("megatron-prm", cli.build_parser, "convert-data", ["--from", "processbench", "--input", "i", "--output", "o"]),
    ("megatron-prm", cli.build_parser, "score", ["--checkpoint", "c", "--data", "d", "--output", "o"]),
    ("megatron-prm", cli.build_parser, "evaluate", ["--scores", "s", "--benchmark", "steps"]),
    ("megatron-prm", cli.build_parser, "plan", ["--config", "c"]),
    ("megatron-prm", cli.build_parser, "check-checkpoint", ["d"]),
    ("megatron-prm", cli.build_parser, "demo", []),
    ("megatron-prm", cli.build_parser, "reshard", ["c", "--output-dir", "o"]),
    ("megatron-prm", cli.build_parser, "convert-hf", ["import", "--hf", "h", "--out", "o"]),
    ("tools/convert_hf.py", lambda: _tool_parser("convert_hf"), "import", ["--hf", "h", "--out", "o"]),
    ("tools/convert_hf.py", lambda: _tool_parser("convert_hf"), "export", ["--megatron", "m", "--out", "o"]),
    ("tools/benchmark.py", lambda: _tool_parser("benchmark"), None, []),
    ("tools/benchmark_checksum.py", lambda: _tool_parser("benchmark_checksum"), None, []),
    ("tools/benchmark_checkpoint.py", lambda: _tool_parser("benchmark_checkpoint"), None, []),
    ("tools/benchmark_convert.py", lambda: _tool_parser("benchmark_convert"), None, []),
    ("tools/benchmark_context_parallel.py", lambda: _tool_parser("benchmark_context_parallel"), None, []),
    ("tools/benchmark_data_scale.py", lambda: _tool_parser("benchmark_data_scale"), None, []),
    ("tools/benchmark_packing.py", lambda: _tool_parser("benchmark_packing"), None, ["--data", "d", "--tokenizer", "t"]),
    ("tools/benchmark_preprocess.py", lambda: _tool_parser("benchmark_preprocess"), None, []),
]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _sample_value(action: argparse.Action) -> list[str]:
    """Arguments that give ``action`` a value other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    if "shard" in action.dest:
        return ["0.5GB"]
    if isinstance(action.type, RangeChecked):  # a numeric option, range-checked from its table
        allowed = action.type.allowed
        return ["7" if allowed.high is None or allowed.high >= 7 else str(allowed.low + (allowed.high - allowed.low) / 4)]
    return ["7"] if action.type in (int, float) else ["x"]


def test_the_table_covers_every_command_and_tool():
    covered = {(program, sub) for program, _, sub, _ in COMMAND_LINES}
    assert {sub for program, sub in covered if program == "megatron-prm"} == set(_subparsers(cli.build_parser()))
    assert {sub for program, sub in covered if program == "tools/convert_hf.py"} == set(
        _subparsers(_tool_parser("convert_hf")))
    tools = {p.name for p in (REPO / "tools").glob("*.py")} - {"argument_table.py"}  # its one flag is --write
    assert {program.split("/")[1] for program, *_ in COMMAND_LINES if program.startswith("tools/")} == tools


@pytest.mark.parametrize("program,factory,sub,required", COMMAND_LINES,
                         ids=[f"{p} {s or ''}".strip() for p, _, s, _ in COMMAND_LINES])
def test_every_option_in_both_spellings(program, factory, sub, required):
    parser = factory()
    target = _subparsers(parser)[sub] if sub else parser
    prefix = [sub] if sub else []
    options = [a for a in target._actions if any(o.startswith("--") for o in a.option_strings) and a.dest != "help"]
    assert options or sub in ("train",), f"{program} {sub}: no options found"
    for action in options:
        option = next(o for o in action.option_strings if o.startswith("--"))
        # A required option of the table is replaced by the spelling under test, and so are the other
        # options of its mutually exclusive group (score: --checkpoint | --hf).
        replaced = {option} | {o for group in target._mutually_exclusive_groups if action in group._group_actions
                               for a in group._group_actions for o in a.option_strings}
        rest = [t for i, t in enumerate(required) if t not in replaced and (i == 0 or required[i - 1] not in replaced)]
        value = _sample_value(action)
        spellings = (option.replace("_", "-"), "--" + option[2:].replace("-", "_"))
        hyphens, underscores = (getattr(parser.parse_args([*prefix, *rest, spelling, *value]), action.dest)
                                for spelling in spellings)
        assert hyphens == underscores != action.default, (program, sub, spellings, hyphens, underscores)


def test_config_keys_in_both_spellings_and_forms():
    for key in ARGUMENTS:
        hyphenated = key.replace("_", "-")
        assert parse_overrides([f"--{hyphenated}", "v"]) == parse_overrides([f"--{key}", "v"]) == {key: "v"}
        assert parse_overrides([f"--{hyphenated}=v"]) == {key: "v"}
    both = load_config(None, ["--max-seq-len", "1024", "--learning_rate", "3e-5", "--per-device-train-batch-size=4"])
    assert (both.data.max_seq_len, both.training.learning_rate, both.training.per_device_train_batch_size) == (
        1024, 3e-5, 4)


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for key, (section, field) in ARGUMENTS.items():
        line = next((line for line in text.splitlines() if line.strip().startswith(f"--{key} (")), None)
        assert line is not None, f"train --help does not list {key}"
        assert f"default {field.default!r}" in line
        assert field.metadata["help"] in text
    assert "--max_prompt_len (int or null, default None)" in text
    assert "--learning_rate (float, default 1e-06)" in text


# ------------------------------------------------------------------------------------------------ output


def test_progress_line_figures():
    figures = {"loss": 0.42131, "accuracy": 0.8123, "lr": 9.87e-7, "tokens_per_s": 48210.4, "mfu": 0.4134,
               "peak_memory_gib": 61.2, "eta_s": 6720}
    assert progress_line(120, 2000, figures, "cuda") == (
        "step 120/2000 | loss 0.4213 | step acc 0.812 | lr 9.87e-07 | 48,210 tok/s | MFU 41.3% | "
        "peak mem 61.20 GiB | ETA 1h52m")
    cpu = progress_line(5, 20, {**figures, "mfu": None}, "cpu")
    assert "MFU n/a" in cpu and "peak rss 61.20 GiB" in cpu
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 * 5 + 7 * 60)] == ["0s", "1m00s", "1m01s", "5h07m"]


def test_mfu_and_the_peak_table(monkeypatch):
    import torch

    assert mfu(989e12 * 8 * 0.5, 1.0, 8, 989.0) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0
    for name, expected in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
                           ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA GH200 480GB", 989.0),
                           ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(torch.device("cuda", 0), None) == expected, name


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    log = io.StringIO()
    items = list(progress(range(5), desc="tokenizing x.jsonl", total=5, unit="records", stream=log, interval_s=0.0))
    assert items == list(range(5))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("tokenizing x.jsonl: 1/5 records (") and "\r" not in log.getvalue()
    assert lines[-1].startswith("tokenizing x.jsonl: 5/5 records (done in")
    quiet = io.StringIO()
    with progress(desc="evaluating", total=3, unit="batches", stream=quiet) as bar:  # default interval: 30 s
        bar.update(3)
    assert isinstance(bar, PlainProgress) and quiet.getvalue() == ""
    terminal = _Terminal()
    list(progress(range(3), desc="scoring", total=3, unit="batches", stream=terminal))
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    hidden = _Terminal()
    list(progress(range(3), desc="scoring", total=3, stream=hidden, enabled=False))
    assert hidden.getvalue() == ""


def test_strict_json_writes_null_for_non_finite_numbers(tmp_path):
    value = {"loss": float("nan"), "x": [float("inf"), -float("inf"), 1.5], "y": np.float32("nan"),
             "z": np.float64(2.0), "n": 3, "s": "NaN"}
    text = strict_json.dumps(value)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "loss": None, "x": [None, None, 1.5], "y": None, "z": 2.0, "n": 3, "s": "NaN"}

    from megatron_prm.run_logger import RunLogger

    logger = RunLogger(True, build_config({"output_dir": str(tmp_path)}))
    logger.scalars("train", 3, {"loss": math.nan, "grad_norm": math.inf}, line="step 3")
    logger.close()
    assert read_log(tmp_path, "train") == [{"kind": "train", "step": 3, "loss": None, "grad_norm": None}]


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_follow_what_was_given():
    config = RunConfig()
    assert config.data.dev_dataset_path is None
    assert build_config({"max_seq_len": 1024}).data.max_prompt_len == 512
    assert build_config({"max_seq_len": 1024, "max_prompt_len": 100}).data.max_prompt_len == 100
    # The resolved value is what the saved config holds, and it reads back the same.
    assert load_config(None, ["--max-seq-len", "301"]).to_flat_dict()["max_prompt_len"] == 150
    with pytest.raises(ConfigError, match="report_to: unknown tracker"):
        build_config({"report_to": "tensorboard,mlflow"})
    assert build_config({"report_to": "none", "tensorboard_dir": "tb"}).training.trackers == ["tensorboard"]


def test_check_data_with_a_short_max_seq_len(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "q " * 700, "responses": ["a", "b"], "labels": ["+", "-"]}])
    assert cli.main(["check-data", "--data", str(data), "--tokenizer", MISTRAL, "--max_seq_len", "1024"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == 1 and summary["truncated"] == 1  # the prompt kept its last 512 tokens


def test_an_explicit_missing_dev_set_is_an_error_before_anything_is_written(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"src": "q", "responses": ["a"], "labels": ["+"]}])
    code = cli.main(["train", "--tokenizer_name_or_path", MISTRAL, "--train_dataset_path", str(train),
                     "--dev-dataset-path", str(tmp_path / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"megatron-prm train: error: dev_dataset_path: {tmp_path / 'dev.jsonl'} does not exist (neither a file nor "
        "a preprocessed store prefix)"]
    assert not (tmp_path / "out").exists()


def test_wandb_missing_is_one_line_naming_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to import
    train = write_jsonl(tmp_path / "train.jsonl", [{"src": "q", "responses": ["a"], "labels": ["+"]}])
    code = cli.main(["train", "--tokenizer_name_or_path", MISTRAL, "--train_dataset_path", str(train),
                     "--output_dir", str(tmp_path / "out"), "--report-to", "wandb", "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "megatron-prm train: error: report_to wandb needs the package wandb, which cannot be imported "
        "(import of wandb halted; None in sys.modules); `pip install wandb` (or `pip install -e '.[wandb]'`)"]
    assert not (tmp_path / "out").exists()


def test_checkpoints_carry_the_tokenizer_training_used(tmp_path):
    """The config's tokenizer wins over the starting checkpoint's, is copied byte for byte (never the model
    weights beside it), and is named relative to the checkpoint."""
    from megatron_prm import checkpoint
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.tokenizer import resolve_tokenizer_path
    from qwen_fixtures import write_qwen2_tokenizer

    start = tmp_path / "start"  # a starting checkpoint that carries another tokenizer
    # A real HF tokenizer that already has the step tag as one token (nothing to add, so it is copied as is).
    write_qwen2_tokenizer(start / "tokenizer", extra_special=("ки",))
    (start / ".metadata").write_bytes(b"")
    shape = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
             "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 64,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (start / "model_config.json").write_text(json.dumps(shape))
    hf_dir = tmp_path / "hf"  # an HF model directory named as the tokenizer: only its tokenizer files travel
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes(resolve_tokenizer_path(MISTRAL).read_bytes())
    (hf_dir / "model.safetensors").write_bytes(b"weights")
    for tokenizer, expected in ((MISTRAL, ["tokenizer.model"]), (str(hf_dir), ["tokenizer.model"]),
                                (None, ["tokenizer.json", "tokenizer_config.json"])):
        config = build_config({"model_name_or_path": str(start), "tokenizer_name_or_path": tokenizer})
        arch = resolve_architecture(config.model, 32000, 64)
        target = tmp_path / f"iter_{len(expected)}_{tokenizer is None}_{tokenizer == MISTRAL}"
        target.mkdir()
        checkpoint._write_metadata(target, config, arch, checkpoint.TrainState())
        assert sorted(p.name for p in (target / "tokenizer").iterdir()) == expected, tokenizer
        if tokenizer:
            assert (target / "tokenizer" / "tokenizer.model").read_bytes() == resolve_tokenizer_path(MISTRAL).read_bytes()
        else:
            for name in expected:
                assert (target / "tokenizer" / name).read_bytes() == (start / "tokenizer" / name).read_bytes()
        saved = json.loads((target / "run_config.json").read_text())
        assert saved["tokenizer_name_or_path"] == "tokenizer"


def test_slurm_dry_run_without_a_model_plans_the_shipped_llama3_8b_shape(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_MODEL"))}
    env.update(DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "examples/train_llama3_8b_prm.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"world_size"'))
    assert plan["parameters_per_gpu"] == 1_004_802_048  # Llama-3-8B under TP8 (examples/configs/llama3_8b_config.json)
    assert "node 0: torchrun --nnodes 1 --nproc-per-node 8" in result.stdout
    env.pop("DRY_RUN")
    refused = subprocess.run(["bash", "examples/train_llama3_8b_prm.sh"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "set HF_MODEL" in refused.stderr


def test_a_warmup_longer_than_an_epoch_run_is_shortened_with_a_note():
    from megatron_prm.config import TrainingArguments
    from megatron_prm.train import warmup_within

    recipe = TrainingArguments(warmup_steps=10, num_train_epochs=1)
    assert warmup_within(recipe, 11) == (recipe, None)
    shortened, note = warmup_within(recipe, 4)
    assert shortened.warmup_steps == 3 and shortened.learning_rate == recipe.learning_rate
    assert note == ("warmup_steps 10 is not below the 4 training steps that num_train_epochs 1 make of this data: "
                    "warming up over 3 instead")
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be below max_steps \(4\)"):
        build_config({"warmup_steps": 10, "max_steps": 4})  # a length the user set is not shortened


@pytest.mark.parametrize("program,factory,sub,required", COMMAND_LINES,
                         ids=[f"{p} {s or ''}".strip() for p, _, s, _ in COMMAND_LINES])
def test_every_command_and_option_says_what_it_is_for(program, factory, sub, required):
    parser = factory()
    target = _subparsers(parser)[sub] if sub else parser
    assert target.description, f"{program} {sub}: no description in --help"
    silent = [a.option_strings or [a.dest] for a in target._actions if a.dest != "help" and not a.help]
    assert not silent, f"{program} {sub}: no help text for {silent}"
