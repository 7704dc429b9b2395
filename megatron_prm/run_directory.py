"""The layout of a run directory: ``iter_NNNNNNN`` checkpoints, the ``latest`` pointer, staging, pruning.

``output_dir/iter_NNNNNNN/`` is one complete checkpoint; ``output_dir/latest`` holds the name of the newest
one. A checkpoint is written under ``iter_NNNNNNN.tmp`` and published by :func:`publish_checkpoint`, which
keeps one invariant through a SIGKILL at any instant: ``latest`` names a complete checkpoint (or, for the
instant between two renames, the staging name of one whose final rename has happened, which
:func:`resolve_checkpoint` follows).

Paths read from files stay inside the run directory: ``latest`` may only hold a checkpoint name, never a
path, and a checkpoint that is a symbolic link out of the directory is refused.

This module knows names and directories only; what a checkpoint holds is ``checkpoint.py``'s business.
"""

from __future__ import annotations

import json

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from megatron_prm.config import ConfigError

LATEST = "latest"
MODEL_CONFIG_NAME = "model_config.json"
DCP_METADATA_NAME = ".metadata"
_STAGING_SUFFIX = ".tmp"
_ASIDE_SUFFIX = ".old"
_CHECKPOINT = re.compile(r"^iter_(\d{7,})$")
_LATEST_VALUE = re.compile(r"^iter_\d{7,}(\.tmp)?$")
EARLIER_RUN_PREFIX = "earlier_run_"
ROLLED_BACK_PREFIX = "rolled_back_"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted or used; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a complete checkpoint's directory name; None for any other name."""
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """The complete checkpoints of ``run_dir`` by step (staging and moved-aside directories excluded)."""
    found = {}
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        step = checkpoint_step(path.name)
        if step is not None and path.is_dir():
            found[step] = path
    return dict(sorted(found.items()))


# ------------------------------------------------------------------------------------------ reading


def _inside(path: Path, run_dir: Path, what: Path) -> Path:
    resolved, root = path.resolve(), run_dir.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(f"{what} leads out of the run directory {run_dir} (to {resolved}); refused")
    return path


def read_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``run_dir/latest`` names, confined to ``run_dir``; None without a ``latest``."""
    pointer = run_dir / LATEST
    if pointer.is_symlink():
        raise CheckpointError(f"{pointer} is a symbolic link; a run directory's latest must be a plain file")
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{pointer} cannot be read as text: {err}") from err
    if not _LATEST_VALUE.match(name):
        raise CheckpointError(f"{pointer} holds {name[:80]!r}; it must name a checkpoint of this directory "
                              "(iter_NNNNNNN), never a path")
    target = run_dir / name
    if name.endswith(_STAGING_SUFFIX) and not target.exists():
        target = run_dir / name[: -len(_STAGING_SUFFIX)]  # killed between the final rename and latest's update
    return _inside(target, run_dir, pointer)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the one its ``latest`` file names."""
    path = Path(path)
    latest = read_latest(path) if path.is_dir() else None
    if latest is not None:
        path = latest
    if not (path / DCP_METADATA_NAME).is_file() or not (path / MODEL_CONFIG_NAME).is_file():
        hint = ""
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            hint = ("; it is a Hugging Face model directory: `megatron-prm score --hf` reads it as it is, and "
                    "`megatron-prm convert-hf import --hf DIR --out CHECKPOINT` converts it for training")
        raise CheckpointError(f"{path} is not a megatron-prm checkpoint (no {DCP_METADATA_NAME} / "
                              f"{MODEL_CONFIG_NAME}){hint}")
    return path


