"""Shared fixtures: the real Mistral tokenizer, the shared data folder, and multi-process launching."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MISTRAL = "mistral-common:tokenizer.model.v1"


def pytest_configure(config):
    """Megatron-Core's unactionable warnings, from the one list the command line filters too."""
    from megatron_prm import megatron_compat

    for message, category, *module in megatron_compat.UNACTIONABLE_WARNINGS + megatron_compat.CPU_MODE_WARNINGS:
        config.addinivalue_line("filterwarnings", ":".join(["ignore", message, category.__name__, *module]))
    megatron_compat.filter_unactionable_warnings(cpu_mode=True)  # and the log-record filters
    megatron_compat.import_megatron_core()


# The files with the longest end-to-end runs are collected first. pytest-xdist (`--dist loadfile`) hands whole
# files to its workers in collection order; a long file handed out last would leave the other worker idle
# while it runs (longest-processing-time-first scheduling).
LONGEST_FIRST = ("test_parallel.py", "test_checkpoint.py", "test_context_parallel.py", "test_convert_hf.py",
                 "test_qwen_prm.py", "test_resume.py", "test_cluster.py", "test_checkpoint_trust.py",
                 "test_moe_training.py", "test_convert_moe.py", "test_quickstart.py", "test_benchmarks.py",
                 "test_hub_start.py", "test_distributed.py", "test_moe_load_balancing.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from megatron_prm.tokenizer import load_tokenizer

    return load_tokenizer(MISTRAL)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(target, world_size: int, timeout: int = 120) -> list:
    """Run ``target(rank, port, results)`` in ``world_size`` spawned processes (a gloo group of their own,
    at ``port``); what each put on ``results``, sorted."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=target, args=(rank, port, results)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    return sorted(results.get(timeout=5) for _ in range(world_size))


def python_command(args: list[str], nproc: int = 1) -> list[str]:
    """``python ARGS``, under torchrun with ``nproc`` processes when that is more than one."""
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


def run_script(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """A helper script of tests/ (``args``: its path and arguments) in fresh processes; a failure fails the test."""
    result = subprocess.run(python_command(args, nproc), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``megatron-prm ARGS`` in fresh processes (torchrun for nproc > 1); with ``check``, a non-zero
    exit fails the test."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = python_command(["-m", "megatron_prm", *args], nproc)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def read_log(output_dir: Path, kind: str) -> list[dict]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_model():
    """A 2-layer, 64-wide PRM model (local spec, GQA, reward ids 7 and 200) in a one-process CPU runtime."""
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import Architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    init_runtime("cpu", seed=0, layout=ParallelLayout())
    arch = Architecture(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
                        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)
    yield build_model_chunks(arch, (7, 200), 256, ModelBuildOptions(use_cpu_initialization=True))[0]
    shutdown()
