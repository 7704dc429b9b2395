"""An output directory that appears complete or not at all."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from megatron_prm.config import ConfigError


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield a sibling staging directory; rename it to ``final`` on success, remove it on any error
    (including Ctrl-C), so that no partial output is ever left under the final name."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"{final} already exists and is not empty; choose another output directory")
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()
    staging.rename(final)
