"""lazy=True: disjoint per-rank shares, a seeded shuffle buffer, DataLoader workers, a training run."""

import json

import pytest

from conftest import MISTRAL, read_log, run_cli
from megatron_prm.config import build_config
from megatron_prm.data.pipeline import tokenize_job
from megatron_prm.data.streaming import SampleStream, StreamShard, StreamingSamples
from megatron_prm.data.records import RecordError
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


def reader_epoch(path, reader, readers, shuffle_buffer_size=4):
    """One reader's first epoch: (record index in its range, token ids) in the order handed out."""
    share = []
    for _, position, sample in StreamingSamples(job(path), StreamShard(reader, readers, 3, shuffle_buffer_size)):
        if position.epoch > 0:
            return share
        share.append((sample.record_index, tuple(sample.input_ids)))


def test_readers_take_consecutive_byte_ranges_covering_every_record(records):
    in_file_order = [ids for _, ids in sorted(reader_epoch(records, 0, 1))]
    assert len(in_file_order) == RECORDS
    shares = [reader_epoch(records, reader, 4) for reader in range(4)]
    assert [ids for share in shares for _, ids in sorted(share)] == in_file_order  # disjoint, in file order
    assert all(len(share) > 5 for share in shares)
    # Rank 0 of 2 with 2 DataLoader workers is readers 0 and 1 of 4, taken in turn.
    stream = SampleStream(job(records), StreamShard(0, 2, seed=3, shuffle_buffer_size=4), num_workers=2)
    turns = min(len(shares[0]), len(shares[1]))
    taken = [tuple(next(stream).input_ids) for _ in range(2 * turns)]
    assert taken[0::2] == [ids for _, ids in shares[0][:turns]] and taken[1::2] == [ids for _, ids in shares[1][:turns]]


def test_shuffle_buffer_is_seeded_and_epochs_differ(records):
    def order(seed):
        return first_epoch(SampleStream(job(records), StreamShard(0, 1, seed, shuffle_buffer_size=8), 0), 2 * RECORDS)

    a, b = order(1), order(1)
    assert a == b and a != order(2)
    assert sorted(a[:RECORDS]) == sorted(a[RECORDS:]) == list(range(RECORDS))
    assert a[:RECORDS] != a[RECORDS:] and a[:RECORDS] != list(range(RECORDS))


def test_a_bad_record_read_by_a_worker_process_is_reported_as_itself(tmp_path, records):
    """A malformed record met in a DataLoader worker reaches the training process as its RecordError (file,
    record, line, field), not as torch's RuntimeError quoting the worker's traceback."""
    lines = records.read_text().splitlines()
    lines[5] = json.dumps({"src": "q", "responses": 5})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    stream = SampleStream(job(bad), StreamShard(0, 1, seed=3, shuffle_buffer_size=4), num_workers=1)
    with pytest.raises(RecordError) as caught:
        for _ in range(RECORDS):
            next(stream)
    assert str(caught.value) == (f"{bad}: record 5 (line 6), field 'responses': must be a non-empty list of step "
                                 "strings")


def test_json_array_is_refused(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"src": "q", "responses": ["a"], "labels": ["+"]}]))
    with pytest.raises(ValueError, match="streams JSONL"):
        StreamingSamples(job(path), StreamShard(0, 1, 0, 4))


@pytest.mark.one_leg
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


def fixed_width_file(path, good, width=400):
    """Records padded to ``width`` bytes a line; where ``good(i)`` is false, line i is garbage of the same
    width (not UTF-8, not JSON), which any reader that parsed it would report."""
    lines = []
    for i, record in enumerate(json.loads(line) for line in open(write_dataset(path.with_suffix(".src"), 30, seed=4))):
        text = json.dumps(record).encode()
        assert len(text) < width
        lines.append(text.ljust(width - 1) + b"\n" if good(i) else b"\xff" * (width - 1) + b"\n")
    path.write_bytes(b"".join(lines))
    return path


def test_a_reader_reads_only_its_byte_range(tmp_path, monkeypatch):
    from megatron_prm.data import streaming

    # 30 lines of 400 bytes, 3 readers: reader 1 owns the lines starting in [4000, 8000), lines 10-19.
    path = fixed_width_file(tmp_path / "train.jsonl", lambda i: 10 <= i < 20)
    visited = []

    class Watched:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            visited.append(offset)
            return self.handle.seek(offset)

        def readline(self):
            data = self.handle.readline()
            visited.append(self.handle.tell())
            return data

    monkeypatch.setattr(streaming, "open_data", lambda p: Watched(open(p, "rb")))
    share = reader_epoch(path, 1, 3)
    assert len(share) == 10  # every line of its range, none of the garbage around it
    assert min(visited) == 3999 and max(visited) == 8000  # from the newline before its range to its last line's end


def test_an_error_in_a_later_range_names_the_record_and_line_in_the_file(tmp_path):
    path = fixed_width_file(tmp_path / "train.jsonl", lambda i: True)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[14] = b'{"src": "q", "labels": ["+"]}'.ljust(399) + b"\n"  # reader 1 of 3, 5th of its range
    path.write_bytes(b"".join(lines))
    with pytest.raises(RecordError, match=r"record 14 \(line 15\), field 'responses': is missing"):
        reader_epoch(path, 1, 3)
