"""Optional packages: a feature that needs one imports it through :func:`require`.

Without the package the feature stops with one line that names the package and how to get it (a
:class:`MissingDependency`, which the command line reports like any configuration error), never with a
traceback. Everything else runs without these packages.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from megatron_prm.config import ConfigError

HOW_TO_GET = {
    "transformer_engine": "it ships with NVIDIA's PyTorch containers (nvcr.io/nvidia/pytorch); elsewhere "
    "`pip install --no-build-isolation transformer_engine[pytorch]` on a CUDA machine",
    "apex": "NVIDIA Apex ships with NVIDIA's PyTorch containers (nvcr.io/nvidia/pytorch); the PyPI package "
    "named apex is unrelated",
    "tensorboard": "`pip install tensorboard` (or `pip install -e '.[tensorboard]'`)",
    "wandb": "`pip install wandb` (or `pip install -e '.[wandb]'`)",
}


class MissingDependency(ConfigError):
    """A feature was asked for whose optional package is not installed (or does not import)."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` (what the user asked for, e.g. ``"tensorboard_dir"``).

    A package that is absent or fails to import (a broken install counts as absent) raises
    :class:`MissingDependency` naming the feature, the package and how to install it.
    """
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install (missing CUDA library, ...) counts as absent
        package = module.split(".")[0]
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingDependency(
            f"{feature} needs the package {package}, which cannot be imported ({reason}); "
            f"{HOW_TO_GET.get(package, f'`pip install {package}`')}"
        ) from None
