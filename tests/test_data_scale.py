"""Data at cluster scale: a data file tokenized once, packing plans computed once and read by slices."""

import json

import numpy as np
import pytest

from conftest import MISTRAL, run_cli, write_jsonl
from megatron_prm.config import build_config
from megatron_prm.data import loader, store_cache
from megatron_prm.data.batching import BatchLayout
from megatron_prm.data.loader import PackedBatches, Packing
from megatron_prm.data.packing import PackingOptions, pack, pack_best_fit_decreasing
from megatron_prm.data.packing_plan import PlanCache, best_fit_plan, epoch_plan
from megatron_prm.data.pipeline import prepare_data, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.data.store import LABEL_DTYPE, TokenStore, TokenStoreWriter
from megatron_prm.data.synthetic import write_dataset


def pure_python_rows(lengths, seed, epoch, packing):
    """The rows as the trainer packed them before plans (the per-rank pure-Python build)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    rows = list(pack(((int(i), int(lengths[i])) for i in order), packing.mode, packing.options, packing.buffer_size))
    if packing.mode == "greedy_zero_padding":
        np.random.default_rng([seed, epoch, 1]).shuffle(rows)
    return rows


def run_config(data, output_dir, **overrides):
    return build_config({"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(data), "max_seq_len": 128,
                         "max_prompt_len": 64, "output_dir": str(output_dir), "device": "cpu", "seed": 7,
                         **overrides})


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("records") / "train.jsonl", 120, seed=3)


@pytest.fixture(scope="module")
def prepared(records, tmp_path_factory):
    """A run's data prepared twice in one run directory (a start and a restart), counting the work done."""
    output_dir = tmp_path_factory.mktemp("run")
    config = run_config(records, output_dir, greedy_zero_padding=True, packing_buffer_size=16, max_steps=20)
    tokenizer = RecordTokenizer(tokenize_job(config, str(records)))
    layout = BatchLayout(1, 2, 2)
    monkeypatch = pytest.MonkeyPatch()
    calls = {"tokenized": 0, "planned": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(store_cache, "preprocess", counting("tokenized", store_cache.preprocess))
    monkeypatch.setattr(loader, "epoch_plan", counting("planned", loader.epoch_plan))
    first = prepare_data(config, tokenizer, layout, 0, show_progress=False)
    after_start = dict(calls)
    files = {p: p.stat().st_mtime_ns for p in (output_dir / "data_cache").rglob("*") if p.is_file()}
    second = prepare_data(config, tokenizer, layout, 1, show_progress=False)
    monkeypatch.undo()
    yield config, first, second, after_start, calls, files


@pytest.mark.parametrize("mode", ["zero_padding", "greedy_zero_padding"])
def test_vectorised_plan_equals_the_pure_python_packing(records, prepared, mode):
    long_tailed = np.minimum(np.random.default_rng(0).lognormal(5.0, 1.0, 3000).astype(np.int64) + 1, 1000)
    store_lengths = prepared[1].train_source.lengths
    for lengths in (long_tailed, store_lengths):
        for options in (PackingOptions(1024), PackingOptions(1030, sample_multiple=4, row_multiple=8),
                        PackingOptions(128)):
            if lengths.max() > options.usable_capacity:
                continue
            for buffer_size in (1, 37, 1000):
                packing = Packing(mode, options, buffer_size)
                for epoch in (0, 1):
                    plan = epoch_plan(lengths, 5, epoch, mode, options, buffer_size)
                    assert plan[0:len(plan)] == pure_python_rows(lengths, 5, epoch, packing)


def test_evaluation_rows_equal_the_pure_python_best_fit(prepared):
    long_tailed = np.minimum(np.random.default_rng(1).lognormal(5.0, 1.0, 2000).astype(np.int64) + 1, 1000)
    for lengths, options in ((long_tailed, PackingOptions(1024, row_multiple=8)),
                             (prepared[1].train_source.lengths, PackingOptions(128))):
        plan = best_fit_plan(lengths, options)
        assert plan[0:len(plan)] == pack_best_fit_decreasing([(i, int(n)) for i, n in enumerate(lengths)], options)


def test_restart_tokenizes_and_plans_nothing(prepared):
    config, first, second, after_start, calls, files = prepared
    assert after_start["tokenized"] == 1 and after_start["planned"] >= 1
    assert calls == after_start  # the restart found the store and every plan
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert isinstance(first.train_source, TokenStore) and first.train_source.prefix == second.train_source.prefix
    assert first.reports["train"]["records"] == 120
    plans = list(first.train_source.prefix.parent.glob("*.plans/plan-*.npy"))
    assert len(plans) == after_start["planned"]  # one file per epoch the 20 steps reach


def test_cached_plan_gives_the_same_rows_for_one_and_two_data_parallel_ranks(prepared, tmp_path):
    config, first, second, *_ = prepared
    source = first.train_source
    packing = first.packing
    plans = PlanCache.beside(source.prefix, tmp_path)
    one = PackedBatches(source, BatchLayout(1, 4, 1), 0, 7, packing, plans)
    two = [first.train, second.train]  # ranks 0 and 1 of data parallel 2, from the cached plans
    uncached = PackedBatches(source, BatchLayout(1, 4, 1), 0, 7, packing)
    steps = one.steps_in_epoch(0) + one.steps_in_epoch(1) + 1  # into the third epoch
    for _ in range(steps):
        rows = [[s.record_index for s in row] for row in one.next_microbatches()]
        assert rows == [[s.record_index for s in row] for row in uncached.next_microbatches()]
        shares = [[[s.record_index for s in row] for row in rank.next_microbatches()] for rank in two]
        assert shares[0] + shares[1] == rows
    assert one.epoch == 2
    for epoch in range(2):
        assert one._units(epoch)[0:len(one._units(epoch))] == pure_python_rows(source.lengths, 7, epoch, packing)
    resumed = PackedBatches(source, BatchLayout(1, 4, 1), 0, 7, packing, plans)
    resumed.load_state_dict(one.state_dict())
    assert [[s.record_index for s in r] for r in resumed.next_microbatches()] == \
        [[s.record_index for s in r] for r in one.next_microbatches()]


def write_initial_checkpoint(config, directory):
    """The randomly initialised model of ``config`` as a checkpoint (as tests/init_checkpoint.py, in this process)."""
    from megatron_prm.checkpoint import save_model_checkpoint
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    tokenizer = RecordTokenizer(tokenize_job(config, config.data.train_dataset_path))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len)
    init_runtime("cpu", config.training.seed, ParallelLayout())
    try:
        chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len,
                                    ModelBuildOptions(use_cpu_initialization=True))
        save_model_checkpoint(chunks, directory, 0, config, arch)
    finally:
        shutdown()


