"""One code base for Megatron-Core 0.16.1 through 0.19.x: internals only in megatron_compat.py, CUDA
streams stood in for in CPU mode, and no warnings reaching the user from a training run."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

from conftest import MISTRAL, REPO, free_port, read_log

PACKAGE = REPO / "megatron_prm"


def test_megatron_internals_are_used_in_megatron_compat_only():
    """No other module reads an underscored attribute of another object or imports an underscored name."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "megatron_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and re.fullmatch(r"_[A-Za-z]\w*", node.attr) and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_")]
    assert not offenders, offenders


def test_cpu_mode_stands_in_for_cuda_streams_and_events():
    import torch

    from megatron_prm import cpu_mode

    cpu_mode.enable()
    stream = torch.cuda.current_stream()
    event = torch.cuda.Event()
    event.record(stream)
    stream.wait_event(event)
    stream.wait_stream(torch.cuda.default_stream())
    torch.cuda.Stream().synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        assert torch.ones(2, device="cuda").sum().item() == 2  # the redirection still applies inside
    assert stream.query() and event.query() and stream.record_event() is not None


def test_training_prints_no_warnings(tmp_path):
    """Two data-parallel CPU ranks with the distributed optimizer, evaluation and a checkpoint, then scoring
    from that checkpoint, with every warning category shown (PYTHONWARNINGS=default): Megatron-Core's
    unactionable warnings are filtered, and none of this package's own may appear."""
    from megatron_prm.data.synthetic import write_dataset

    write_dataset(tmp_path / "train.jsonl", 16, seed=1)
    write_dataset(tmp_path / "dev.jsonl", 4, seed=2)
    config = {"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(tmp_path / "train.jsonl"),
              "dev_dataset_path": str(tmp_path / "dev.jsonl"), "num_hidden_layers": 2, "hidden_size": 32,
              "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000,
              "max_seq_len": 128, "max_prompt_len": 64, "device": "cpu", "bf16": False, "sharding": "stage1",
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2, "logging_steps": 1,
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "megatron_prm", "train", str(tmp_path / "run.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [event["step"] for event in read_log(tmp_path / "run", "train")] == [1, 2]
    scored = subprocess.run(  # loading the checkpoint back
        [sys.executable, "-m", "megatron_prm", "score", "--checkpoint", str(tmp_path / "run"),
         "--data", str(tmp_path / "dev.jsonl"), "--output", str(tmp_path / "scores.jsonl")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-4000:]
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 4
    noise = [line for line in (result.stderr + scored.stderr).splitlines()
             if re.search(r"warn|deprecat|experimental|not installed", line, re.IGNORECASE)]
    assert not noise, "\n".join(noise)


def test_megatron_imports_without_compiling_and_compiles_each_kernel_at_its_first_call():
    """Importing Megatron-Core leaves TorchDynamo unimported and torch.compile as it was; a deferred
    function (and a method) is compiled once, at its first call, with the options it was decorated with."""
    code = ("import sys, torch\nfrom megatron_prm import megatron_compat\ncompile_before = torch.compile\n"
            "megatron_compat.import_megatron_core()\n"
            "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules), "
            "torch.compile is compile_before, bias_gelu.__wrapped__.__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["[]", "True", "megatron.core.fusions.fused_bias_gelu"], result.stderr
    # A command that needs no model starts without Megatron-Core at all.
    code = ("import sys\nfrom megatron_prm.cli import main\n"
            "print(main(['check-checkpoint', '/nonexistent']), 'megatron.core' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr

    from megatron_prm.megatron_compat import deferred_compile

    compiled = []

    def compile_now(function, **options):
        compiled.append((function.__name__, options))
        return lambda *args: ("compiled", function(*args))

    deferred = deferred_compile(compile_now)

    @deferred
    def double(x):
        return 2 * x

    class Scale:
        factor = 3

        @deferred(mode="max-autotune")
        def apply(self, x):
            return self.factor * x

    assert compiled == [] and double.__name__ == "double"
    assert double(2) == double(2) == ("compiled", 4)
    assert Scale().apply(2) == ("compiled", 6)
    assert compiled == [("double", {}), ("apply", {"mode": "max-autotune"})]
