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

import abc
import csv
import dataclasses
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

LABEL_MODES = ("auto", "none", "folder")
FILENAME_LABELS = "filename:"  # labels="filename:REGEX": the first group of REGEX searched in each file name


class SourceError(ValueError):
    """A source spec is malformed, names nothing, or its input is empty or unusable."""

    def __init__(self, spec: str, message: str):
        super().__init__(f"input {spec!r}: {message}")
        self.spec = spec


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One input image, still encoded.

    `reject` is set (a reason code such as "duplicate_key" or "unreadable", `detail` says more) when the
    source already knows the record cannot be used; the pipeline records it as a rejection."""

    key: str
    data: bytes
    label: Optional[int] = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reject: Optional[str] = None
    detail: str = ""


class Source(abc.ABC):
    """A readable input, split into units. Subclasses set `spec`, `class_names` and `meta_fields`."""

    spec: str
    class_names: Optional[tuple[str, ...]] = None
    meta_fields: tuple[str, ...] = ()
    # True where keys cannot repeat by construction (folders, synthetic): iteration then keeps no key set.
    unique_keys: bool = False

    @abc.abstractmethod
    def units(self) -> list[str]:
        """Independently readable pieces, in source order."""

    @abc.abstractmethod
    def _read(self, unit: str) -> Iterator[SourceRecord]:
        """The unit's records, in a fixed order, duplicates not yet flagged."""

    def read(self, unit: str) -> Iterator[SourceRecord]:
        """The records of one unit, in a fixed order; repeated keys within it flagged "duplicate_key"."""
        records = self._read(unit)
        return records if self.unique_keys else flag_duplicates(records)

    def __iter__(self) -> Iterator[SourceRecord]:
        """Every record in source order; a key repeated anywhere in the source is flagged after its first use."""
        records = (r for unit in self.units() for r in self._read(unit))
        return records if self.unique_keys else flag_duplicates(records)

    def label_description(self) -> str:
        """How labels were found, for summaries: "from the input's labels: 10 classes" or "none: every label is -1"."""
        if self.class_names is None:
            return "none: every label is -1"
        return f"from the input's labels: {len(self.class_names)} classes"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def flag_duplicates(records: Iterable[SourceRecord]) -> Iterator[SourceRecord]:
    """Pass records through, flagging every one whose key an earlier (unrejected) record already had.

    The first occurrence in the given order wins; records already rejected pass unchanged. A distributed
    pipeline sees cross-unit duplicates only after grouping by key: call this on each group sorted by
    (key, data) so that which copy survives does not depend on the runner."""
    seen: set[str] = set()
    for r in records:
        if r.reject is None and r.key in seen:
            r = dataclasses.replace(r, reject="duplicate_key", detail=f"key {r.key!r} appears earlier in the input")
        elif r.reject is None:
            seen.add(r.key)
        yield r


