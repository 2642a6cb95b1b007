"""What every source shares: the record, the Source interface, duplicate flagging and spec-parsing helpers.

Each source kind lives in its own module (files, synthetic, tables, tfds, wds) built on this one; the
package's `__init__` registers them and parses spec strings (`open_source`)."""
from __future__ import annotations

import abc
import collections
import dataclasses
import io
import re
import types
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

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
    source already knows the record cannot be used; the pipeline records it as a rejection.

    `unused` names what the source passed over unread for this record, one entry per member: for wds, the
    extensions of the sample's members that the record did not need (("npy", "txt") when `txt` is not a
    requested meta field), "<hidden>" and "<no_extension>" for members that belong to no sample (`._x.jpg`,
    `README`), counted with the sample they sit in. Empty for other sources. Totals: `unused_totals`."""

    key: str
    data: bytes
    label: Optional[int] = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reject: Optional[str] = None
    detail: str = ""
    unused: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Listed:
    """A record as the listing and planning see it. From Source.scan: the record with either its bytes
    (`data`, a source that cannot read one record alone) or `ref` (Source.open_ref and fetch read it
    again), and its display size where the source knows it without reading the image (`size`). From
    Source.headers: the size read from the header too (or `header_reject`, the (reason, detail) of a
    header that does not read), `data` kept only when the bytes were read whole (a source without
    references, or an image whose size needs all of it)."""

    key: str
    label: Optional[int] = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reject: Optional[str] = None
    detail: str = ""
    unused: tuple[str, ...] = ()
    size: Optional[tuple[int, int]] = None
    header_reject: Optional[tuple[str, str]] = None
    ref: Any = None
    data: Optional[bytes] = None

    @classmethod
    def by_ref(cls, key: str, label: Optional[int], meta: Mapping[str, Any], ref: Any,
               size: Optional[tuple[int, int]] = None) -> "Listed":
        """Listed(key, label, meta, size=size, ref=ref) without a frozen dataclass's per-field checks (two
        thirds of its cost): a file listed by reference, and once its header is read, once an image of
        every epoch."""
        listed = object.__new__(cls)
        listed.__dict__.update(_LISTED_DEFAULTS, key=key, label=label, meta=meta, size=size, ref=ref)
        return listed

    @property
    def payload(self) -> Any:
        return self.data if self.data is not None else self.ref

    def plan(self, config, *, epoch: int, images_seen: float, block=None):
        """The image's packer.ImagePlan (ImageRejected as packer.plan_header would raise on its bytes: the
        label is judged first, then the header). `block`: (packer.PlanBlock, this image's index in it),
        its plan made with its block's."""
        import packer

        if self.size is None and self.header_reject is None:
            return packer.plan_header(self.data, self.key, config, epoch=epoch, images_seen=images_seen,
                                      label=self.label, meta=self.meta, rngs=block[0].of(block[1]) if block else None)
        packer.check_label(self.label)
        if self.header_reject is not None:
            raise packer.ImageRejected(*self.header_reject)
        if block is not None:
            return block[0].plan(block[1], *self.size, images_seen=images_seen, label=self.label, meta=self.meta)
        return packer.plan_size(*self.size, self.key, config, epoch=epoch, images_seen=images_seen, label=self.label,
                                meta=self.meta)


_LISTED_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Listed) if f.default is not dataclasses.MISSING}


