"""Record files holding encoded images: TFRecord of tf.train.Example, and Parquet or Arrow in the Hugging
Face datasets layout. tensorflow and pyarrow are imported only when such a source is read.

Field names are chosen with options after the glob, e.g. `parquet:data/*.parquet?image=jpg&label=cls&key=id`.
Defaults: TFRecord image `image/encoded` or `image`, label `image/class/label` or `label`, key
`image/filename` or `key`; tables image column `image` (else the first struct-with-bytes or binary
column), label `label`, key `key` (else the image struct's `path`). Without a key the record is named
`FILE/ROW` (FILE relative to the glob's fixed prefix), which is unique by construction."""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Sequence

from .base import (SourceError, Source, SourceRecord, check_meta_fields, has_scheme, relative_key, split_options,
                      text)
from .files import expand_input, open_file

_OPTIONS = ("image", "label", "key")


# ----------------------------------------------------------------------------- TFRecord
class TFRecordSource(Source):
    """tf.train.Example records; one unit per file (.gz files are read as GZIP)."""

    DEFAULTS = {"image": ("image/encoded", "image"), "label": ("image/class/label", "label"),
                "key": ("image/filename", "key")}

    def __init__(self, spec: str, root: str, paths: list[str], names: dict[str, tuple[str, ...]], *,
                 with_labels: bool, meta_fields: tuple[str, ...]):
        self.spec, self.root, self.paths, self.names = spec, root, paths, names
        self.with_labels, self.meta_fields = with_labels, meta_fields
        self.class_names = None

    @classmethod
    def from_spec(cls, spec: str, body: str, *, labels: str = "auto", meta_fields: Sequence[str] = ()) -> "TFRecordSource":
        pattern, options = split_options(spec, body, _OPTIONS)
        if not pattern:
            raise SourceError(spec, "expected tfrecord:GLOB[?image=FEATURE&label=FEATURE&key=FEATURE]")
        root, paths, _ = expand_input(spec, pattern)
        names = {field: (options[field],) if field in options else default for field, default in cls.DEFAULTS.items()}
        # Features vary per file and are only known on reading; a missing meta feature gives "".
        return cls(spec, root, paths, names, with_labels=labels != "none", meta_fields=tuple(meta_fields))

    def units(self) -> list[str]:
        return list(self.paths)

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        import tensorflow as tf

        compression = "GZIP" if unit.endswith(".gz") else ""
        rel = relative_key(unit, self.root)
        dataset = tf.data.TFRecordDataset(unit, compression_type=compression)
        try:
            for index, serialized in enumerate(dataset.as_numpy_iterator()):
                yield self._record(tf, serialized, f"{rel}/{index}")
        except tf.errors.OpError as e:  # a truncated or corrupt file: the rest of it cannot be read
            yield SourceRecord(f"{rel}/<corrupt>", b"", None, reject="unreadable",
                               detail=f"{unit}: {type(e).__name__}: {e.message}")

    def _record(self, tf, serialized: bytes, fallback_key: str) -> SourceRecord:
        try:
            features = tf.train.Example.FromString(serialized).features.feature
        except Exception as e:
            return SourceRecord(fallback_key, b"", None, reject="unreadable", detail=f"not a tf.train.Example: {e}")

        def value(field_names: Sequence[str]) -> Any:
            for name in field_names:
                if name in features:
                    kind = features[name].WhichOneof("kind")
                    values = list(getattr(features[name], kind).value) if kind else []
                    return values[0] if len(values) == 1 else values
            return None

        key = value(self.names["key"])
        key = text(key) if isinstance(key, bytes) and key else fallback_key
        label = value(self.names["label"]) if self.with_labels else None
        label = text(label) if isinstance(label, bytes) else None if label == [] else label
        meta = {name: "" if (v := value((name,))) is None else text(v) for name in self.meta_fields}
        image = value(self.names["image"])
        if not isinstance(image, bytes):
            return SourceRecord(key, b"", label, meta, reject="no_image",
                                detail=f"no single bytes feature named {' or '.join(self.names['image'])}")
        return SourceRecord(key, image, label, meta)


# ----------------------------------------------------------------------------- Parquet / Arrow
def _arrow_image_column(spec: str, schema, requested: Optional[str]) -> str:
    import pyarrow as pa

    def usable(t) -> bool:
        return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t)

    if requested is not None:
        if requested not in schema.names:
            raise SourceError(spec, f"no column {requested!r}; columns: {', '.join(schema.names)}")
        if not usable(schema.field(requested).type):
            raise SourceError(spec, f"column {requested!r} has type {schema.field(requested).type}, expected binary "
                                    "or struct<bytes: binary, path: string>")
        return requested
    if "image" in schema.names and usable(schema.field("image").type):
        return "image"
    for field in schema:
        if usable(field.type):
            return field.name
    raise SourceError(spec, f"no image column (binary, or struct with a 'bytes' field) among {', '.join(schema.names)}")


