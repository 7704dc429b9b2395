"""A memory-mapped store of tokenized samples, and the in-memory equivalent.

``megatron-prm preprocess --output-prefix P`` writes

- ``P.tokens.bin``: every sample's token ids, concatenated (uint16 when the vocabulary fits, else int32);
- ``P.labels.bin``: every labelled position as (position int32, P(good) float32, step int32);
- ``P.offsets.npy``: int64 ``[N + 1, 2]`` start of each sample's tokens and labels;
- ``P.records.npy``: int64 ``[N]`` the source record index of each sample;
- ``P.meta.json``: the sidecar: tokenizer identity, placeholder and reward ids, the options the samples
  were built with, and the counts. It is written last, so a store without it is incomplete.

The trainer keeps only the offsets in memory and reads a sample's bytes with ``pread`` when a batch
needs it, so its memory does not grow with the store (memory-mapping the files instead would count
every page the kernel maps around each access, read-ahead included, as the trainer's resident memory). A store is refused when it was built with another tokenizer,
other special tokens, other truncation options or another tokenization (``whole_text`` / ``per_step``,
recorded in the sidecar's identity) than the run asks for.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron_prm.config import LEGACY_TOKENIZATION
from megatron_prm.data.samples import Sample

STORE_VERSION = 1
LABEL_DTYPE = np.dtype([("position", "<i4"), ("value", "<f4"), ("step", "<i4")])
_PARTS = (".tokens.bin", ".labels.bin", ".offsets.npy", ".records.npy")
META_SUFFIX = ".meta.json"
STORE_FILES = (*_PARTS, META_SUFFIX)  # every file of a store, by suffix


class StoreError(ValueError):
    """A store that is incomplete or does not match the run."""


@dataclass(frozen=True)
class StoreIdentity:
    """What a store's samples depend on; a run must ask for exactly this to use the store."""

    tokenizer_fingerprint: str
    vocab_size: int
    placeholder_token: str
    placeholder_id: int
    reward_tokens: str
    reward_ids: tuple[int, int]
    max_seq_len: int
    max_prompt_len: int
    process_reward: bool
    apply_chat_template: bool = False  # absent from stores written before chat prompts existed
    system_prompt: Optional[str] = None
    chat_template_digest: Optional[str] = None  # with apply_chat_template: which template rendered the prompts
    tokenization: str = LEGACY_TOKENIZATION  # absent from stores written before whole_text existed


def store_prefix(path: str | Path) -> Optional[Path]:
    """The prefix of the store that ``path`` names (the prefix itself or its sidecar), or None."""
    text = str(path)
    if text.endswith(META_SUFFIX):
        text = text[: -len(META_SUFFIX)]
    return Path(text) if Path(text + META_SUFFIX).is_file() else None


