"""`PackedDataset(dir)`: a packed dataset as a map-style dataset (len, [i]) for PyTorch DataLoader samplers,
Grain's MapDataset.source and any random-access consumer, over the formats with random access by record
index (the registry's `random_access`: Arrow IPC, memory-mapped; ArrayRecord, its indexed reader).

Each shard's sha256 is checked once, when the dataset is made, together with the file's identity
(device, inode, size, mtime); a process that reopens the shards later (a DataLoader worker, after
pickling or fork) checks that identity instead of hashing again, so a shard replaced or rewritten since
the check raises CorruptShard. Readers are opened per process and never pickled.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from . import _formats
from ._io import CorruptShard, _check_sha, read_manifest
from ._schema import Schema, SchemaError
from ._split import locate

_LOCK = threading.Lock()  # opening readers (once per shard and process)


def _new_lock() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at fork time would never be released in the child


os.register_at_fork(after_in_child=_new_lock)


class NoRandomAccess(SchemaError, ValueError):
    """The dataset's format has no random access by record index (TFRecord, Parquet)."""


def _identity(directory: str, file: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(os.path.join(directory, file))
    except FileNotFoundError:
        raise CorruptShard(file, "file is missing") from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class PackedDataset:
    """Records of a packed Arrow or ArrayRecord dataset by index: `len(ds)`, `ds[i]` (negative indices and
    IndexError as a list; `ds[a:b]` a list of records) equal to the i-th record of schemas.read(directory),
    with the same numpy dtypes. Thread-safe reads; pickles cheaply (directory, manifest entries and file
    identities, no readers): each process reopens the shards it reads. TFRecord and Parquet datasets are
    refused (NoRandomAccess, a SchemaError and ValueError)."""

    def __init__(self, directory: str | os.PathLike, *, check_sha256: bool = True):
        self.directory = os.fspath(directory)
        manifest = read_manifest(self.directory)
        self.format = manifest["format"]
        if _formats.get(self.format).random_access is None:
            usable = ", ".join(f.name for f in _formats.REGISTRY.values() if f.random_access)
            raise NoRandomAccess(f"PackedDataset needs random access by record index, which {self.format} shards do not "
                                 f"have; it reads {usable} (navit-pack --format {usable.split(', ')[0]}), or use "
                                 "schemas.read / tf_dataset for sequential reading")
        self.schema = Schema.from_manifest(manifest)
        self._files = [s["file"] for s in manifest["shards"]]
        self._counts = [int(s["num_sequences"]) for s in manifest["shards"]]
        self._starts = list(np.cumsum([0] + self._counts).tolist())
        self._identities = []
        for shard in manifest["shards"]:
            before = _identity(self.directory, shard["file"])
            if check_sha256:
                _check_sha(self.directory, shard)
                if _identity(self.directory, shard["file"]) != before:
                    raise CorruptShard(shard["file"], "changed while its sha256 was checked")
            self._identities.append(before)
        self._readers: list[Any] = []
        self._pid: int | None = None
        for k in range(len(self._files)):  # open now, so a damaged shard is refused here, not at its first read
            self._reader(k)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        k, j = locate(index, self._starts)
        try:
            return self._reader(k)[j]
        except (CorruptShard, IndexError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - every library error on a shard means a bad shard
            raise CorruptShard(self._files[k], f"{type(e).__name__}: {e}") from e

    def _reader(self, k: int) -> Any:
        """Shard k's random-access reader in this process, opened on first use."""
        if self._pid != os.getpid():  # a new process (fork or unpickled): never use another process's readers
            with _LOCK:
                if self._pid != os.getpid():
                    self._readers = [None] * len(self._files)
                    self._pid = os.getpid()
        reader = self._readers[k]
        if reader is None:
            with _LOCK:
                reader = self._readers[k]
                if reader is None:
                    reader = self._readers[k] = self._open(k)
        return reader

    def _open(self, k: int) -> Any:
        file = self._files[k]
        try:
            reader = _formats.get(self.format).random_access([os.path.join(self.directory, file)], self.schema)
        except Exception as e:  # noqa: BLE001 - every library error on a shard means a bad shard
            raise CorruptShard(file, f"{type(e).__name__}: {e}") from e
        problem = None
        if _identity(self.directory, file) != self._identities[k]:  # after opening: the file the reader holds
            problem = "replaced or modified since the dataset checked it"
        elif len(reader) != self._counts[k]:
            problem = f"holds {len(reader)} records, the manifest says {self._counts[k]}"
        if problem:
            reader.close()
            raise CorruptShard(file, problem)
        return reader

    def close(self) -> None:
        """Close this process's readers (they reopen on the next read)."""
        with _LOCK:
            for r in self._readers:
                if r is not None:
                    r.close()
            self._readers = [None] * len(self._files)

    def __enter__(self) -> "PackedDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _readers=[], _pid=None)

    def __repr__(self) -> str:
        return f"PackedDataset({self.directory!r}, format={self.format!r}, records={len(self)}, shards={len(self._files)})"

