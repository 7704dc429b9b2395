"""Checkpoint trust: crafted files run no code, corruption gives one error naming the file, run directories
keep earlier runs, a re-save survives a kill at any point, NaN stops the run before anything is saved."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_log, run_cli
from megatron_prm.checkpoint_manifest import verify_checkpoint, write_manifest
from megatron_prm.data.synthetic import write_dataset
from megatron_prm.nonfinite import NonFiniteBudget, NonFiniteError
from megatron_prm.run_directory import CheckpointError, publish_checkpoint, read_latest, resolve_checkpoint
from megatron_prm.safe_loading import SafeFileSystemReader, load_plain

BASE = {
    "tokenizer_name_or_path": "mistral-common:tokenizer.model.v1", "num_hidden_layers": 2, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_len": 128,
    "max_prompt_len": 64, "device": "cpu", "bf16": False, "learning_rate": 1e-3, "logging_steps": 1, "seed": 11,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "dev_dataset_path": None,
}


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_RunsCode(marker), protocol=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 1-process run of two epochs of 3 steps, saved at every epoch end with load_best_model_at_end and
    evaluation only at the end: on the old code the step-3 save (an epoch end, no eval) crashed."""
    folder = tmp_path_factory.mktemp("trust")
    train = write_dataset(folder / "train.jsonl", 24, seed=21)
    dev = write_dataset(folder / "dev.jsonl", 6, seed=22)
    config = folder / "base.json"
    config.write_text(json.dumps({**BASE, "train_dataset_path": str(train)}))
    output = folder / "run"
    result = run_cli(["train", str(config), "--output_dir", str(output), "--dev_dataset_path", str(dev),
                      "--num_train_epochs", "2", "--save_strategy", "epoch", "--eval_steps", "100",
                      "--load_best_model_at_end", "true"])
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000006"]
    assert json.loads(result.stdout.strip().splitlines()[-1])["best_checkpoint"] in ("iter_0000003", "iter_0000006")
    assert [e["step"] for e in read_log(output, "eval")] == [3, 6]  # the epoch-end save was ranked too
    return output


@pytest.fixture
def copy(run_dir, tmp_path):
    """A private copy of the run directory (crafted and corrupted in place)."""
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


