"""Hugging Face Hub IDs wherever a model or tokenizer path is taken.

A path that exists is used as it is. Otherwise a name of the Hub's form (``owner/name``) is found in the
Hub cache through ``huggingface_hub`` (``HF_HOME`` / ``HF_HUB_CACHE`` say where; ``HF_HUB_OFFLINE=1``
keeps it to the cache, else what is missing is downloaded), fetching only the files the caller needs.
Anything else, or a Hub lookup that fails, is one line with the ``hf download`` command to run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from megatron_prm.config import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")



class NotFoundError(ConfigError):
    """A model or tokenizer that is neither a local path nor in reach on the Hugging Face Hub."""


def download_hint(name: str) -> str:
    target = name.split("/")[-1] if HUB_ID.match(name) else "DIR"
    repo = name if HUB_ID.match(name) else "OWNER/NAME"
    return f"download it first: hf download {repo} --local-dir models/{target}"


def is_hub_id(name_or_path: str) -> bool:
    """``owner/name`` that is not a path here."""
    return bool(HUB_ID.match(name_or_path)) and not Path(name_or_path).exists()


def local_path(name_or_path: str, what: str, patterns: Sequence[str]) -> Path:
    """The local file or directory behind ``name_or_path``: the path itself, or the Hub cache's snapshot of
    the repository ``name_or_path`` holding (at least) the files matching ``patterns``. ``what`` names the
    argument in the error."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if not HUB_ID.match(name_or_path):
        raise NotFoundError(f"{what} {name_or_path}: no such file or directory; for a Hugging Face Hub model, "
                            f"{download_hint(name_or_path)}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns)))
    except (OSError, ValueError) as err:  # not cached offline, unknown or gated repository, no network
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotFoundError(f"{what} {name_or_path}: not a local path, and the Hugging Face Hub lookup failed "
                            f"({reason}); {download_hint(name_or_path)}") from err