class Source(abc.ABC):
    """A readable input, split into units. Subclasses set `spec`, `class_names` and `meta_fields`."""

    spec: str
    class_names: Optional[tuple[str, ...]] = None
    meta_fields: tuple[str, ...] = ()
    # True where keys cannot repeat by construction (folders, synthetic): iteration then keeps no key set.
    unique_keys: bool = False
    # What listing the input passed over because it is not an input at all, by reason ("hidden",
    # "other_extension", "folder_named_like_image", "symlink_loop", "folder_seen": files.SKIP_REASONS), and
    # the first few of each; known when the source is opened. Filled by folder and glob sources, empty elsewhere.
    skipped: Mapping[str, int] = types.MappingProxyType({})
    skipped_examples: Mapping[str, Sequence[str]] = types.MappingProxyType({})

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

    def scan(self, unit: str) -> Iterator[Listed]:
        """The unit's records for a listing that reads each image once (the batch job): by default every
        record with its bytes (a source that can read one record alone overrides this with references and
        open_ref). Same records, order and rejects as read(unit)."""
        for r in self.read(unit):
            yield Listed(r.key, r.label, r.meta, r.reject, r.detail, r.unused, data=bytes(r.data or b""))

    def headers(self, unit: str, max_pixels: int) -> Iterator[Listed]:
        """The unit's records (scan's, in read's order) with each image's display size, read from as few of
        its bytes as the source allows (a plain JPEG's header through open_ref; else the bytes scan gave,
        or the whole file)."""
        for r in self.scan(unit):
            yield self._sized(r, max_pixels, self.read_size)

    @staticmethod
    def _sized(r: Listed, max_pixels: int, read_size: Callable[[Any, int], tuple]) -> Listed:
        """Scanned record r with its display size: from its bytes, or read_size(ref, max_pixels); a header
        that does not read as header_reject, a file gone or unreadable as the record's reject."""
        import packer

        if r.reject is not None or r.size is not None:
            return dataclasses.replace(r, data=None) if r.ref is not None else r
        size = header_reject = data = None
        reject, detail = None, ""
        try:
            if r.ref is None:
                data = r.data
                size, _ = packer.read_image_size(io.BytesIO(data), len(data), max_pixels)
            else:
                size, data = read_size(r.ref, max_pixels)
        except packer.ImageRejected as e:
            header_reject = (e.reason, e.detail)
        except OSError as e:  # vanished or unreadable since the source listed it
            reject, detail = ("missing" if isinstance(e, FileNotFoundError) else "unreadable"), f"{type(e).__name__}: {e}"
        if size is not None and data is None and not r.unused:  # the common case: a header read alone
            return Listed.by_ref(r.key, r.label, r.meta, r.ref, size)
        return Listed(r.key, r.label, r.meta, reject, detail, r.unused, size, header_reject,
                      None if reject else r.ref, None if reject else data)

    def open_ref(self, ref: Any) -> tuple[IO[bytes], int]:
        """(a seekable binary file of the encoded image a scanned record's `ref` names, its size in bytes);
        OSError when it cannot be read any more."""
        raise NotImplementedError(f"{type(self).__name__} gives no references to open")

    def read_size(self, ref: Any, max_pixels: int) -> tuple[tuple[int, int], Optional[bytes]]:
        """(display size, None or the whole bytes) of the image a scanned record's `ref` names, read from as
        few of its bytes as its format allows (packer.read_image_size); OSError when it cannot be read any
        more, packer.ImageRejected for its header."""
        import packer

        f, length = self.open_ref(ref)
        with f:
            return packer.read_image_size(f, length, max_pixels)

    def fetch(self, ref: Any) -> bytes:
        """The encoded image a scanned record's `ref` names (OSError when it cannot be read any more)."""
        f, _ = self.open_ref(ref)
        with f:
            return f.read()

    def reader(self) -> "Source":
        """What worker processes get to scan units and fetch references: this source, or a lighter copy
        without its listing (units travel with each call)."""
        return self

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


def unused_totals(records: Iterable[SourceRecord], totals: Optional[collections.Counter] = None) -> collections.Counter:
    """Sum `SourceRecord.unused` over records: {"txt": 1200, "npy": 1200, "<hidden>": 3}. Pass `totals` to add
    to a running count (e.g. one per worker, merged with `+=`)."""
    totals = collections.Counter() if totals is None else totals
    for r in records:
        totals.update(r.unused)
    return totals


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