def export(megatron: Path, out: Path) -> subprocess.CompletedProcess:
    """tools/convert_hf.py export, importing this checkout's package."""
    return subprocess.run([sys.executable, "tools/convert_hf.py", "--no-progress", "export", "--megatron", str(megatron),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------ nothing runs from files


def test_crafted_metadata_is_refused_in_process(copy, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = copy / "iter_0000006"
    (checkpoint / ".metadata").write_bytes(evil_pickle(marker))
    with pytest.raises(CheckpointError, match=r"iter_0000006/\.metadata is not valid checkpoint metadata"):
        SafeFileSystemReader(checkpoint).read_metadata()
    with pytest.raises(CheckpointError, match="common.pt"):
        (checkpoint / "common.pt").write_bytes(evil_pickle(marker))
        load_plain(checkpoint / "common.pt", str(checkpoint / "common.pt"))
    assert not marker.exists()


def _craft_byte_item(checkpoint: Path, marker: Path) -> str:
    """Overwrite the stored RNG state (a byte item inside a .distcp file) with a pickle that runs code,
    and reseal the manifest as an attacker would; returns the file's name."""
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.startswith("rng_state"))
    payload = evil_pickle(marker)
    assert len(payload) < info.length
    with open(checkpoint / info.relative_path, "r+b") as stream:
        stream.seek(info.offset)
        stream.write(payload + b"\0" * (info.length - len(payload)))
    write_manifest(checkpoint)
    return info.relative_path


def test_crafted_byte_item_runs_nothing_on_resume(copy, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = copy / "iter_0000006"
    name = _craft_byte_item(checkpoint, marker)
    result = run_cli(["train", str(_config(copy)), "--output_dir", str(tmp_path / "resumed"), "--max_steps", "7",
                      "--resume_from_checkpoint", str(checkpoint)], check=False)
    one_error_line(result, f"iter_0000006/{name}", "rng_state")
    assert not marker.exists()


def _config(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "config.json").read_text())["train_dataset_path"]).with_name("base.json")


def test_crafted_metadata_runs_nothing_from_model_name_or_path_and_export(copy, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = copy / "iter_0000006"
    (checkpoint / ".metadata").write_bytes(evil_pickle(marker))
    write_manifest(checkpoint)
    result = run_cli(["train", str(_config(copy)), "--output_dir", str(tmp_path / "fresh"), "--max_steps", "1",
                      "--model_name_or_path", str(copy)], check=False)
    one_error_line(result, "iter_0000006/.metadata")
    exported = export(copy, tmp_path / "hf")
    one_error_line(exported, "iter_0000006/.metadata")
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_crafted_common_state_runs_nothing_from_score(copy, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = copy / "iter_0000006"
    (checkpoint / "common.pt").write_bytes(evil_pickle(marker))
    write_manifest(checkpoint)
    data = json.loads((copy / "config.json").read_text())["train_dataset_path"]
    result = run_cli(["score", "--checkpoint", str(copy), "--data", data, "--output", str(tmp_path / "s.jsonl")],
                     check=False)
    one_error_line(result, "iter_0000006/common.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", ["../elsewhere", "/tmp", "iter_0000006/../../x", "iter_0000006\niter_1"])
def test_latest_stays_inside_its_run_directory(copy, content):
    (copy / "latest").write_text(content)
    with pytest.raises(CheckpointError, match="latest holds"):
        resolve_checkpoint(copy)


def test_latest_naming_a_symlink_out_of_the_run_is_refused(copy, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(copy / "iter_0000006", outside)
    (copy / "iter_0000006").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads out of the run directory"):
        resolve_checkpoint(copy)
    exported = export(copy, tmp_path / "hf")
    one_error_line(exported, "leads out of the run directory")


def test_a_resume_from_a_train_state_of_the_wrong_type_stops_and_touches_no_checkpoint(copy, tmp_path):
    """common.pt's train_state a list: it was read as defaults (step 0, a new run id), so the resumed run
    re-saved iter_0000003 and iter_0000006 over the earlier ones. Refused now, before anything is written.
    (Megatron-Core 0.19 stores the common state inside the .distcp files, and reads a common.pt first.)"""
    import torch
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    from megatron_prm.megatron_compat import _safe_megatron_readers

    checkpoint = copy / "iter_0000006"
    with _safe_megatron_readers():
        common = load_common_state_dict(checkpoint)
    common["train_state"] = [6, 36]
    torch.save(common, checkpoint / "common.pt")
    write_manifest(checkpoint)
    before = {str(p): p.read_bytes() for p in sorted(copy.glob("iter_*/**/*")) if p.is_file()}
    result = run_cli(["train", str(_config(copy)), "--output_dir", str(copy), "--max_steps", "9", "--save_steps", "3",
                      "--resume_from_checkpoint", "latest"], check=False)
    one_error_line(result, "iter_0000006/common.pt train_state is a list")
    assert {str(p): p.read_bytes() for p in sorted(copy.glob("iter_*/**/*")) if p.is_file()} == before
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000006"]


# -------------------------------------------------------------------------------------------- integrity


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as stream:
        stream.seek(path.stat().st_size // 2)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0x01]))


CORRUPTIONS = {
    # The last data file rank 0 wrote (__0_1 with megatron-core 0.16's two writer threads, __0_0 with 0.19's one).
    "missing distcp": ("last distcp", lambda p: p.unlink(), ".distcp: missing"),
    "truncated distcp": ("__0_0.distcp", _truncate, "__0_0.distcp: "),
    "truncated metadata": (".metadata", _truncate, ".metadata: "),
    "switched format": ("metadata.json", lambda p: p.write_text(p.read_text().replace("torch_dist", "zarr")),
                        "metadata.json"),
    "flipped byte": ("__0_0.distcp", _flip_byte, "__0_0.distcp: CRC-32 differs"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_is_named(copy, kind):
    from megatron_prm.checkpoint import check_integrity

    name, corrupt, message = CORRUPTIONS[kind]
    checkpoint = copy / "iter_0000006"
    target = sorted(checkpoint.glob("__0_*.distcp"))[-1] if name == "last distcp" else checkpoint / name
    corrupt(target)
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as raised:
        check_integrity(checkpoint)
    assert message in str(raised.value) and target.name in str(raised.value)


def test_checkpoints_without_manifest_load_with_a_warning_and_still_fail_clearly(copy):
    from megatron_prm.checkpoint import check_integrity

    checkpoint = copy / "iter_0000006"
    (checkpoint / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        check_integrity(checkpoint)
    _truncate(checkpoint / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata is not valid checkpoint metadata"):
        SafeFileSystemReader(checkpoint).read_metadata()
    (checkpoint / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="metadata.json: sharded_backend 'zarr'"):
        check_integrity(checkpoint)


def test_checksums_can_be_turned_off(copy):
    checkpoint = copy / "iter_0000006"
    _flip_byte(checkpoint / "__0_0.distcp")
    assert verify_checkpoint(checkpoint, checksums=False) == []
    assert len(verify_checkpoint(checkpoint, checksums=True)) == 1


@pytest.mark.one_leg
def test_flipped_weights_stop_a_resume_and_check_checkpoint_names_them(copy, tmp_path):
    _flip_byte(copy / "iter_0000003" / "__0_0.distcp")
    checked = run_cli(["check-checkpoint", str(copy)], check=False)
    assert checked.returncode == 1
    lines = checked.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("iter_0000003: CORRUPT") and "__0_0.distcp" in lines[0]
    assert lines[1].startswith("iter_0000006: ok")
    result = run_cli(["train", str(_config(copy)), "--output_dir", str(tmp_path / "r"), "--max_steps", "4",
                      "--resume_from_checkpoint", str(copy / "iter_0000003")], check=False)
    one_error_line(result, "iter_0000003/__0_0.distcp: CRC-32 differs")


def test_a_switched_sharding_format_is_refused_clearly(run_dir, tmp_path):
    result = run_cli(["train", str(_config(run_dir)), "--output_dir", str(tmp_path / "r"), "--max_steps", "7",
                      "--sharding", "stage1", "--resume_from_checkpoint", str(run_dir)], check=False)
    one_error_line(result, "iter_0000006 stores the optimizer state as 'model_space'", "'dp_reshardable'")


# ------------------------------------------------------------------------------------- run directories


@pytest.mark.one_leg
def test_a_fresh_run_refuses_a_used_directory_and_overwrite_moves_the_earlier_run_aside(copy, tmp_path):
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in copy.iterdir() if p.is_dir()}
    refused = run_cli(["train", str(_config(copy)), "--output_dir", str(copy), "--max_steps", "2"], check=False)
    one_error_line(refused, "is not empty", "overwrite_output_dir")
    assert (copy / "latest").read_text().strip() == "iter_0000006"

    run_cli(["train", str(_config(copy)), "--output_dir", str(copy), "--max_steps", "2", "--save_steps", "1",
             "--save_total_limit", "1", "--overwrite_output_dir", "true"])
    [aside] = [p for p in copy.iterdir() if p.name.startswith("earlier_run_")]
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in aside.iterdir() if p.is_dir()} == before
    assert (aside / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    assert read_latest(copy).name == "iter_0000002"


@pytest.mark.one_leg
def test_resume_auto_starts_fresh_then_resumes(tmp_path, run_dir):
    output = tmp_path / "requeued"
    output.mkdir()
    (output / "log.jsonl").write_text("")  # an attempt killed before its first checkpoint
    common = ["train", str(_config(run_dir)), "--output_dir", str(output), "--save_steps", "1",
              "--resume_from_checkpoint", "auto"]
    run_cli([*common, "--max_steps", "1"])
    resumed = run_cli([*common, "--max_steps", "2"])
    assert f"resumed from {output / 'iter_0000001'} at step 1" in resumed.stdout
    assert read_latest(output).name == "iter_0000002"


def _complete(path: Path, label: str) -> Path:
    path.mkdir()
    (path / "content").write_text(label)
    return path


@pytest.mark.parametrize("kill_at", range(7))
def test_resaving_a_step_leaves_latest_on_a_complete_checkpoint_at_every_kill_point(tmp_path, monkeypatch, kill_at):
    _complete(tmp_path / "iter_0000004", "old")
    (tmp_path / "latest").write_text("iter_0000004\n")
    staging = _complete(tmp_path / "iter_0000004.tmp", "new")
    operations = [0]

    class Killed(Exception):
        pass

    def counted(original):
        def wrapper(*args, **kwargs):
            if operations[0] == kill_at:
                raise Killed
            operations[0] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Path, "rename", counted(Path.rename))
    monkeypatch.setattr(Path, "replace", counted(Path.replace))
    monkeypatch.setattr(shutil, "rmtree", counted(shutil.rmtree))
    try:
        publish_checkpoint(staging)
    except Killed:
        pass
    monkeypatch.undo()
    latest = read_latest(tmp_path)
    assert (latest / "content").read_text() in ("old", "new")
    if kill_at == 6:  # not killed
        assert latest.name == "iter_0000004" and (latest / "content").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "latest"]


# ------------------------------------------------------------------------------------------- NaN / inf


def test_nonfinite_budget():
    budget = NonFiniteBudget(limit=1)
    budget.record(3, float("nan"))
    with pytest.raises(NonFiniteError, match="step 5: loss inf; 2 non-finite step"):
        budget.record(5, float("inf"))


@pytest.mark.one_leg
def test_the_nonfinite_budget_spans_resumes(tmp_path, run_dir):
    """Budget 1 at learning rate 1e12: step 2 is skipped (saved, unchanged weights), step 3 stops the run.
    Resumed from step 2, the budget is already spent: step 3 stops it again (a fresh budget would skip it)."""
    output = tmp_path / "diverged"
    command = ["train", str(_config(run_dir)), "--output_dir", str(output), "--max_steps", "6", "--save_steps", "1",
               "--learning_rate", "1e12", "--max_skipped_nonfinite_steps", "1"]
    one_error_line(run_cli(command, check=False), "step 3: loss nan; 2 non-finite step(s)")
    assert read_latest(output).name == "iter_0000002"
    assert json.loads((output / "iter_0000002" / "train_state.json").read_text())["skipped_nonfinite_steps"] == 1
    resumed = run_cli([*command, "--resume_from_checkpoint", "auto"], check=False)
    one_error_line(resumed, "step 3: loss nan; 2 non-finite step(s)")


@pytest.mark.one_leg
def test_a_diverging_run_stops_before_saving_nan(tmp_path, run_dir):
    output = tmp_path / "diverged"
    result = run_cli(["train", str(_config(run_dir)), "--output_dir", str(output), "--max_steps", "6",
                      "--save_steps", "1", "--learning_rate", "1e12"], check=False)
    one_error_line(result, "max_skipped_nonfinite_steps 0")
    steps = sorted(int(p.name[5:]) for p in output.iterdir() if p.name.startswith("iter_") and p.is_dir())
    latest = read_latest(output)
    assert steps and latest.name == f"iter_{steps[-1]:07d}"
    logged = {e["step"]: e["loss"] for e in read_log(output, "train")}
    assert max(logged) == steps[-1]  # the failing step was neither logged nor saved
    import torch
    import torch.distributed.checkpoint as dcp

    stored = SafeFileSystemReader(latest).read_metadata().state_dict_metadata
    weights = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
               if hasattr(meta, "size")}  # weights and optimizer state
    dcp.load(weights, storage_reader=SafeFileSystemReader(latest), no_dist=True)
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())
