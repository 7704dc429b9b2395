"""The one path guard of every command that writes: an output never destroys an input.

Every command checks its outputs here before it reads or computes anything, so a refused output costs
nothing and leaves nothing behind. An output may not be one of the command's inputs, replace a file inside
an input directory, add a file to a checkpoint directory (its manifest seals it), or hold an input (an
output directory that contains it); its temporary sibling (the
``NAME.tmp`` it is written under before the rename) may not be an input either. A directory where a
file is expected, a file where a directory is expected, and a parent that is a file are one-line
errors. An existing store is replaced only when the command is told to (``--overwrite``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from megatron_prm.config import ConfigError


class OutputError(ConfigError):
    """An output path that would destroy an input, or cannot be written; the message names both."""


def _absolute(path: Path) -> Path:
    """``path`` made absolute with symbolic links followed as far as they exist."""
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symbolic links too
    except OSError:
        return _absolute(a) == _absolute(b)


def _within(inner: Path, outer: Path) -> bool:
    inner, outer = _absolute(inner), _absolute(outer)
    return inner == outer or outer in inner.parents


def _check_parents(path: Path, what: str) -> None:
    """Refuse a path whose existing ancestor is a file (``out.jsonl/scores.jsonl``)."""
    for parent in _absolute(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what} {path}: {parent} is a file, not a directory")
            return


# Files that seal a directory as a checkpoint: nothing may be added to one (its manifest lists every file).
_SEALS = (".metadata", "manifest.json")


def _sealed_ancestor(path: Path, top: Path) -> Optional[Path]:
    """The checkpoint directory between ``path`` and ``top`` (inclusive) that ``path`` would be added to."""
    top = _absolute(top)
    for parent in _absolute(path).parents:
        if any((parent / seal).exists() for seal in _SEALS):
            return parent
        if parent == top:
            return None
    return None


def _check_against_inputs(written: Iterable[Path], inputs: Iterable[Optional[str | Path]], what: str,
                          shown: Path) -> None:
    for source in (Path(p) for p in inputs if p is not None and str(p)):
        for path in written:
            if path.exists() and source.exists() and _same(path, source) or _absolute(path) == _absolute(source):
                raise OutputError(f"{what} {shown} would overwrite the input {source}; choose another output")
            if source.is_dir() and _within(path, source):
                if path.exists():
                    raise OutputError(f"{what} {shown} would overwrite {path}, part of the input {source}; choose "
                                      "another output")
                sealed = _sealed_ancestor(path, source)
                if sealed is not None:
                    raise OutputError(f"{what} {shown} lies inside the checkpoint {sealed}, which its manifest seals; "
                                      "choose an output outside it")
            if _within(source, path):
                raise OutputError(f"{what} {shown} holds the input {source}; choose another output")


def check_output_file(output: str | Path, inputs: Iterable[Optional[str | Path]] = (), what: str = "--output") -> Path:
    """A file the command writes (under ``NAME.tmp``, then renamed): not an input, not a directory."""
    output = Path(output)
    if not str(output) or output.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(output)!r} does not name a file")
    _check_parents(output, what)
    if output.is_dir():
        raise OutputError(f"{what} {output} is a directory; name a file to write")
    _check_against_inputs([output, output.with_name(output.name + ".tmp")], inputs, what, output)
    return output


def check_output_dir(output: str | Path, inputs: Iterable[Optional[str | Path]] = (), what: str = "--output-dir") -> Path:
    """A directory the command creates or writes into: not a file, not an input, not inside or around one."""
    output = Path(output)
    _check_parents(output, what)
    if output.exists() and not output.is_dir():
        raise OutputError(f"{what} {output} is a file, not a directory")
    _check_against_inputs([output], inputs, what, output)
    return output


def check_output_prefix(prefix: str | Path, parts: Iterable[str], inputs: Iterable[Optional[str | Path]] = (),
                        overwrite: bool = False, what: str = "--output-prefix") -> Path:
    """A store's prefix: none of its files (``PREFIX`` + each of ``parts``) may be an input or a
    directory, and an existing store is replaced only with ``overwrite``."""
    prefix = Path(prefix)
    if not prefix.name or prefix.name in (".", ".."):
        raise OutputError(f"{what} {str(prefix)!r} does not end in a file name (the store is PREFIX.tokens.bin, ...)")
    _check_parents(prefix, what)
    files = [Path(f"{prefix}{suffix}") for suffix in parts]
    for path in files:
        if path.is_dir():
            raise OutputError(f"{what} {prefix}: {path} is a directory")
    _check_against_inputs([*files, *(Path(f"{p}.tmp") for p in files)], inputs, what, prefix)
    existing = [path.name for path in files if path.exists()]
    if existing and not overwrite:
        raise OutputError(f"{what} {prefix} names an existing store ({', '.join(existing[:3])}"
                          f"{', ...' if len(existing) > 3 else ''}); choose another prefix or pass --overwrite")
    return prefix