# ----------------------------------------------------------------------------- spec parsing helpers
_SCHEME = re.compile(r"^[a-zA-Z][-a-zA-Z0-9+.]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def has_scheme(path: str) -> bool:
    """True for gs://, s3://, hdfs:// ... paths, which are read through Beam's FileSystems."""
    return bool(_SCHEME.match(path))


def is_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: keys are made relative to it."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if is_glob(part):
            return "/".join(parts[:i]) or ("/" if pattern.startswith("/") else ".")
    return "/".join(parts[:-1]) or "."


def relative_key(path: str, root: str) -> str:
    """`path` relative to `root`, with POSIX separators."""
    root = root.rstrip("/")
    if root in ("", "."):
        return path[2:] if path.startswith("./") else path
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path.rsplit("/", 1)[-1]


def split_options(spec: str, body: str, allowed: Sequence[str]) -> tuple[str, dict[str, str]]:
    """'GLOB?a=x&b=y' -> ('GLOB', {'a': 'x', 'b': 'y'}), refusing names outside `allowed`."""
    if "?" not in body:
        return body, {}
    body, query = body.rsplit("?", 1)
    options: dict[str, str] = {}
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if not eq or not value:
            raise SourceError(spec, f"option {item!r} is not NAME=VALUE")
        if name not in allowed:
            raise SourceError(spec, f"unknown option {name!r}; this source accepts {', '.join(allowed)}")
        options[name] = value
    return body, options


def check_labels(spec: str, labels: str) -> None:
    """Accept auto, none, folder and filename:REGEX (a valid regex with at least one group)."""
    if isinstance(labels, str) and labels.startswith(FILENAME_LABELS):
        filename_label_pattern(spec, labels)
    elif labels not in LABEL_MODES:
        raise SourceError(spec, f"labels={labels!r}: expected one of {', '.join(LABEL_MODES)} or filename:REGEX")


def filename_label_pattern(spec: str, labels: str) -> "re.Pattern":
    """The compiled REGEX of labels="filename:REGEX"; its first group is the class name."""
    try:
        pattern = re.compile(labels[len(FILENAME_LABELS):])
    except re.error as e:
        raise SourceError(spec, f"labels={labels!r}: not a regular expression ({e})") from None
    if pattern.groups < 1:
        raise SourceError(spec, f"labels={labels!r}: the regular expression needs a group, e.g. filename:^(\\w+?)_\\d+")
    return pattern


def check_meta_fields(spec: str, meta_fields: Sequence[str], available: Iterable[str]) -> tuple[str, ...]:
    """The requested meta fields, each one checked against those the source can provide."""
    available = list(available)
    for name in meta_fields:
        if name not in available:
            raise SourceError(spec, f"meta field {name!r} is not available; this source offers: {', '.join(available) or 'none'}")
    return tuple(meta_fields)


def text(value: Any) -> Any:
    """Metadata values as plain Python: bytes become str, numpy scalars and arrays become Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if hasattr(value, "tolist"):
        return text(value.tolist())
    if isinstance(value, list):
        return [text(v) for v in value]
    return value


# ----------------------------------------------------------------------------- entry points
def open_source(spec: str, *, labels: str = "auto", meta_fields: Sequence[str] = ()) -> Source:
    """Parse `spec` and open the input it names (listing files or reading headers, not images).

    labels: "auto" (use the labels the input has: sub-folder names, a label column or feature), "none"
    (no labels), or "folder" (folders only: every image must sit in a class sub-folder).
    meta_fields: names of extra per-image values to carry into `SourceRecord.meta` (columns or features
    for tables and TFDS; fields of the json member for wds; "path" and "class_name" for folders; "class_name"
    and "format" for synthetic).
    Raises SourceError for a malformed spec, a missing input or one with no images."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(str(spec), "empty input spec")
    check_labels(spec, labels)
    meta_fields = tuple(meta_fields)
    kind, _, body = spec.partition(":")
    if labels.startswith(FILENAME_LABELS) and kind in ("synthetic", "tfds", "tfrecord", "parquet", "arrow"):
        raise SourceError(spec, f"labels={labels!r} applies to image folders only")
    if kind == "synthetic":
        from .sources_synthetic import SyntheticSource
        return SyntheticSource.from_spec(spec, body, labels=labels, meta_fields=meta_fields)
    if kind == "tfds":
        from .sources_tfds import TfdsSource
        return TfdsSource.from_spec(spec, body, labels=labels, meta_fields=meta_fields)
    if kind == "tfrecord":
        from .sources_tables import TFRecordSource
        return TFRecordSource.from_spec(spec, body, labels=labels, meta_fields=meta_fields)
    if kind in ("parquet", "arrow"):
        from .sources_tables import ArrowSource
        return ArrowSource.from_spec(spec, body, kind=kind, labels=labels, meta_fields=meta_fields)
    if kind == "wds":
        from .sources_wds import WdsSource
        return WdsSource.from_spec(spec, body, labels=labels, meta_fields=meta_fields)
    if kind == "sizes":
        raise SourceError(spec, "sizes:FILE.csv holds image sizes, not images: use read_sizes() (benchmarks only)")
    if body and re.fullmatch(r"[a-z][a-z0-9_]+", kind) and not has_scheme(spec) and not os.path.exists(spec):
        raise SourceError(spec, f"unknown source type {kind!r}; expected a folder, a glob, a gs:// path, or one of "
                                "tfds:, tfrecord:, parquet:, arrow:, wds:, synthetic:")
    from .sources_files import FileSource
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
