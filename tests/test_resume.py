"""Exact resume: the data position (by samples, across layouts), a seeking stream, stage1 Adam state,
SIGTERM/SIGUSR1 save-and-stop with `auto` resume, and a seeded kill-at-random loop."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest

from conftest import MISTRAL, REPO, free_port, read_log
from megatron_prm.config import build_config
from megatron_prm.data.batching import BatchLayout
from megatron_prm.data.loader import IndexedBatches, PackedBatches, Packing, StreamedBatches
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.pipeline import tokenize_job
from megatron_prm.data.samples import Sample
from megatron_prm.data.store import InMemorySamples
from megatron_prm.data.streaming import SampleStream, StreamShard
from megatron_prm.data.synthetic import write_dataset


def sample(index: int, length: int) -> Sample:
    ids = np.arange(length, dtype=np.int32)
    return Sample(ids, np.array([length - 1], np.int32), np.array([1.0], np.float32), np.array([0], np.int32), index)


def ids(groups) -> list[int]:
    return [s.record_index for group in groups for s in group]


def take_steps(ranks, steps: int) -> list[int]:
    """Sample ids of ``steps`` global batches read by the data-parallel ranks together."""
    seen = []
    for _ in range(steps):
        for rank in ranks:
            seen += ids(rank.next_microbatches())
    return seen


def resumed(make, state, data_parallel_size):
    ranks = [make(rank, data_parallel_size) for rank in range(data_parallel_size)]
    for rank in ranks:
        rank.load_state_dict(state)
    return ranks


@pytest.mark.parametrize("packed", [False, True])
def test_resume_under_another_data_parallel_size_and_global_batch_sees_every_sample_once(packed):
    """DP1 (global batch 8) for 3 steps, then DP2 with global batch 12, then DP4 with 8: the epoch's
    samples are each trained on exactly once, in the uninterrupted run's order."""
    rng = np.random.default_rng(0)
    source = InMemorySamples([sample(i, int(n)) for i, n in enumerate(rng.integers(8, 40, size=203))])
    packing = Packing("greedy_zero_padding", PackingOptions(64), buffer_size=40)

    def maker(micro, accumulation):
        def make(rank, dp):
            layout = BatchLayout(1 if packed else micro, accumulation, dp)
            if packed:
                return PackedBatches(source, layout, rank, seed=5, packing=packing)
            return IndexedBatches(source, layout, rank, seed=5)
        return make

    units = maker(2, 4)(0, 1)._units(0)  # the epoch's samples, or its packed rows, in order
    epoch0 = [int(i) for unit in units for i in (unit if packed else [unit])]
    first = maker(2, 4)(0, 1)
    seen = take_steps([first], 3)
    ranks = resumed(maker(3, 2), first.state_dict(), 2)
    seen += take_steps(ranks, 4)
    ranks = resumed(maker(1, 2), ranks[0].state_dict(), 4)
    while not ranks[0].epoch_ended:
        seen += take_steps(ranks, 1)
    assert len(seen) == len(set(seen))  # nothing twice
    assert seen == epoch0[:len(seen)]  # nothing skipped: the epoch's order, continued exactly
    used = len(seen) if not packed else next(k for k in range(len(units) + 1)
                                            if sum(len(r) for r in units[:k]) == len(seen))
    assert len(units) - used < 8  # only the last incomplete global batch (8 samples or rows) is left out


