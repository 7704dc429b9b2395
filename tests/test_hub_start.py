"""Hugging Face models by Hub ID (offline, from a cache in the Hub's layout) and train started from an HF
model: imported once into output_dir/base_model, its tokenizer used, the final model exported at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from megatron_prm.data.synthetic import write_dataset
from quickstart_stub import write_tiny_llama

# Version-independent: Hub resolution and the import/export it starts; both legs run those conversions elsewhere.
pytestmark = pytest.mark.one_leg

REPO_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME holding REPO_ID in the Hub cache layout (refs/main -> snapshots/<commit>/), offline."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    write_tiny_llama(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return snapshot, env


def megatron_prm(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_hub_ids_resolve_offline_from_the_cache(hub, tmp_path):
    snapshot, env = hub
    data = write_jsonl(tmp_path / "train.jsonl", [{"src": "1+1?", "responses": ["2"], "labels": ["+"]}])
    checked = megatron_prm(["check-data", "--data", str(data), "--tokenizer", REPO_ID], env, tmp_path)
    assert checked.returncode == 0, checked.stderr
    imported = megatron_prm(["convert-hf", "import", "--hf", REPO_ID, "--out", "ckpt"], env, tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").read_bytes() == (snapshot / "tokenizer.json").read_bytes()
    (tmp_path / "run.yaml").write_text(f"model_config: {REPO_ID}\ntrain_dataset_path: train.jsonl\n")
    planned = megatron_prm(["plan", "run.yaml", "--gpus-per-node", "1"], env, tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout.strip().splitlines()[-1])["parameters_per_gpu"] > 0


@pytest.mark.parametrize("argv,what", [
    (["check-data", "--data", "d.jsonl", "--tokenizer", "tiny-org/absent"], "tokenizer tiny-org/absent"),
    (["convert-hf", "import", "--hf", "tiny-org/absent", "--out", "x"], "--hf tiny-org/absent"),
    (["convert-hf", "import", "--hf", "no/such/dir", "--out", "x"], "--hf no/such/dir"),
])
def test_a_model_in_neither_place_is_one_line_with_the_download_command(hub, tmp_path, argv, what):
    _, env = hub
    write_jsonl(tmp_path / "d.jsonl", [{"src": "1+1?", "responses": ["2"], "labels": ["+"]}])
    result = megatron_prm(argv, env, tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert what in line and "hf download " in line, line
    if "absent" in what:
        assert "hf download tiny-org/absent --local-dir models/absent" in line
    assert not (tmp_path / "x").exists()


def test_train_starts_from_a_hub_id_once_and_exports_at_the_end(hub, tmp_path):
    snapshot, env = hub
    write_dataset(tmp_path / "train.jsonl", 64, seed=1)
    common = ["--device", "cpu", "--bf16", "false", "--max-seq-len", "256", "--max-steps", "2", "--save-steps", "2",
              "--per-device-train-batch-size", "4", "--do-eval", "false", "--train-dataset-path", "train.jsonl"]
    run = megatron_prm(["train", "--model-name-or-path", REPO_ID, "--output-dir", "run", "--export-hf-dir", "hf",
                        *common], env, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"importing {REPO_ID} into run/base_model (once: a restart reuses it)" in run.stdout
    assert "exported run/iter_0000002 to hf (HF LlamaForCausalLM)" in run.stdout
    base = tmp_path / "run" / "base_model"
    assert json.loads((base / "imported_from.json").read_text()) == {"model_name_or_path": REPO_ID}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_name_or_path"] == "run/base_model" and config["tokenizer_name_or_path"] is None
    # the tokenizer of the HF model, carried through the import into the run's checkpoint and the export
    trained_tokenizer = json.loads((tmp_path / "run/iter_0000002/tokenizer/tokenizer.json").read_text())
    assert "ки" in trained_tokenizer["model"]["vocab"] or any(
        token["content"] == "ки" for token in trained_tokenizer["added_tokens"])
    assert (tmp_path / "hf" / "config.json").is_file() and list((tmp_path / "hf").glob("*.safetensors"))

    # A second launch in the same directory (a fresh run over the first) reuses the import.
    again = megatron_prm(["train", "--model-name-or-path", REPO_ID, "--output-dir", "run", "--overwrite-output-dir",
                          "true", *common], env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "importing" not in again.stdout and base.is_dir()
    # ... but not for another model
    other = tmp_path / "other-model"
    shutil.copytree(snapshot, other)
    refused = megatron_prm(["train", "--model-name-or-path", str(other), "--output-dir", "run",
                            "--resume-from-checkpoint", "auto", *common], env, tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"run/base_model holds the import of {REPO_ID}, not of model_name_or_path {other}" in refused.stderr
    # an export directory that holds files is refused before anything is written
    refused = megatron_prm(["train", "--model-name-or-path", REPO_ID, "--output-dir", "run2", "--export-hf-dir", "hf",
                            *common], env, tmp_path)
    assert "export_hf_dir hf already exists and is not empty" in refused.stderr and not (tmp_path / "run2").exists()


def test_an_hf_model_as_model_config_brings_its_tokenizer(hub, tmp_path):
    """Random initialisation in the HF model's shape: no tokenizer_name_or_path needed."""
    snapshot, env = hub
    from megatron_prm.checkpoint import run_tokenizer
    from megatron_prm.config import ModelArguments

    assert run_tokenizer(ModelArguments(model_config=str(snapshot))) == str(snapshot)
    assert run_tokenizer(ModelArguments(model_config=str(snapshot / "config.json"))) == str(snapshot)
    assert run_tokenizer(ModelArguments(model_config=REPO_ID)) == REPO_ID
    assert run_tokenizer(ModelArguments(model_config=str(REPO / "examples/configs/llama3_8b_config.json"))) is None
    assert run_tokenizer(ModelArguments(model_config=str(snapshot), tokenizer_name_or_path="t")) == "t"
