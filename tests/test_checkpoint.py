"""Checkpoints: exact resume after SIGKILL, resume under another layout, crash during a save, best model."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import MISTRAL, REPO, free_port, read_log, run_cli
from megatron_prm.run_directory import prune_checkpoints
from megatron_prm.data.synthetic import write_dataset

BASE = {
    "tokenizer_name_or_path": MISTRAL, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 128, "max_prompt_len": 64, "device": "cpu",
    "bf16": False, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 100, "seed": 11,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 6, "dev_dataset_path": None,
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    train = write_dataset(folder / "train.jsonl", 64, seed=21)
    dev = write_dataset(folder / "dev.jsonl", 12, seed=22)
    path = folder / "base.json"
    path.write_text(json.dumps({**BASE, "train_dataset_path": str(train)}))
    (folder / "dev_path").write_text(str(dev))
    return path


def command(config_path, nproc, args):
    if nproc == 1:
        return [sys.executable, "-m", "megatron_prm", "train", str(config_path), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_prm", "train", str(config_path), *args]


def train(config_path, output, nproc=1, **overrides):
    args = ["--output_dir", str(output)]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return run_cli(["train", str(config_path), *args], nproc=nproc)


def losses(output):
    """The loss of every step, the latest run's where a resumed run repeats steps."""
    return {event["step"]: event["loss"] for event in read_log(output, "train")}