def test_packed_epochs_count_their_own_rows_and_end_where_they_end():
    rng = np.random.default_rng(3)
    source = InMemorySamples([sample(i, int(n)) for i, n in enumerate(rng.integers(5, 60, size=300))])
    batches = PackedBatches(source, BatchLayout(1, 2, 1), 0, seed=1,
                            packing=Packing("zero_padding", PackingOptions(64), buffer_size=50))
    per_epoch = [batches.steps_in_epoch(e) for e in range(3)]
    assert len(set(per_epoch)) > 1, "the test needs epochs that pack to different row counts"
    assert batches.steps_for_epochs(3) == sum(per_epoch)
    assert batches.steps_for_epochs(1.5) == per_epoch[0] + -(-per_epoch[1] // 2)
    ends = [step for step in range(1, sum(per_epoch) + 1) if batches.next_microbatches() and batches.epoch_ended]
    assert ends == list(np.cumsum(per_epoch))  # epoch-end saves happen at each epoch's own last step


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stream") / "train.jsonl", 41, seed=4)


def stream_job(path):
    return tokenize_job(build_config({"tokenizer_name_or_path": MISTRAL, "max_seq_len": 96, "max_prompt_len": 48}),
                        str(path))


@pytest.mark.one_leg
@pytest.mark.parametrize("workers, packed", [(0, False), (2, False), (0, True)])
def test_a_resumed_stream_seeks_instead_of_rereading(tmp_path, stream_file, workers, packed):
    path = tmp_path / "train.jsonl"
    path.write_bytes(stream_file.read_bytes())
    layout = BatchLayout(2, 2, 1)
    packing = Packing("greedy_zero_padding", PackingOptions(96), buffer_size=6) if packed else None

    def batches():
        return StreamedBatches(SampleStream(stream_job(path), StreamShard(0, 1, 7, 5), workers), layout, packing)

    straight = batches()
    expected = [ids(straight.next_microbatches()) for _ in range(9)]
    first = batches()
    got = [ids(first.next_microbatches()) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    # Everything before the current blocks becomes unreadable: a resume that re-read it would fail.
    start = min(p["offset"] for p in state["stream"]["positions"])
    assert start > 0
    path.write_bytes(b"\n" * (start - 1) + b"{" + path.read_bytes()[start:])
    second = batches()
    second.load_state_dict(state)
    got += [ids(second.next_microbatches()) for _ in range(4)]
    assert got == expected


def test_a_stream_refuses_another_reader_count(stream_file):
    stream = SampleStream(stream_job(stream_file), StreamShard(0, 1, 7, 5), 0)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="same number of readers"):
        SampleStream(stream_job(stream_file), StreamShard(0, 1, 7, 5), 2).load_state_dict(state)


# ------------------------------------------------------------------------------ runs of the trainer

BASE = {
    "tokenizer_name_or_path": MISTRAL, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 128, "max_prompt_len": 64, "device": "cpu",
    "bf16": False, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 100, "seed": 11, "sharding": "stage1",
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 8, "dev_dataset_path": None,
    "save_steps": 100,
}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "run.json"
    path.write_text(json.dumps({**BASE, "train_dataset_path": str(write_dataset(folder / "train.jsonl", 64, seed=21))}))
    return path


def start(config, output, nproc, *args):
    """The trainer in a session of its own, as SLURM starts it: torchrun ignores SIGUSR1 (the example
    script's `trap '' USR1`), which its workers inherit and replace with their own handler."""
    train = ["-m", "megatron_prm", "train", str(config), "--output_dir", str(output), *args]
    if nproc > 1:
        train = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                 "--master-port", str(free_port()), *train]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def ignore_usr1():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, *train], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=ignore_usr1)


def signal_all(process, sig: signal.Signals) -> None:
    """``sig`` to the launcher and every process below it, as SLURM signals a job step's processes
    (torchrun starts each worker in a session of its own, so a process group would not reach them)."""
    tree = psutil.Process(process.pid)
    for member in [tree, *tree.children(recursive=True)]:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_until(process, marker: str, sig: signal.Signals) -> str:
    """Send ``sig`` to the whole run once a line starts with ``marker``; the run's output."""
    out = []
    for line in process.stdout:
        out.append(line)
        if line.startswith(marker):
            signal_all(process, sig)
            break
    out += process.stdout.read()
    process.wait(timeout=300)
    return "".join(out)


def losses(output):
    return {e["step"]: e["loss"] for e in read_log(output, "train")}


def uninterrupted(config, tmp_path, nproc):
    output = tmp_path / f"straight{nproc}"
    process = start(config, output, nproc)
    text = process.communicate(timeout=300)[0]
    assert process.returncode == 0, text[-3000:]
    return losses(output)


@pytest.mark.one_leg
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_stops_cleanly_and_auto_resumes_exactly_one_process(tmp_path, run_config, sig, status):
    """SIGTERM (preemption) exits 0 so that a requeued job resumes; Ctrl-C does the same and exits 130."""
    expected = uninterrupted(run_config, tmp_path, 1)
    output = tmp_path / "run"
    process = start(run_config, output, 1, "--resume_from_checkpoint", "auto")
    text = run_until(process, "step 2/", sig)
    assert process.returncode == status, text[-3000:]
    assert f"received {sig.name}: saved the checkpoint of step" in text and "Traceback" not in text, text[-3000:]
    stopped = int((output / "latest").read_text().strip()[len("iter_"):])
    assert 2 <= stopped < 8  # the step under way when the signal came (later on a loaded machine), not the end
    process = start(run_config, output, 1, "--resume_from_checkpoint", "auto")
    text = process.communicate(timeout=300)[0]
    assert process.returncode == 0 and f"at step {stopped}" in text, text[-3000:]
    got = losses(output)
    assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]  # bitwise


