"""``train`` started from a Hugging Face model: ``model_name_or_path`` may name an HF model directory or a
Hub ID, which the first rank imports once into ``output_dir/base_model`` (what ``convert-hf import`` writes)
while the others wait; the run then starts from that checkpoint, and a restart or resume reuses it."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.conversion.importer import hf_model_directory, import_hf
from megatron_prm.hub import is_hub_id
from megatron_prm.run_directory import BASE_MODEL_DIR, is_megatron_run_or_checkpoint

SOURCE_FILE = "imported_from.json"  # inside base_model: the model_name_or_path it was imported from


def is_hf_model(name_or_path: str) -> bool:
    """A Hub ID, or a directory with an HF ``config.json`` that is not a megatron-prm run or checkpoint."""
    path = Path(name_or_path)
    if not path.exists():
        return is_hub_id(name_or_path)
    return path.is_dir() and (path / "config.json").is_file() and not is_megatron_run_or_checkpoint(path)


def _imported_from(base: Path) -> str:
    try:
        return json.loads((base / SOURCE_FILE).read_text())["model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown model"


def start_from_hf_model(config: RunConfig, rank: int, poll_s: float = 1.0) -> RunConfig:
    """``config`` itself, or (its model_name_or_path an HF model) ``config`` starting from the import of it."""
    source = config.model.model_name_or_path
    if not source or not is_hf_model(source):
        return config
    base = Path(config.training.output_dir) / BASE_MODEL_DIR
    if rank == 0 and not base.exists():
        print(f"importing {source} into {base} (once: a restart reuses it)", flush=True)
        import_hf(hf_model_directory(source, "model_name_or_path"), base, config.parallel.tensor_parallel_degree,
                  config.parallel.pipeline_parallel_degree, extra_files={SOURCE_FILE: {"model_name_or_path": source}})
    while not base.exists():  # the import appears complete or not at all (staged_output)
        time.sleep(poll_s)
    imported_from = _imported_from(base)
    if imported_from != source:
        raise ConfigError(f"{base} holds the import of {imported_from}, not of model_name_or_path {source}; choose "
                          "another output_dir")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, model_name_or_path=str(base)))
