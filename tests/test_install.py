"""What `pip install -e .` must bring, and the optional packages: without one, a feature that needs it
stops with one line naming the package and how to get it; everything else runs."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MISTRAL, REPO, read_log

PACKAGE = REPO / "megatron_prm"


def _install_requires() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    return {re.split(r"[<>=!~\[ ]", ast.literal_eval(item))[0].lower().replace("_", "-") for item in requires.elts}


def _third_party_modules() -> dict[str, str]:
    """Top-level modules the package imports (or loads resources from), with one file that does."""
    modules: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "files"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]  # importlib.resources.files("mistral_common")
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "megatron_prm":
                    modules.setdefault(top, str(path.relative_to(REPO)))
    return modules


def test_install_requires_cover_every_module_the_package_imports():
    from megatron_prm.optional import HOW_TO_GET

    required = _install_requires()
    assert {"transformers", "mistral-common", "torch", "megatron-core"} <= required
    distributions = importlib.metadata.packages_distributions()
    imported = _third_party_modules()
    assert {"transformers", "mistral_common", "sentencepiece", "megatron", "torch"} <= set(imported)
    missing = {}
    for module, where in imported.items():
        if module in HOW_TO_GET:  # optional, imported through megatron_prm.optional.require
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & required:
            missing[module] = where
    assert not missing, f"imported but not in install_requires: {missing}"


def test_require_names_the_package_and_how_to_get_it(monkeypatch):
    from megatron_prm.config import ConfigError
    from megatron_prm.optional import MissingDependency, require

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(MissingDependency) as caught:
        require("wandb", "report_to: wandb")
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the command line reports it as one line, exit status 2
    assert "\n" not in message
    assert message.startswith("report_to: wandb needs the package wandb") and "`pip install wandb`" in message
    assert require("json", "anything") is json


BLOCKER = '''
import sys

class _Block:
    """A package that is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Block())
for loaded in [m for m in sys.modules if m == {name!r} or m.startswith({name!r} + ".")]:
    del sys.modules[loaded]
'''


def _train_without(package: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``megatron-prm train`` of a one-step tiny model with ``package`` not importable."""
    from megatron_prm.data.synthetic import write_dataset

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(name=package))
    write_dataset(tmp_path / "train.jsonl", 8, seed=1)
    config = {"tokenizer_name_or_path": MISTRAL, "train_dataset_path": str(tmp_path / "train.jsonl"),
              "dev_dataset_path": None, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 2, "vocab_size": 32000, "max_seq_len": 128, "max_prompt_len": 64, "device": "cpu",
              "bf16": False, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 1, "logging_steps": 1,
              "save_strategy": "no",
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, f"the blocker did not hide {package}"
    return subprocess.run([sys.executable, "-m", "megatron_prm", "train", str(tmp_path / "run.json"), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, package: str, feature: str, how: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if package in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"megatron-prm train: error: {feature} needs the package {package}")
    assert how in errors[0]


def test_tensorboard_dir_without_tensorboard(tmp_path):
    result = _train_without("tensorboard", tmp_path, "--tensorboard_dir", str(tmp_path / "tb"))
    _assert_one_line_error(result, "tensorboard", "tensorboard_dir", "pip install tensorboard")
    assert not (tmp_path / "tb").exists()


def test_fp8_without_transformer_engine(tmp_path):
    result = _train_without("transformer_engine", tmp_path, "--fp8", "hybrid", "--bf16", "true")
    _assert_one_line_error(result, "transformer_engine", "fp8", "NVIDIA's PyTorch containers")
    assert not (tmp_path / "run").exists()  # refused before anything is written to output_dir


def test_training_needs_no_apex(tmp_path):
    """Nothing needs Apex: Megatron-Core falls back to torch's optimizer and norms."""
    result = _train_without("apex", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "apex" not in result.stderr.lower()
    assert [event["step"] for event in read_log(tmp_path / "run", "train")] == [1]
