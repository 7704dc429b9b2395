"""What produced a run: package versions, the source revision, the command line and the resolved config.

Each launch of a run directory (the first and every resume) appends one JSON line to
``output_dir/provenance.jsonl``; ``output_dir/config.json`` holds the latest resolved config in the form
``megatron-prm train`` reads back.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

from megatron_prm import strict_json
from megatron_prm.config import RunConfig

PROVENANCE_FILE = "provenance.jsonl"
_PACKAGES = ("megatron-prm", "torch", "megatron-core", "transformer-engine", "transformers", "numpy")


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions (None for a package that is absent)."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["transformer-engine"] is None:  # NVIDIA's containers install it under its module name
        try:
            import transformer_engine

            versions["transformer-engine"] = getattr(transformer_engine, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - absent or broken: not there
            pass
    return versions


def source_revision() -> dict[str, Optional[object]]:
    """The git commit of this package's source tree and whether it has uncommitted changes (None
    outside a git checkout, e.g. a wheel install)."""
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"git_sha": None, "git_dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def record_launch(config: RunConfig, world_size: int) -> dict:
    """Append this launch's provenance to the run directory and write the resolved config."""
    output_dir = Path(config.training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir / "config.json")
    entry = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.orig_argv,  # the interpreter's own argv: `python -m megatron_prm train ...` as run
        "cwd": os.getcwd(),
        "world_size": world_size,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": platform.node(),
        "versions": package_versions(),
        **source_revision(),
        "config": config.to_flat_dict(),
    }
    with open(output_dir / PROVENANCE_FILE, "a", encoding="utf-8") as handle:
        handle.write(strict_json.dumps(entry, ensure_ascii=False) + "\n")
    return entry