def _hf_class_names(schema, column: str) -> Optional[tuple[str, ...]]:
    """Class names of a Hugging Face ClassLabel column, from the schema's 'huggingface' metadata."""
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        feature = info["info"]["features"][column]
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        return tuple(str(n) for n in names) if names else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class ArrowSource(Source):
    """Parquet (one unit per row group, "FILE#GROUP") or Arrow IPC file/stream (one unit per file)."""

    def __init__(self, spec: str, kind: str, root: str, units: list[str], *, image: str, label: Optional[str],
                 key: Optional[str], class_names: Optional[tuple[str, ...]], meta_fields: tuple[str, ...]):
        self.spec, self.kind, self.root, self._units = spec, kind, root, units
        self.image, self.label, self.key = image, label, key
        self.class_names, self.meta_fields = class_names, meta_fields

    @classmethod
    def from_spec(cls, spec: str, body: str, *, kind: str, labels: str = "auto",
                  meta_fields: Sequence[str] = ()) -> "ArrowSource":
        pattern, options = split_options(spec, body, _OPTIONS)
        if not pattern:
            raise SourceError(spec, f"expected {kind}:GLOB[?image=COLUMN&label=COLUMN&key=COLUMN]")
        root, paths, use_beam = expand_input(spec, pattern, suffixes=(f".{kind}",))
        try:
            if kind == "parquet":
                schema, units = _parquet_layout(paths, use_beam)
            else:
                schema, units = _read_arrow_table(paths[0], use_beam, schema_only=True), list(paths)
        except Exception as e:
            raise SourceError(spec, f"cannot read {kind} metadata: {type(e).__name__}: {e}") from None
        image = _arrow_image_column(spec, schema, options.get("image"))
        label = options.get("label", "label" if "label" in schema.names else None)
        if label is not None and label not in schema.names:
            raise SourceError(spec, f"no label column {label!r}; columns: {', '.join(schema.names)}")
        key = options.get("key", "key" if "key" in schema.names else None)
        if key is not None and key not in schema.names:
            raise SourceError(spec, f"no key column {key!r}; columns: {', '.join(schema.names)}")
        if labels == "none":
            label = None
        if label is not None:
            import pyarrow as pa
            if not pa.types.is_integer(schema.field(label).type):
                raise SourceError(spec, f"label column {label!r} has type {schema.field(label).type}; it must hold "
                                        "integers (pass labels='none' or ?label=ANOTHER_COLUMN)")
        meta_fields = check_meta_fields(spec, meta_fields, schema.names)
        class_names = _hf_class_names(schema, label) if label is not None else None
        return cls(spec, kind, root, units, image=image, label=label, key=key, class_names=class_names,
                   meta_fields=meta_fields)

    def units(self) -> list[str]:
        return list(self._units)


    def _read(self, unit: str) -> Iterator[SourceRecord]:
        columns = list(dict.fromkeys(c for c in (self.image, self.label, self.key, *self.meta_fields) if c))
        path, group = _split_unit(unit) if self.kind == "parquet" else (unit, None)
        use_beam = has_scheme(path)
        rel = relative_key(path, self.root)
        if group is not None:
            import pyarrow.parquet as pq
            with open_file(path, use_beam=use_beam) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=columns)
            first = int(unit.rsplit("#", 2)[-1])  # row offset of the group in its file
        else:
            table, first = _read_arrow_table(path, use_beam).select(columns), 0
        values = {c: table.column(c).to_pylist() for c in columns}
        for i in range(table.num_rows):
            yield self._record(values, i, f"{rel}/{first + i}")

    def _record(self, values: dict[str, list], i: int, fallback_key: str) -> SourceRecord:
        cell = values[self.image][i]
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        key = values[self.key][i] if self.key else path
        key = fallback_key if key in (None, "", b"") else str(text(key))
        label = values[self.label][i] if self.label else None
        meta = {name: "" if values[name][i] is None else text(values[name][i]) for name in self.meta_fields}
        if not data:
            detail = f"the image cell has no bytes (path {path!r})" if path else "the image cell is empty"
            return SourceRecord(key, b"", label, meta, reject="no_image" if data is None else "empty", detail=detail)
        return SourceRecord(key, bytes(data), label, meta)


def _split_unit(unit: str) -> tuple[str, int]:
    """'FILE#GROUP#FIRSTROW' -> (FILE, GROUP)."""
    path, group, _ = unit.rsplit("#", 2)
    return path, int(group)


def _parquet_layout(paths: list[str], use_beam: bool):
    """(schema of the first file, units "FILE#GROUP#FIRSTROW") from the files' footers."""
    import pyarrow.parquet as pq

    schema, units = None, []
    for path in paths:
        with open_file(path, use_beam=use_beam) as f:
            meta = pq.ParquetFile(f).metadata
            if schema is None:
                schema = pq.ParquetFile(f).schema_arrow
        first = 0
        for g in range(meta.num_row_groups):
            units.append(f"{path}#{g}#{first}")
            first += meta.row_group(g).num_rows
    return schema, units


def _read_arrow_table(path: str, use_beam: bool, schema_only: bool = False):
    """An Arrow IPC file or stream (Hugging Face writes streams): its table, or only its schema.
    Local files are memory-mapped, so a large file costs no copy."""
    import pyarrow as pa

    def reader(source):
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source)

    if use_beam:
        with open_file(path, use_beam=True) as f:
            r = reader(pa.PythonFile(f, mode="r"))
            return r.schema if schema_only else r.read_all()
    with pa.memory_map(path) as source:
        r = reader(source)
        return r.schema if schema_only else r.read_all()