def kill_after_checkpoint(config_path, output, nproc, step):
    """Start a 6-step run saving every 3 steps; SIGKILL it as soon as the step-3 checkpoint is announced."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command(config_path, nproc, ["--output_dir", str(output), "--save_steps", str(step)]),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("saved checkpoint") and line.strip().endswith(f"iter_{step:07d}"):
                os.killpg(process.pid, signal.SIGKILL)
                break
    finally:
        process.wait(timeout=120)
    assert process.returncode != 0, "the run was not killed"


@pytest.mark.parametrize("nproc, extra", [pytest.param(1, {}, marks=pytest.mark.one_leg),
                                          pytest.param(2, {"gradient_accumulation_steps": 2}, marks=pytest.mark.one_leg),
                                          (2, {"context_parallel_degree": 2, "greedy_zero_padding": True,
                                               "per_device_train_batch_size": 1})])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, config_path, nproc, extra):
    straight = tmp_path / "straight"
    train(config_path, straight, nproc, **extra)
    interrupted = tmp_path / "interrupted"
    extra_args = [a for key, value in extra.items() for a in (f"--{key}", json.dumps(value))]
    config = config_path.with_name(f"kill_{nproc}.json")
    config.write_text(json.dumps({**json.loads(config_path.read_text()), **extra}))
    kill_after_checkpoint(config, interrupted, nproc, 3)
    assert (interrupted / "latest").read_text().strip() == "iter_0000003"
    assert not (interrupted / "iter_0000006").exists()
    run_cli(["train", str(config), "--output_dir", str(interrupted), "--save_steps", "3",
             "--resume_from_checkpoint", "latest", *extra_args], nproc=nproc)
    expected, resumed = losses(straight), losses(interrupted)
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # bitwise
    log = [e for e in read_log(interrupted, "train") if e["step"] >= 4]
    assert log[-1]["step"] == 6


def test_resume_under_other_layouts(tmp_path, config_path):
    tp2 = tmp_path / "tp2"
    train(config_path, tp2, 2, tensor_parallel_degree=2, max_steps=4, save_steps=3)
    step4 = losses(tp2)[4]
    for name, nproc, layout in (("tp1", 1, {}), ("pp2", 2, {"pipeline_parallel_degree": 2})):
        output = tmp_path / name
        train(config_path, output, nproc, max_steps=4, save_steps=3,
              resume_from_checkpoint=str(tp2 / "iter_0000003"), **layout)
        assert losses(output)[4] == pytest.approx(step4, rel=1e-5)


@pytest.mark.one_leg
def test_resuming_from_an_earlier_checkpoint_keeps_the_later_ones(tmp_path, config_path):
    """A rollback: resuming in place from iter 2 while iter 4 and iter 6 exist moves those two, whole, into a
    rolled_back_* directory before anything is saved; the resumed run writes its own iter 4 and iter 6 and
    prunes nothing of the earlier ones."""
    run = tmp_path / "run"
    train(config_path, run, save_steps=2)
    manifests = {name: (run / name / "manifest.json").read_bytes() for name in ("iter_0000004", "iter_0000006")}
    result = train(config_path, run, save_steps=2, save_total_limit=1, resume_from_checkpoint=str(run / "iter_0000002"))
    (aside,) = [path for path in run.iterdir() if path.name.startswith("rolled_back_")]
    assert f"iter_0000004, iter_0000006 moved to {aside}" in result.stdout
    assert sorted(path.name for path in aside.iterdir()) == ["iter_0000004", "iter_0000006"]
    assert {name: (aside / name / "manifest.json").read_bytes() for name in manifests} == manifests
    assert (run / "latest").read_text().strip() == "iter_0000006"
    assert (run / "iter_0000006" / "manifest.json").read_bytes() != manifests["iter_0000006"]  # the new run's
    assert losses(run)[6] == pytest.approx(read_log(run, "train")[5]["loss"], rel=1e-6)  # the same steps again


def test_distributed_optimizer_state_reshards_when_saved_unified(tmp_path, config_path):
    common = {"sharding": "stage1", "max_steps": 4, "save_steps": 3}
    unified = tmp_path / "unified"
    train(config_path, unified, 2, gradient_accumulation_steps=2, unified_checkpoint=True, **common)
    resumed = tmp_path / "unified_tp2"
    train(config_path, resumed, 2, tensor_parallel_degree=2, unified_checkpoint=True,
          resume_from_checkpoint=str(unified / "iter_0000003"), **common)
    assert losses(resumed)[4] == pytest.approx(losses(unified)[4], rel=1e-5)


@pytest.fixture(scope="module")
def dp_reshardable_run(tmp_path_factory, config_path):
    """A DP2 run with the distributed optimizer and the default checkpoint (dp_reshardable, every rank
    writing its share), saved at step 3 of 4."""
    output = tmp_path_factory.mktemp("fast") / "run"
    train(config_path, output, 2, gradient_accumulation_steps=2, sharding="stage1", max_steps=4, save_steps=3)
    return output


def test_the_default_checkpoint_is_written_by_every_rank_and_reshards_over_data_parallel(
        tmp_path, config_path, dp_reshardable_run):
    from megatron_prm.config import load_config
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.plan import plan

    checkpoint = dp_reshardable_run / "iter_0000003"
    assert json.loads((checkpoint / "train_state.json").read_text())["optimizer_format"] == "dp_reshardable"
    # Each rank writes its own files, about half of the bytes each; plan predicts what each writes.
    written = [sum(p.stat().st_size for p in checkpoint.glob(f"__{rank}_*.distcp")) for rank in (0, 1)]
    assert max(written) <= 1.5 * sum(written) / 2
    config = load_config(config_path, ["--sharding", "stage1"])
    arch = resolve_architecture(config.model, 32000, config.data.max_seq_len)
    predicted = plan(config, arch, nodes=1, gpus_per_node=2, gpu_memory_gib=80)["checkpoint"]
    assert predicted["written_per_rank_bytes"] == pytest.approx(sum(written) / 2, rel=0.05)
    one_rank = tmp_path / "fast_dp1"  # dp_reshardable: data-parallel size may change
    train(config_path, one_rank, 1, sharding="stage1", max_steps=4, save_steps=3, resume_from_checkpoint=str(checkpoint))
    assert losses(one_rank)[4] == pytest.approx(losses(dp_reshardable_run)[4], rel=1e-6)
    refused = run_cli(["train", str(config_path), "--output_dir", str(tmp_path / "refused"), "--sharding", "stage1",
                       "--tensor_parallel_degree", "2", "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)],
                      nproc=2, check=False)
    assert refused.returncode != 0 and "only reshards over data parallelism" in refused.stderr
    assert "megatron_prm reshard" in refused.stderr
    assert not (tmp_path / "refused" / "latest").exists()


def test_reshard_lets_a_resume_change_tensor_and_pipeline_layout(tmp_path, config_path, dp_reshardable_run):
    resharded = tmp_path / "resharded"
    result = run_cli(["reshard", str(dp_reshardable_run / "iter_0000003"), "--output-dir", str(resharded),
                      "--device", "cpu"], nproc=2)
    assert json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"] == str(resharded / "iter_0000003")
    assert json.loads((resharded / "iter_0000003" / "train_state.json").read_text())["optimizer_format"] == \
        "fully_reshardable"
    expected = losses(dp_reshardable_run)[4]
    for name, layout in (("tp2", {"tensor_parallel_degree": 2}), ("pp2", {"pipeline_parallel_degree": 2})):
        output = tmp_path / name
        shutil.copytree(resharded, output)  # a resume in place continues that run directory
        train(config_path, output, 2, sharding="stage1", max_steps=4, save_steps=3, resume_from_checkpoint="auto",
              **layout)
        assert losses(output)[4] == pytest.approx(expected, rel=1e-6), name
    again = run_cli(["reshard", str(resharded), "--output-dir", str(tmp_path / "again"), "--device", "cpu"],
                    check=False)
    assert again.returncode == 2 and "already loads under any layout" in again.stderr
    assert not (tmp_path / "again").exists()


@pytest.mark.one_leg
def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, config_path):
    output = tmp_path / "crash"
    result = subprocess.run([sys.executable, str(REPO / "tests" / "crash_during_save.py"), "6", "train",
                             str(config_path), "--output_dir", str(output), "--save_steps", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == -signal.SIGKILL
    assert (output / "latest").read_text().strip() == "iter_0000003"
    assert (output / "iter_0000006.tmp").is_dir() and not (output / "iter_0000006").exists()
    run_cli(["train", str(config_path), "--output_dir", str(output), "--save_steps", "3",
             "--resume_from_checkpoint", "latest"])
    assert (output / "latest").read_text().strip() == "iter_0000006"
    assert not (output / "iter_0000006.tmp").exists()


@pytest.mark.one_leg
def test_best_model_is_tracked_kept_and_loaded(tmp_path, config_path):
    output = tmp_path / "best"
    dev = config_path.with_name("dev_path").read_text()
    result = train(config_path, output, dev_dataset_path=dev, eval_steps=2, save_steps=2, save_total_limit=1,
                   load_best_model_at_end=True, metric_for_best_model="loss", learning_rate=3e-3)
    final = json.loads(result.stdout.strip().splitlines()[-1])
    evals = {e["step"]: e["loss"] for e in read_log(output, "eval") if e["step"] in (2, 4, 6)}
    best_step = min(evals, key=evals.get)
    assert final["best_checkpoint"] == f"iter_{best_step:07d}"
    state = json.loads((output / "iter_0000006" / "train_state.json").read_text())
    assert state["best_checkpoint"] == final["best_checkpoint"] and state["best_metric"] == pytest.approx(evals[best_step])
    kept = sorted(p.name for p in output.iterdir() if p.name.startswith("iter_"))
    assert kept == sorted({f"iter_{best_step:07d}", "iter_0000006"})
    assert final["loss"] == pytest.approx(evals[best_step], rel=1e-6)  # the best model, evaluated again


@pytest.mark.one_leg
def test_loading_refuses_other_shapes_and_non_checkpoints(tmp_path, config_path):
    output = tmp_path / "small"
    train(config_path, output, max_steps=1)
    wider = run_cli(["train", str(config_path), "--output_dir", str(tmp_path / "x"), "--hidden_size", "32",
                     "--resume_from_checkpoint", str(output)], check=False)
    assert wider.returncode == 2 and "another shape" in wider.stderr and "hidden_size: checkpoint 64, model 32" in wider.stderr
    (tmp_path / "empty").mkdir()
    nothing = run_cli(["train", str(config_path), "--output_dir", str(tmp_path / "y"), "--model_name_or_path",
                       str(tmp_path / "empty")], check=False)
    assert nothing.returncode == 2 and "is not a megatron-prm checkpoint" in nothing.stderr


def test_pruning_keeps_the_newest_and_the_best_of_this_run_by_step(tmp_path):
    for step in (2, 4, 6, 8, 10_000_000):
        (tmp_path / f"iter_{step:07d}").mkdir()
    (tmp_path / "iter_0000010.tmp").mkdir()
    (tmp_path / "latest").write_text("iter_10000000\n")
    removed = prune_checkpoints(tmp_path, keep=2, own=[2, 4, 8, 10_000_000], protect=["iter_0000002"])
    assert removed == ["iter_0000004"]  # 6 belongs to another run; by name iter_10000000 would sort first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000006", "iter_0000008", "iter_0000010.tmp", "iter_10000000", "latest"]