class InMemorySamples(Sequence[Sample]):
    """Samples held in a list, with the same interface as :class:`TokenStore`."""

    def __init__(self, samples: list[Sample]):
        self._samples = samples
        self.lengths = np.asarray([len(s) for s in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]

    def good_share(self) -> float:
        """Share of labelled steps whose target P(good) is at least 0.5."""
        values = np.concatenate([s.label_values for s in self._samples]) if self._samples else np.zeros(0)
        return float((values >= 0.5).mean()) if values.size else 1.0


class TokenStore(Sequence[Sample]):
    """A preprocessed store opened read-only with memory maps."""

    def __init__(self, prefix: str | Path):
        prefix = Path(prefix)
        meta_path = Path(str(prefix) + META_SUFFIX)
        if not meta_path.is_file():
            raise StoreError(f"{prefix}: no {META_SUFFIX} sidecar; not a complete store")
        self.prefix = prefix
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("store_version") != STORE_VERSION:
            raise StoreError(f"{meta_path}: store version {self.meta.get('store_version')} is not {STORE_VERSION}")
        self.identity = StoreIdentity(**{**self.meta["identity"], "reward_ids": tuple(self.meta["identity"]["reward_ids"])})
        for suffix in _PARTS:
            if not Path(str(prefix) + suffix).is_file():
                raise StoreError(f"{prefix}{suffix} is missing")
        self._offsets = _Column.from_npy(str(prefix) + ".offsets.npy", np.dtype([("tokens", "<i8"), ("labels", "<i8")]))
        self._records = _Column.from_npy(str(prefix) + ".records.npy", np.dtype("<i8"))
        self._tokens = _Column(str(prefix) + ".tokens.bin", np.dtype(self.meta["token_dtype"]))
        self._labels = _Column(str(prefix) + ".labels.bin", LABEL_DTYPE)
        end = self._offsets.read(len(self._offsets) - 1, len(self._offsets))[0]
        if len(self._tokens) != end["tokens"] or len(self._labels) != end["labels"]:
            raise StoreError(f"{prefix}: the token or label file does not match the offsets (truncated copy?)")
        self._lengths: Optional[np.ndarray] = None

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sample (read on first use: training from a store does not need it)."""
        if self._lengths is None:
            self._lengths = np.diff(self._offsets.read(0, len(self._offsets))["tokens"])
        return self._lengths

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        start, stop = self._offsets.read(index, index + 2)
        labels = self._labels.read(start["labels"], stop["labels"])
        return Sample(
            input_ids=self._tokens.read(start["tokens"], stop["tokens"]).astype(np.int32),
            label_positions=labels["position"].copy(),
            label_values=labels["value"].copy(),
            step_ids=labels["step"].copy(),
            record_index=int(self._records.read(index, index + 1)[0]),
        )

    def good_share(self) -> float:
        """Share of labelled steps whose target P(good) is at least 0.5 (read in chunks)."""
        good, chunk = 0, 1 << 20
        for start in range(0, len(self._labels), chunk):
            good += int((self._labels.read(start, min(start + chunk, len(self._labels)))["value"] >= 0.5).sum())
        return good / len(self._labels) if len(self._labels) else 1.0

    def check_matches(self, expected: StoreIdentity) -> None:
        """Refuse a store built differently from what the run asks for, naming every difference."""
        found = asdict(self.identity)
        wanted = asdict(expected)
        differences = [f"{key}: store has {found[key]!r}, run asks for {wanted[key]!r}"
                       for key in wanted if found[key] != wanted[key]]
        if differences:
            raise StoreError(
                f"{self.prefix} was preprocessed differently from this run ("
                + "; ".join(differences) + "); preprocess the data again with this run's settings"
            )


class _Column:
    """A flat binary array on disk, read by element ranges with ``pread``."""

    def __init__(self, path: str, dtype: np.dtype, header_bytes: int = 0):
        self.path = path
        self.dtype = dtype
        self._header = header_bytes
        self._fd = os.open(path, os.O_RDONLY)
        self._length = (os.fstat(self._fd).st_size - header_bytes) // dtype.itemsize

    @classmethod
    def from_npy(cls, path: str, dtype: np.dtype) -> "_Column":
        """The data of a C-ordered ``.npy`` array, rows viewed as ``dtype``."""
        mapped = np.load(path, mmap_mode="r")  # reads the header only; no data page is touched
        row_bytes = mapped.dtype.itemsize * int(np.prod(mapped.shape[1:]))
        if not mapped.flags.c_contiguous or row_bytes != dtype.itemsize:
            raise StoreError(f"{path}: unexpected array layout {mapped.shape} {mapped.dtype}")
        header = mapped.offset
        del mapped
        return cls(path, dtype, header)

    def __len__(self) -> int:
        return self._length

    def read(self, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize
        data = os.pread(self._fd, (stop - start) * size, self._header + start * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class TokenStoreWriter:
    """Appends samples to temporary files; :meth:`finish` renames them and writes the sidecar last."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.token_dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
        self._tokens = open(self._tmp(".tokens.bin"), "wb")
        self._labels = open(self._tmp(".labels.bin"), "wb")
        self._offsets = [(0, 0)]
        self._records: list[int] = []

    def _tmp(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}.tmp"

    def add(self, sample: Sample) -> None:
        self._tokens.write(sample.input_ids.astype(self.token_dtype).tobytes())
        labels = np.empty(len(sample.label_positions), dtype=LABEL_DTYPE)
        labels["position"], labels["value"], labels["step"] = sample.label_positions, sample.label_values, sample.step_ids
        self._labels.write(labels.tobytes())
        tokens, positions = self._offsets[-1]
        self._offsets.append((tokens + len(sample), positions + len(labels)))
        self._records.append(sample.record_index)

    def add_all(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.add(sample)

    def add_arrays(self, tokens: np.ndarray, labels: np.ndarray, sample_tokens: np.ndarray,
                   sample_labels: np.ndarray, records: np.ndarray) -> None:
        """Many samples at once: their token ids and labels (``LABEL_DTYPE``) back to back, how many of
        each every sample has, and their record indices (for stores written from arrays, not records)."""
        self._tokens.write(np.asarray(tokens).astype(self.token_dtype).tobytes())
        self._labels.write(np.asarray(labels, dtype=LABEL_DTYPE).tobytes())
        tokens_end, labels_end = self._offsets[-1]
        ends = zip((tokens_end + np.cumsum(sample_tokens)).tolist(), (labels_end + np.cumsum(sample_labels)).tolist())
        self._offsets.extend(ends)
        self._records.extend(np.asarray(records).tolist())

    def finish(self, identity: StoreIdentity, extra: dict) -> dict:
        self._tokens.close()
        self._labels.close()
        for suffix, values in ((".offsets.npy", self._offsets), (".records.npy", self._records)):
            with open(self._tmp(suffix), "wb") as handle:
                np.save(handle, np.asarray(values, dtype=np.int64))
        meta_path = Path(f"{self.prefix}{META_SUFFIX}")
        meta_path.unlink(missing_ok=True)  # an older store at this prefix stops being complete first
        for suffix in _PARTS:
            os.replace(self._tmp(suffix), f"{self.prefix}{suffix}")
        meta = {
            "store_version": STORE_VERSION,
            "identity": asdict(identity),
            "token_dtype": self.token_dtype.name,
            "samples": len(self._records),
            "tokens": self._offsets[-1][0],
            "labelled_positions": self._offsets[-1][1],
            **extra,
        }
        Path(self._tmp(META_SUFFIX)).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(self._tmp(META_SUFFIX), meta_path)
        return meta

    def abort(self) -> None:
        """Close and remove the temporary files (on an error before :meth:`finish`)."""
        self._tokens.close()
        self._labels.close()
        for suffix in (*_PARTS, META_SUFFIX):
            Path(self._tmp(suffix)).unlink(missing_ok=True)
