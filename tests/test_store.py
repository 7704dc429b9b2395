"""Preprocessed stores: same batches as the JSONL, refused when built differently, never half-written."""

import json

import numpy as np
import pytest
import torch

from conftest import MISTRAL, write_jsonl
from megatron_prm.config import build_config
from megatron_prm.data.batching import BatchLayout, collate
from megatron_prm.data.loader import IndexedBatches
from megatron_prm.data.pipeline import open_source, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer, preprocess
from megatron_prm.data.records import RecordError
from megatron_prm.data.store import StoreError, TokenStore, store_prefix
from megatron_prm.data.synthetic import write_dataset


def config_for(path, **overrides):
    return build_config({"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(path), "max_seq_len": 96,
                         "max_prompt_len": 48, **overrides})


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("records") / "train.jsonl", 150, seed=5)


@pytest.fixture(scope="module")
def store(records, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("store") / "train"
    preprocess(tokenize_job(config_for(records), str(records)), prefix, workers=2, chunk_size=32, show_progress=False)
    return prefix


def test_store_and_jsonl_give_identical_batches(records, store):
    config = config_for(records)
    tokenizer = RecordTokenizer(tokenize_job(config, str(records)))
    from_jsonl, _ = open_source(config, str(records), tokenizer, show_progress=False)
    from_store, report = open_source(config, str(store), tokenizer, show_progress=False)
    assert isinstance(from_store, TokenStore) and report["store"] == str(store)
    assert len(from_store) == len(from_jsonl) == 150
    np.testing.assert_array_equal(from_store.lengths, from_jsonl.lengths)
    layout = BatchLayout(micro_batch_size=4, num_microbatches=2, data_parallel_size=2)
    for rank in (0, 1):
        a = IndexedBatches(from_jsonl, layout, rank, seed=11)
        b = IndexedBatches(from_store, layout, rank, seed=11)
        for _ in range(a.steps_in_epoch(0) + 3):  # into the second epoch
            for mb_a, mb_b in zip(a.next_microbatches(), b.next_microbatches()):
                x, y = collate(mb_a, pad_id=2), collate(mb_b, pad_id=2)
                for name in ("tokens", "position_ids", "reward_index", "label_values", "record_ids", "step_ids"):
                    assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_worker_count_does_not_change_the_store(records, store, tmp_path):
    single = tmp_path / "single"
    preprocess(tokenize_job(config_for(records), str(records)), single, workers=1, show_progress=False)
    for suffix in (".tokens.bin", ".labels.bin", ".offsets.npy", ".records.npy"):
        assert (tmp_path / f"single{suffix}").read_bytes() == store.with_name(store.name + suffix).read_bytes()
    meta = json.loads(store.with_name("train.meta.json").read_text())
    assert meta["identity"]["placeholder_id"] == 12902 and meta["identity"]["reward_ids"] == [648, 387]
    assert meta["samples"] == 150 and meta["report"]["records"] == 150 and meta["token_dtype"] == "uint16"


@pytest.mark.parametrize("overrides, difference", [
    ({"tokenizer_name_or_path": "mistral-common:mistral_instruct_tokenizer_240323.model.v3"}, "tokenizer_fingerprint"),
    ({"reward_tokens": "+,A"}, "reward_tokens"),
    ({"max_seq_len": 128}, "max_seq_len: store has 96, run asks for 128"),
    ({"process_reward": False}, "process_reward"),
])
def test_store_built_differently_is_refused(records, store, overrides, difference):
    config = config_for(records, **overrides)
    tokenizer = RecordTokenizer(tokenize_job(config, str(records)))
    with pytest.raises(StoreError, match=difference):
        open_source(config, str(store), tokenizer, show_progress=False)


def test_failed_preprocess_leaves_no_store(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"src": "q", "responses": ["a"], "labels": ["+"]}] * 40
                       + [{"src": "q", "responses": ["a"], "labels": []}])
    with pytest.raises(RecordError, match="record 40"):
        preprocess(tokenize_job(config_for(path), str(path)), tmp_path / "out", workers=2, chunk_size=8,
                   show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    assert store_prefix(tmp_path / "out") is None


def test_store_with_a_missing_part_is_refused(store, tmp_path):
    import shutil

    for path in store.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "train.labels.bin").unlink()
    with pytest.raises(StoreError, match="labels.bin is missing"):
        TokenStore(tmp_path / "train")
    (tmp_path / "train.labels.bin").write_bytes(b"")
    with pytest.raises(StoreError, match="does not match the offsets"):
        TokenStore(tmp_path / "train")