@pytest.mark.one_leg
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, run_config):
    process = start(run_config, tmp_path / "run", 1)
    out = []
    for line in process.stdout:
        out.append(line)
        if line.startswith("Ctrl-C: saving"):
            signal_all(process, signal.SIGINT)
            break
        if line.startswith("step 1/"):
            signal_all(process, signal.SIGINT)
    out += process.stdout.read()
    process.wait(timeout=300)
    text = "".join(out)
    assert process.returncode == 130, text[-3000:]
    assert "megatron-prm train: interrupted (Ctrl-C)" in text and "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "run" / "latest").exists()


@pytest.mark.one_leg
def test_kill_at_random_steps_then_signal_resumes_exactly_stage1_two_ranks(tmp_path, run_config):
    """Seeded SIGKILLs at random steps (saving every step, asynchronously: a kill lands while the next save
    is being written), then SIGUSR1: every resumed run continues where the last published checkpoint
    stopped and the per-step losses are bitwise those of an uninterrupted (synchronously saving) run."""
    expected = uninterrupted(run_config, tmp_path, 2)
    output = tmp_path / "run"
    rng = random.Random(1414)
    done = 0
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGUSR1):
        at = rng.randint(done + 1, done + 2)
        process = start(run_config, output, 2, "--save_steps", "1", "--resume_from_checkpoint", "auto",
                        "--async_save", "true")
        if sig == signal.SIGUSR1:  # at a step line: the run saves at the end of the step it is in
            text = run_until(process, f"step {at}/", sig)
            assert process.returncode == 0 and "received SIGUSR1: saved" in text, text[-3000:]
        else:  # SIGKILL once step `at` is saved (mid-way through the next step or save)
            text = run_until(process, f"saved checkpoint {output / f'iter_{at:07d}'}", sig)
            assert process.returncode == -signal.SIGKILL, text[-3000:]
        done = int((output / "latest").read_text().strip()[len("iter_"):])
        assert done >= at
        saved = json.loads((output / f"iter_{done:07d}" / "train_state.json").read_text())
        # 64 samples, global batch 8: the data position is counted in samples into the epoch
        assert saved["data_position"] == {"kind": "indexed", "epoch": 0, "position": 8 * done, "epoch_ended": False}
    process = start(run_config, output, 2, "--save_steps", "1", "--resume_from_checkpoint", "auto")
    text = process.communicate(timeout=300)[0]
    assert process.returncode == 0, text[-3000:]
    got = losses(output)
    assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]  # bitwise


def _report_stop_signal_handlers(queue) -> None:
    queue.put([signal.getsignal(sig) == signal.SIG_IGN for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)])


# The test forks from its multi-threaded process on purpose, as Megatron's checkpoint writer does in training.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_processes_forked_during_training_ignore_stop_signals_and_a_hard_stop_ends_them():
    """A Ctrl-C reaches every process of the terminal's group: a process forked while the training records stop
    signals (Megatron's checkpoint writer workers, a save's manager process) ignores them instead of raising
    KeyboardInterrupt in the writer; one forked after restore keeps the usual handlers. A stop at once kills the
    children that are left (none orphaned, none printing about its vanished parent)."""
    import multiprocessing

    from megatron_prm.error_boundary import stop_child_processes
    from megatron_prm.stop_signals import StopSignals

    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    signals = StopSignals()
    try:
        child = fork.Process(target=_report_stop_signal_handlers, args=(queue,))
        child.start()
        assert queue.get(timeout=60) == [True, True, True]
        child.join(timeout=60)
    finally:
        signals.restore()
    child = fork.Process(target=_report_stop_signal_handlers, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == [False, False, False]
    child.join(timeout=60)

    previous_sigchld = signal.getsignal(signal.SIGCHLD)
    sleepers = [fork.Process(target=signal.pause) for _ in range(2)]
    for sleeper in sleepers:
        sleeper.start()
    try:
        stop_child_processes()
    finally:
        signal.signal(signal.SIGCHLD, previous_sigchld)
    assert [sleeper.exitcode for sleeper in sleepers] == [-signal.SIGKILL] * 2
