"""ArrayRecord codec (for JAX / Grain): each record is the same serialized tf.train.Example as in TFRecord
(schemas._tfrecord.encode_example), stored with group_size:1 so any record is readable by index
(array_record's ArrayRecordDataSource, which Grain uses). Imports array_record lazily.

Integrity: the file is Riegeli; every chunk header and payload carries a hash that the reader checks,
so a flipped byte inside data or index raises. A truncated file loses its footer (the index), and the
reader then opens "not ok" with no records; `serialized_batches` turns that into an error, and callers
compare the record count with the manifest's. Bytes the reader never decodes (block padding) are only
covered by the shard's sha256, which schemas.read and verify check by default.
"""
from __future__ import annotations

from typing import Iterable, Iterator

WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access; other options are array_record's defaults


def write(path: str, serialized: Iterable[bytes]) -> int:
    """Write serialized records to `path` (overwriting it); returns their count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    n = 0
    try:
        for s in serialized:
            writer.write(s)  # raises RuntimeError once the writer has failed
            n += 1
        if not writer.ok():
            raise OSError(f"ArrayRecord writer failed on {path}")
    finally:
        writer.close()
    return n


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
