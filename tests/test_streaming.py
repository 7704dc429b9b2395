"""lazy=True: disjoint per-rank shares, a seeded shuffle buffer, DataLoader workers, a training run."""

import json

import pytest

from conftest import MISTRAL, read_log, run_cli
from megatron_prm.config import build_config
from megatron_prm.data.pipeline import tokenize_job
from megatron_prm.data.streaming import SampleStream, StreamShard, StreamingSamples
from megatron_prm.data.synthetic import write_dataset

RECORDS = 37


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stream") / "train.jsonl", RECORDS, seed=9)


def job(path):
    return tokenize_job(build_config({"tokenizer_name_or_path": MISTRAL, "max_seq_len": 96, "max_prompt_len": 48}),
                        str(path))


def first_epoch(stream, count):
    return [next(stream).record_index for _ in range(count)]


def test_ranks_and_workers_read_disjoint_shares_covering_every_record(records):
    seen = []
    for rank in range(2):
        shard = StreamShard(rank, 2, seed=3, shuffle_buffer_size=4)
        # With 2 DataLoader workers this rank's records are split again between them.
        share = [i for i in range(RECORDS) if i % 4 in (2 * rank, 2 * rank + 1)]
        indices = first_epoch(SampleStream(job(records), shard, num_workers=2), len(share))
        assert sorted(indices) == share
        seen += indices
    assert sorted(seen) == list(range(RECORDS))


def test_shuffle_buffer_is_seeded_and_epochs_differ(records):
    def order(seed):
        return first_epoch(SampleStream(job(records), StreamShard(0, 1, seed, shuffle_buffer_size=8), 0), 2 * RECORDS)

    a, b = order(1), order(1)
    assert a == b and a != order(2)
    assert sorted(a[:RECORDS]) == sorted(a[RECORDS:]) == list(range(RECORDS))
    assert a[:RECORDS] != a[RECORDS:] and a[:RECORDS] != list(range(RECORDS))


def test_json_array_is_refused(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"src": "q", "responses": ["a"], "labels": ["+"]}]))
    with pytest.raises(ValueError, match="streams JSONL"):
        StreamingSamples(job(path), StreamShard(0, 1, 0, 4))


def test_lazy_training_on_two_data_parallel_ranks(tmp_path, records):
    config = {
        "tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(records), "dev_dataset_path": None,
        "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "max_seq_len": 96, "max_prompt_len": 48, "device": "cpu", "bf16": False, "lazy": True,
        "dataloader_num_workers": 1, "shuffle_buffer_size": 5, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 12, "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-3,
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    run_cli(["train", str(tmp_path / "run.json")], nproc=2)
    steps = read_log(tmp_path / "out", "train")
    assert [s["step"] for s in steps] == list(range(1, 13))  # more steps than one pass over the data
    assert all(s["labelled_steps"] > 0 and s["loss"] > 0 for s in steps)
