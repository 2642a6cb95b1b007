"""Input sources: anything that yields encoded images with a key, an optional label and metadata.

`open_source(spec)` parses one spec string (the same in the CLI and the Python API):

  DIR | GLOB | gs://...        image files (jpg jpeg png webp gif bmp tif tiff), labels from sub-folder names
  tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]   a prepared TensorFlow Datasets split
  tfrecord:GLOB[?image=F&label=F&key=F] tf.train.Example records with an encoded image feature
  parquet:GLOB[?image=C&label=C&key=C]  Hugging Face datasets layout (image struct {bytes, path} or bytes)
  arrow:GLOB[?image=C&label=C&key=C]    the same, Arrow IPC files or streams
  wds:PATH|GLOB|gs://...[?label=F]      WebDataset tar shards, brace ranges {000..099} allowed
  synthetic:N[:SEED]           N generated ImageNet-like images (the built-in default input)

A Source is split into `units()`: small strings naming independently readable pieces (a batch of files,
a file, a row group, a TFDS shard), so that Beam can spread them over workers; `read(unit)` yields the
unit's records in a fixed order. A Source holds no open handles, so it pickles to remote workers.

Duplicate keys: a record whose key was already seen is yielded with `reject="duplicate_key"` (the
first occurrence in source order is kept), so the pipeline can record it as a rejection instead of
losing it. `read(unit)` flags duplicates within the unit and `iter(source)` within the whole source;
across units in a distributed run, see `flag_duplicates`.
"""
from __future__ import annotations

import csv
import functools
import os
import re
from typing import Any, Callable, Iterator, Sequence

from .base import (FILENAME_LABELS, LABEL_MODES, Listed, Source, SourceError, SourceRecord, check_labels,
                   flag_duplicates, has_scheme, unused_totals)
from .files import FileSource
from .synthetic import SyntheticSource
from .tables import ArrowSource, TFRecordSource
from .tfds import TfdsSource
from .wds import WdsSource

__all__ = ["FILENAME_LABELS", "LABEL_MODES", "Listed", "Source", "SourceError", "SourceRecord", "flag_duplicates",
           "open_source", "read_sizes", "record_sizes", "unused_totals", "KINDS"]

# The one place a source kind is registered: "KIND:BODY" specs go to KINDS[KIND](spec, BODY, labels=, meta_fields=).
# Anything without a registered prefix is a folder, a glob or a gs:// path of image files (FileSource).
KINDS: dict[str, Callable[..., Source]] = {
    "synthetic": SyntheticSource.from_spec,
    "tfds": TfdsSource.from_spec,
    "tfrecord": TFRecordSource.from_spec,
    "parquet": functools.partial(ArrowSource.from_spec, kind="parquet"),
    "arrow": functools.partial(ArrowSource.from_spec, kind="arrow"),
    "wds": WdsSource.from_spec,
}


# ----------------------------------------------------------------------------- entry points
def open_source(spec: str, *, labels: str = "auto", meta_fields: Sequence[str] = ()) -> Source:
    """Parse `spec` and open the input it names (listing files or reading headers, not images).

    labels: "auto" (use the labels the input has: sub-folder names, a label column or feature), "none"
    (no labels), or "folder" (folders only: every image must sit in a class sub-folder).
    meta_fields: names of extra per-image values to carry into `SourceRecord.meta` (columns or features
    for tables and TFDS; for wds a member extension such as "txt" (its text) or a field of the json member,
    checked against the first 100 samples; "path" and "class_name" for folders; "class_name" and "format"
    for synthetic).
    Raises SourceError for a malformed spec, a missing input, one with no images, or a meta field it does
    not offer. What listing passed over is counted in `source.skipped` (folders and globs)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(str(spec), "empty input spec")
    check_labels(spec, labels)
    meta_fields = tuple(meta_fields)
    kind, _, body = spec.partition(":")
    opener = KINDS.get(kind)
    if opener is not None:
        if labels == "folder" or labels.startswith(FILENAME_LABELS):
            raise SourceError(spec, f"labels={labels!r} applies to image folders only")
        return opener(spec, body, labels=labels, meta_fields=meta_fields)
    if kind == "sizes":
        raise SourceError(spec, "sizes:FILE.csv holds image sizes, not images: use read_sizes() (benchmarks only)")
    if body and re.fullmatch(r"[a-z][a-z0-9_]+", kind) and not has_scheme(spec) and not os.path.exists(spec):
        raise SourceError(spec, f"unknown source type {kind!r}; expected a folder, a glob, a gs:// path, or one of "
                                f"{', '.join(k + ':' for k in KINDS)}")
    return FileSource.from_spec(spec, labels=labels, meta_fields=meta_fields)


def record_sizes(source: Source, max_pixels: int = 100_000_000) -> Iterator[tuple[str, int, int]]:
    """(key, height, width) of each usable image, from its header alone (no decoding).

    Records the source rejects, or whose header cannot be read, are skipped: this feeds size
    statistics and benchmarks, not packing. Synthetic sources answer without encoding anything."""
    import packer

    fast = getattr(source, "sizes", None)
    if fast is not None:
        yield from fast()
        return
    for record in source:
        if record.reject is not None:
            continue
        try:
            h, w = packer.image_size(record.data, max_pixels)
        except packer.ImageRejected:
            continue
        yield record.key, h, w


def read_sizes(spec: str, **open_kwargs: Any) -> Iterator[tuple[str, int, int]]:
    """(key, height, width) from any image source spec, or from a CSV with columns key,height,width
    (`sizes:FILE.csv` or a path ending in .csv), for benchmarks over millions of images."""
    path = spec[len("sizes:"):] if spec.startswith("sizes:") else spec
    if spec.startswith("sizes:") or path.lower().endswith(".csv"):
        return _csv_sizes(spec, path)
    return record_sizes(open_source(spec, **open_kwargs))


def _csv_sizes(spec: str, path: str) -> Iterator[tuple[str, int, int]]:
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise SourceError(spec, f"cannot open the sizes file: {e}") from None

    def rows() -> Iterator[tuple[str, int, int]]:
        with f:
            reader = csv.DictReader(f)
            missing = {"key", "height", "width"} - set(reader.fieldnames or ())
            if missing:
                raise SourceError(spec, f"the CSV lacks column(s) {', '.join(sorted(missing))} (needs key,height,width)")
            for line, row in enumerate(reader, start=2):
                try:
                    h, w = int(row["height"]), int(row["width"])
                except (TypeError, ValueError):
                    raise SourceError(spec, f"line {line}: height and width must be integers, got {row}") from None
                if h < 1 or w < 1:
                    raise SourceError(spec, f"line {line}: size {h}x{w} is not positive")
                yield row["key"], h, w

    return rows()
