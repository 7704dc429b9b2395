"""The README quick start, run as written: its marked block, in order, in a temporary directory, on CPU with
``GPUS=1``. Only the model and the data change: ``hf``, ``curl`` and ``sbatch`` are offline stand-ins
(tests/quickstart_stub.py) that write a tiny Llama model and a 440-record sample in the real downloads'
layout. Then the small recipe that the block names for a CPU or a small machine trains from the same
imported checkpoint."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.one_leg  # version-independent: the commands it runs are tested in both legs

START, END = "<!-- quickstart:start -->", "<!-- quickstart:end -->"
def quickstart_script() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    for name in ("tools", "examples"):  # the quick start runs from a checkout
        (work / name).symlink_to(REPO / name)
    stubs = work / ".stubs"
    stubs.mkdir()
    for command in ("hf", "curl", "sbatch"):
        wrapper = stubs / command
        wrapper.write_text(f'#!/bin/bash\nexec "{sys.executable}" "{REPO}/tests/quickstart_stub.py" {command} "$@"\n')
        wrapper.chmod(0o755)
    script, count = re.subn(r"^GPUS=\S+", "GPUS=1", quickstart_script(), flags=re.M)
    assert count == 1, "the quick start no longer sets GPUS at its top"
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "QUICKSTART_SBATCH_LOG": str(work / ".sbatch.log")}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"the quick start failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return work, result, env


def test_the_quick_start_runs_in_order(quickstart):
    work, result, _ = quickstart
    out = result.stdout
    # train: one progress line per logging step, the data and run directory lines, no config dump
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/1"], out
    assert all(re.search(r"\| MFU n/a \| peak rss [\d.]+ GiB \| ETA \d+s$", line) for line in steps), steps
    # the recipe's 10 warm-up steps outlast the sample's one step of 8 packed rows: shortened, said once
    assert "note: warmup_steps 10 is not below the 1 training step that num_train_epochs 1 make of this data: " \
           "warming up over 0 instead" in out
    assert "tensor 1 x pipeline 1 (virtual 1) x data 1; global batch 8; 1 steps" in out
    assert "run directory runs/prm" in out and "[training]" not in out and "learning_rate" not in out
    # SLURM: the dry run printed the plan and the torchrun line; the submission named the script
    assert "node 0: torchrun --nnodes 1 --nproc-per-node 8" in out
    submitted = json.loads((work / ".sbatch.log").read_text())
    assert submitted[-1] == "examples/train_llama3_8b_prm.sh" and "--nodes" in submitted
    # evaluate on ProcessBench, scored from the checkpoint; the exported model scores the same in fp32
    evaluated = next(json.loads(line) for line in out.splitlines() if line.startswith('{"benchmark"'))
    assert evaluated["benchmark"] == "processbench" and 0.0 <= evaluated["average_f1"] <= 1.0
    assert result.stderr.count("scoring 40 records in float32") == 2
    # off a terminal, conversions write no progress bars (plain lines come every 30 s, and these take less)
    assert "import:" not in result.stderr and "export:" not in result.stderr
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith('{"output"') and '"records"' in line]
    assert [s["dtype"] for s in summaries] == ["float32", "float32"]
    trained = [json.loads(line) for line in (work / "runs/prm/pb_gsm8k_scores.jsonl").read_text().splitlines()]
    exported = [json.loads(line) for line in (work / "models/prm/pb_gsm8k_scores.jsonl").read_text().splitlines()]
    assert len(trained) == len(exported) == 40
    worst = max(abs(a - b) for r, e in zip(trained, exported) for a, b in zip(r["step_scores"], e["step_scores"]))
    assert worst < 1e-5


def test_the_run_directory_is_self_describing(quickstart):
    work, _, env = quickstart
    run = work / "runs" / "prm"
    config = json.loads((run / "config.json").read_text())
    assert config["train_dataset_path"] == "data/train.jsonl" and config["max_prompt_len"] == 2048
    assert config["tensor_parallel_degree"] == 1 and config["bf16"] is True
    (launch,) = [json.loads(line) for line in (run / "provenance.jsonl").read_text().splitlines()]
    # The installed distributions' versions: megatron.core.__version__ would not do, because 0.19 appends the
    # short SHA of whatever git checkout holds site-packages (a venv inside this repository gets ours).
    assert launch["versions"]["torch"] == importlib.metadata.version("torch")
    assert launch["versions"]["megatron-core"] == importlib.metadata.version("megatron-core")
    import megatron.core

    assert megatron.core.__version__.startswith(launch["versions"]["megatron-core"])
    assert set(launch["versions"]) >= {"megatron-prm", "transformer-engine", "python"}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert launch["git_sha"] == (git.stdout.strip() if git.returncode == 0 else None)
    assert launch["command"][-8:] == ["--model-name-or-path", "checkpoints/base", "--tensor-parallel-degree", "1",
                                      "--train-dataset-path", "data/train.jsonl", "--output-dir", "runs/prm"]
    assert launch["config"] == config
    # The checkpoint carries the tokenizer and names it relative to itself; scoring works from elsewhere.
    checkpoint = run / (run / "latest").read_text().strip()
    assert json.loads((checkpoint / "run_config.json").read_text())["tokenizer_name_or_path"] == "tokenizer"
    assert (checkpoint / "tokenizer" / "tokenizer.json").read_bytes() == (
        work / "checkpoints/base/tokenizer/tokenizer.json").read_bytes()
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    scored = subprocess.run(["megatron-prm", "score", "--checkpoint", str(run), "--data",
                             str(work / "data/pb_gsm8k.jsonl"), "--output", "scores.jsonl", "--bf16", "true"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "scoring 40 records in bfloat16" in scored.stderr and json.loads(
        scored.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"


def test_the_small_recipe_trains_on_one_cpu_process(quickstart):
    """The block's line for a CPU or a small machine, with its train command, from the imported checkpoint."""
    work, _, env = quickstart
    script = quickstart_script()
    (small,) = re.findall(r"^# (MODEL=\S+ CONFIG=\S+ GPUS=\d+)$", script, flags=re.M)
    train = re.search(r"^torchrun .*?[^\\]\n", script, flags=re.M | re.S).group(0)
    command = small.replace(" ", "\n") + "\n" + train.replace("runs/prm", "runs/prm-small")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    steps = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"], result.stdout
    assert "on cpu: tensor 1 x pipeline 1" in result.stdout
    config = json.loads((work / "runs/prm-small/config.json").read_text())
    assert config["bf16"] is False and config["max_seq_len"] == 1024
    assert (work / "runs/prm-small/latest").read_text().strip() == "iter_0000020"
