"""Splitting a dataset's records across `shard_count` readers (schemas.read and tf_dataset's shard_index /
shard_count): reader k takes the contiguous global record range [k·N // C, (k+1)·N // C) of the N records in
manifest order, so the readers' ranges are disjoint, cover every record, differ in size by at most one,
and a reader opens only the files that hold part of its range (empty files: reader 0)."""
from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np

from ._schema import SchemaError


class ShardArgumentError(SchemaError, ValueError):
    """shard_index / shard_count are not integers with 0 <= shard_index < shard_count."""


def check_split(shard_index: Any, shard_count: Any) -> tuple[int, int]:
    """(shard_index, shard_count) as ints; ShardArgumentError unless 0 <= shard_index < shard_count."""
    for name, v in (("shard_index", shard_index), ("shard_count", shard_count)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ShardArgumentError(f"{name} must be an integer, got {v!r}")
    if shard_count < 1:
        raise ShardArgumentError(f"shard_count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ShardArgumentError(f"shard_index must be in [0, {shard_count}) for shard_count={shard_count}, "
                                 f"got {shard_index}")
    return int(shard_index), int(shard_count)


def record_range(total: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """The global record range [lo, hi) of reader `shard_index` out of `shard_count`."""
    return total * shard_index // shard_count, total * (shard_index + 1) // shard_count


def file_ranges(counts: Sequence[int], shard_index: int, shard_count: int) -> list[tuple[int, int, int]]:
    """(file index, first, end) of each file holding part of the reader's range, first/end local to the file;
    files with none of its records are left out, except that reader 0 also gets the files holding no records
    at all (so that, with shard_count=1, every file is opened and checked, as before splitting existed)."""
    lo, hi = record_range(sum(counts), shard_index, shard_count)
    out, start = [], 0
    for i, n in enumerate(counts):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((i, a - start, b - start))
        elif n == 0 and shard_index == 0:
            out.append((i, 0, 0))
        start += n
    return out


def locate(index: Any, starts: Sequence[int]) -> tuple[int, int]:
    """(part, offset in it) of global record `index` (negative counts from the end) over parts whose first
    records are `starts` (ascending, total last): random access across shards or batches. TypeError for a
    non-integer, IndexError outside the records."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"record indices must be integers, not {type(index).__name__}")
    total = starts[-1]
    i = int(index) + (total if index < 0 else 0)
    if not 0 <= i < total:
        raise IndexError(f"record index {index} out of range for {total} records")
    part = bisect.bisect_right(starts, i) - 1
    return part, i - starts[part]
