"""Experiment trackers: TensorBoard and Weights & Biases (offline, no network); a resumed run continues
the same tracker run."""

from __future__ import annotations

import json

import pytest

from conftest import MISTRAL, run_cli
from megatron_prm.data.synthetic import write_dataset


@pytest.mark.one_leg
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = write_dataset(tmp_path / "train.jsonl", 32, seed=1)
    run = tmp_path / "run"
    common = ["train", "--tokenizer_name_or_path", MISTRAL, "--train_dataset_path", str(train), "--output_dir",
              str(run), "--device", "cpu", "--bf16", "false", "--num_hidden_layers", "1", "--hidden_size", "32",
              "--intermediate_size", "64", "--num_attention_heads", "2", "--max_seq_len", "128",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
              "--logging_steps", "1", "--save_steps", "2", "--report-to", "tensorboard,wandb", "--run-name", "prm-test"]
    run_cli([*common, "--max_steps", "2"])
    run_id = json.loads((run / "trackers.json").read_text())["wandb_run_id"]
    run_cli([*common, "--max_steps", "4", "--resume_from_checkpoint", "latest"])
    assert json.loads((run / "trackers.json").read_text())["wandb_run_id"] == run_id

    # Both launches logged into the W&B run of that id (offline: a run directory each, synced as one run).
    launches = sorted((run / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and all(p.name.endswith(f"-{run_id}") for p in launches)
    for launch in launches:
        records = (launch / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in records and b"train/mfu" not in records  # None (CPU) is not a number to log
        assert b"prm-test" in records
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard wrote no events"