@pytest.mark.one_leg
def test_scoring_on_two_data_parallel_ranks_writes_the_same_bytes(tmp_path):
    rows = [json.loads(line) for line in write_dataset(tmp_path / "src.jsonl", 40, seed=6).read_text().splitlines()]
    rows[3].pop("labels")  # scoring needs no labels
    rows[7].update(responses=["a very long step " * 40], labels=["+"])  # longer than max_seq_len: dropped, written unscored
    data = write_jsonl(tmp_path / "records.jsonl", rows)
    config = {"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(data), "num_hidden_layers": 2,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "max_seq_len": 128,
              "max_prompt_len": 64, "device": "cpu", "bf16": False, "seed": 5}
    write_initial_checkpoint(build_config(config), tmp_path / "init")
    outputs = {}
    for nproc in (1, 2):
        outputs[nproc] = tmp_path / f"scores{nproc}.jsonl"
        run_cli(["score", "--checkpoint", str(tmp_path / "init"), "--data", str(data), "--output",
                 str(outputs[nproc]), "--device", "cpu"], nproc=nproc)
        assert not outputs[nproc].with_name(outputs[nproc].name + ".parts").exists()  # the parts are merged away
    assert outputs[1].read_bytes() == outputs[2].read_bytes()
    scored = [json.loads(line) for line in outputs[1].read_text().splitlines()]
    assert [r["index"] for r in scored] == list(range(40))
    assert scored[7]["step_scores"] == [] and all(len(r["step_scores"]) == r["num_steps"] for r in scored[8:])


def test_every_rank_gets_the_working_ranks_result_or_its_error():
    from conftest import spawn_ranks

    from one_rank_failure import fail_on_rank_zero

    message = "data.jsonl: record 3 (line 4), field 'labels': is missing"
    decided = "decided on rank 0"
    assert spawn_ranks(fail_on_rank_zero, 2) == [(0, decided, [0], message), (1, decided, [], message)]


def test_a_store_written_from_arrays_equals_one_written_sample_by_sample(prepared, tmp_path):
    source = prepared[1].train_source
    samples = [source[i] for i in range(len(source))]
    one_by_one, at_once = TokenStoreWriter(tmp_path / "a", 32000), TokenStoreWriter(tmp_path / "b", 32000)
    one_by_one.add_all(samples)
    labels = np.zeros(sum(len(s.label_positions) for s in samples), dtype=LABEL_DTYPE)
    labels["position"] = np.concatenate([s.label_positions for s in samples])
    labels["value"] = np.concatenate([s.label_values for s in samples])
    labels["step"] = np.concatenate([s.step_ids for s in samples])
    half = len(samples) // 2
    label_ends = np.cumsum([0] + [len(s.label_positions) for s in samples])
    for start, stop in ((0, half), (half, len(samples))):  # two calls: the second continues the offsets
        part = samples[start:stop]
        at_once.add_arrays(np.concatenate([s.input_ids for s in part]), labels[label_ends[start]:label_ends[stop]],
                           np.array([len(s) for s in part]), np.array([len(s.label_positions) for s in part]),
                           np.array([s.record_index for s in part]))
    for writer in (one_by_one, at_once):
        writer.finish(source.identity, {})
    for suffix in (".tokens.bin", ".labels.bin", ".offsets.npy", ".records.npy", ".meta.json"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
