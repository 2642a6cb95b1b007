"""ArrayRecord codec (for JAX / Grain): each record is the same serialized tf.train.Example as in TFRecord
(schemas._tfrecord.encode_example), stored with group_size:1 so any record is readable by index
(array_record's ArrayRecordDataSource, which Grain uses). Imports array_record lazily; reading parses the
Examples with schemas._example (no TensorFlow).

Integrity: the file is Riegeli; every chunk header and payload carries a hash that the reader checks,
so a flipped byte inside data or index raises. A truncated file loses its footer (the index), and the
reader then opens "not ok" with no records; `serialized_batches` turns that into an error, and callers
compare the record count with the manifest's. Bytes the reader never decodes (block padding) are only
covered by the shard's sha256, which schemas.read and verify check by default.
"""
from __future__ import annotations

import errno
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import _example
from ._schema import Schema
from ._split import locate
from ._tfrecord import encode_example

WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access; other options are array_record's defaults


def _os_error(e: RuntimeError, path: str) -> OSError:
    """array_record's RuntimeError ('write() failed: No space left on device; writing PATH; ...') as the
    OSError it stands for, so writers report it like the other formats' (schemas.OutputWriteError)."""
    text = str(e)
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EMFILE):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code), path)
    return OSError(errno.EIO, f"ArrayRecord writer failed: {text.splitlines()[0] if text else type(e).__name__}", path)


def write(path: str, serialized: Iterable[bytes]) -> int:
    """Write serialized records to `path` (overwriting it); returns their count. A failing write (disk full,
    file too large) raises OSError with its errno, whether array_record reports it while writing or
    only when closing (it buffers a chunk, so a full disk often shows first at close)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    try:
        writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    except RuntimeError as e:
        raise _os_error(e, path) from e
    n = 0
    try:
        for s in serialized:
            writer.write(s)  # raises RuntimeError once the writer has failed
            n += 1
        if not writer.ok():
            raise OSError(errno.EIO, "ArrayRecord writer failed", path)
    except RuntimeError as e:
        raise _os_error(e, path) from e
    finally:
        try:
            writer.close()
        except RuntimeError as e:  # the error of a failed writer, again, or the first one seen (at close)
            failing = _os_error(e, path)
        else:
            failing = None
    if failing is not None:
        raise failing
    return n


def write_records(path: str, batches: Iterable[list], schema: Schema) -> int:
    """Validated record batches -> an ArrayRecord shard of serialized Examples; returns the record count."""
    return write(path, (encode_example(r, schema) for batch in batches for r in batch))


def serialized_batches(path: str, batch_size: int) -> Iterator[list[bytes]]:
    """The file's serialized records in order, `batch_size` at a time. RuntimeError (or ValueError) when the
    file cannot be opened (missing footer: truncated) or a chunk fails its hash (corrupt)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        if not reader.ok():
            raise ValueError("ArrayRecord reader cannot open the file (index footer missing or corrupt: "
                             "truncated or damaged)")
        total = reader.num_records()
        for start in range(0, total, batch_size):
            yield reader.read(start, min(start + batch_size, total))
    finally:
        reader.close()


def read_records(path: str, schema: Schema, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Records of an ArrayRecord shard as numpy dicts (schemas.read's dtypes), without TensorFlow."""
    n = 0
    for batch in serialized_batches(path, batch_size):
        yield from _example.records(_example.parse(batch, schema, first=n), len(batch))
        n += len(batch)


def field_names(path: str) -> tuple[str, ...]:
    """Feature names of the shard's first record (empty for an empty shard)."""
    first = next(serialized_batches(path, 1), [])
    return tuple(_example.field_names(first[0])) if first else ()


class RandomAccess:
    """Records of ArrayRecord shards by global index (record i of the shards in the given order), decoded
    to numpy dicts: len(), [i], .getitems(indices), close() (or `with`). Opening checks each shard's
    footer; a chunk that fails its hash raises when read."""

    def __init__(self, paths: Sequence[str], schema: Schema):
        from array_record.python.array_record_module import ArrayRecordReader

        self.schema = schema
        self._readers = []
        self._starts = [0]
        try:
            for p in paths:
                reader = ArrayRecordReader(os.fspath(p), "readahead_buffer_size:0")
                self._readers.append(reader)
                if not reader.ok():
                    raise ValueError(f"{os.path.basename(p)}: ArrayRecord reader cannot open the file (index footer "
                                     "missing or corrupt)")
                self._starts.append(self._starts[-1] + reader.num_records())
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.getitems([index])[0]

    def getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        located = [locate(i, self._starts) for i in indices]
        raw = [self._readers[s].read([j])[0] for s, j in located]
        return list(_example.records(_example.parse(raw, self.schema), len(raw)))

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __enter__(self) -> "RandomAccess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