def is_megatron_run_or_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a megatron-prm run directory (a ``latest`` file) or checkpoint."""
    return (path / "latest").is_file() or (path / MODEL_CONFIG_NAME).is_file()


def checkpoint_in_run(run_dir: Path, name: str, what: str) -> Path:
    """``run_dir/name`` for a checkpoint name read from a file (``what``), refusing anything but a name."""
    if checkpoint_step(name) is None:
        raise CheckpointError(f"{what} holds {name[:80]!r}, not a checkpoint name (iter_NNNNNNN)")
    return _inside(run_dir / name, run_dir, Path(what))


# ------------------------------------------------------------------------------------------ writing


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / (checkpoint_name(step) + _STAGING_SUFFIX)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + _STAGING_SUFFIX)
    tmp.write_text(text)
    tmp.replace(path)


def publish_checkpoint(staging: Path) -> Path:
    """Make the complete checkpoint in ``staging`` (``iter_N.tmp``) the run's ``iter_N`` and ``latest``.

    A new step is one rename and then ``latest``. Re-saving an existing step swaps atomically: ``latest``
    first names the complete staging directory, the old ``iter_N`` is moved aside, the staging directory
    renamed in, ``latest`` rewritten, and only then the old one deleted. A kill at any point leaves
    ``latest`` naming a complete checkpoint.
    """
    run_dir = staging.parent
    final = run_dir / staging.name[: -len(_STAGING_SUFFIX)]
    if final.exists():
        aside = final.with_name(final.name + _ASIDE_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)  # left by a kill during an earlier swap
        _write_atomically(run_dir / LATEST, staging.name + "\n")
        final.rename(aside)
        staging.rename(final)
        _write_atomically(run_dir / LATEST, final.name + "\n")
        shutil.rmtree(aside)
    else:
        staging.rename(final)
        _write_atomically(run_dir / LATEST, final.name + "\n")
    return final


def prune_checkpoints(run_dir: Path, keep: int, own: Iterable[int], protect: Iterable[Optional[str]] = ()) -> list[str]:
    """Remove the oldest of this run's checkpoints (steps ``own``) beyond ``keep``, ordered by step.

    Never touches another run's checkpoint, the one ``latest`` names, or a name in ``protect`` (the best).
    """
    latest = read_latest(run_dir)
    kept_names = {name for name in protect if name} | ({latest.name} if latest is not None else set())
    mine = [path for step, path in checkpoints(run_dir).items() if step in set(own)]
    removable = [path for path in mine[:-keep] if path.name not in kept_names] if keep > 0 else []
    for path in removable:
        shutil.rmtree(path)
    return [path.name for path in removable]


# --------------------------------------------------------------------------------- the run directory


# The HF model a run names as model_name_or_path, imported once (conversion/auto_import.py): an input of
# the runs in the directory, not an output of an earlier one, so never moved aside or counted as one.
BASE_MODEL_DIR = "base_model"


def _earlier_files(run_dir: Path) -> list[str]:
    inputs = (BASE_MODEL_DIR, f".{BASE_MODEL_DIR}.partial")
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(EARLIER_RUN_PREFIX)
                  and p.name not in inputs)


# What a launch writes before its first step (provenance.py, run_logger.py, and the token stores and
# packing plans of data/store_cache.py, which a later run of the same data reuses).
START_FILES = frozenset({"config.json", "provenance.jsonl", "log.jsonl", "data_cache"})


def only_a_start_that_never_trained(run_dir: Path, present: list[str]) -> bool:
    """Whether ``run_dir`` holds nothing but what a launch that stopped before its first step wrote (a bad
    setting found after the directory was made): no checkpoint, no step or evaluation in its log."""
    if not set(present) <= START_FILES:
        return False
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return True
    with open(log, encoding="utf-8", errors="replace") as handle:
        return not any(_event_kind(line) in ("train", "eval") for line in handle)


def _event_kind(line: str) -> Optional[str]:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event.get("kind") if isinstance(event, dict) else None


def check_output_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a directory that holds files, unless ``overwrite`` or they are only
    the files of a start that never trained (the new run writes its config over theirs and appends to
    their provenance and log); read-only, so every rank can run it before any collective."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory")
    if resuming or overwrite or not run_dir.is_dir():
        return
    present = _earlier_files(run_dir)
    if present and not only_a_start_that_never_trained(run_dir, present):
        raise ConfigError(
            f"output_dir {run_dir} is not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
            "resume with resume_from_checkpoint (latest / auto), choose another output_dir, or set "
            "overwrite_output_dir: true (the earlier files are moved aside, not deleted)"
        )


def move_later_checkpoints_aside(run_dir: Path, resumed: Path) -> tuple[Optional[Path], list[str]]:
    """A resume in ``run_dir`` from its checkpoint ``resumed`` while later ones exist (a rollback, say after
    a loss spike): the resumed run would overwrite and prune them. ``latest`` first names ``resumed``, then
    the later checkpoints move into ``rolled_back_<UTC time>/`` inside the run directory, kept whole. A kill
    in between leaves ``latest`` naming a complete checkpoint, and the next resume moves what is left.
    Returns that directory and the names moved (None and [] when there were none)."""
    step = checkpoint_step(resumed.name)
    if step is None:
        return None, []
    later = [path.name for later_step, path in checkpoints(run_dir).items() if later_step > step]
    if not later:
        return None, []
    _write_atomically(run_dir / LATEST, resumed.name + "\n")
    return _move_into_new_directory(run_dir, ROLLED_BACK_PREFIX, later), later


def move_earlier_run_aside(run_dir: Path) -> Optional[Path]:
    """``overwrite_output_dir``: move what ``run_dir`` holds into ``earlier_run_<UTC time>/`` inside it, so
    that nothing of the earlier run is deleted, pruned or mixed with the new run's checkpoints."""
    present = _earlier_files(run_dir) if run_dir.is_dir() else []
    if not present:
        return None
    return _move_into_new_directory(run_dir, EARLIER_RUN_PREFIX, present)


def _move_into_new_directory(run_dir: Path, prefix: str, names: list[str]) -> Path:
    """Move ``names`` of ``run_dir`` into a new ``<prefix><UTC time>/`` inside it; returns that directory."""
    aside = run_dir / (prefix + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f"))
    aside.mkdir()
    for name in names:
        (run_dir / name).rename(aside / name)
    return aside
