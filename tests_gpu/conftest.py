"""GPU test session: refuses to run (exit status 3) where no CUDA GPU is present, so that `make test-gpu`
never reports success without having run; shared helpers for the GPU tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NO_GPU_EXIT_STATUS = 3


def pytest_sessionstart(session):
    if not torch.cuda.is_available():
        pytest.exit("no CUDA GPU is present (torch.cuda.is_available() is False): the GPU tests did not run",
                    returncode=NO_GPU_EXIT_STATUS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_module(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m megatron_prm ARGS`` (torchrun for nproc > 1) in fresh processes; a failure fails the test."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port())]
    command = [*launcher, "-m", "megatron_prm", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_log(output_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [event for event in events if event["kind"] == "train"]


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic PRM records and a SentencePiece tokenizer trained on them in which the placeholder and
    the reward tokens are single pieces (no tokenizer download or extra package needed on a GPU machine)."""
    import sentencepiece

    from megatron_prm.data.synthetic import write_dataset

    folder = tmp_path_factory.mktemp("gpu_data")
    corpus = write_dataset(folder / "corpus.jsonl", 200, seed=1)
    lines = []
    for record in map(json.loads, corpus.read_text().splitlines()):
        lines += [record["src"], *record["responses"]]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=300,
        user_defined_symbols=["ки", "+", "-"], add_dummy_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return {"tokenizer": folder / "tokenizer.model", "train": write_dataset(folder / "train.jsonl", 16, seed=3),
            "dev": write_dataset(folder / "dev.jsonl", 8, seed=4), "folder": folder}
