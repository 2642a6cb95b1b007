"""`wds:SPEC[?label=FIELD]`: WebDataset tar shards (LAION, DataComp, CC12M, COYO, img2dataset outputs).

SPEC is a local path, folder, glob or gs:// pattern of tar files, with WebDataset's brace expansion
(`shards-{000000..000999}.tar`, `{train,val}-*.tar`). Compressed tars (.tar.gz, ...) are read as well.

A sample is a run of consecutive members sharing a key: the member's path up to the first dot of its
last path component (`dir/000017.jpg`, `dir/000017.json` -> `dir/000017`). The image is the first member
whose extension (everything after that dot) is an image type, e.g. `jpg` but not `seg.png`. The record
key is `<shard>/<sample key>`, the shard named relative to the spec's fixed prefix (`shards-000.tar/000017`).

Labels: the `cls` member (an integer as text), or with `?label=FIELD` (the CLI's --label-field) that
field of the `json` member (an integer, or integer text); a sample without one is unlabelled. Meta
fields are fields of the `json` member ("" where a sample lacks one).

One shard is one unit, read as a stream (tarfile mode "r|*"): only the current sample is held in memory,
and members the record does not need are skipped unread. Failures are rejections, never crashes: a
sample without an image, a second image under one key (the first is used), an oversized member, a bad
label, and a damaged tar: every complete sample before the damage is kept, the one it cuts is rejected."""
from __future__ import annotations

import dataclasses
import os
import re
import tarfile
from typing import Any, Iterator, Optional, Sequence

from .base import SourceError, Source, SourceRecord, glob_root, has_scheme, is_glob, relative_key, split_options
from .files import IMAGE_EXTENSIONS, match_files, open_file

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
IMAGE_TYPES = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
# An encoded image of the packer's default --max-pixels (1e8) needs at most 8 bytes a pixel (16-bit RGBA,
# uncompressed) plus headers: a larger member cannot be an image the packer would accept, so it is
# rejected from its tar header, before a byte of it is read.
MAX_IMAGE_BYTES = 8 * 100_000_000 + (1 << 20)
MAX_TEXT_BYTES = 16 << 20  # json and cls members
_OPTIONS = ("label",)
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


# ----------------------------------------------------------------------------- spec -> shard paths
def expand_braces(spec: str, pattern: str) -> list[str]:
    """WebDataset's brace expansion: `a{0..2}b` -> a0b a1b a2b (zero-padded as written: {08..10} -> 08 09 10),
    `{x,y}` -> x y, nested and repeated braces too. A brace without a range or comma stays as it is."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, begin = 0, [], start + 1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 1 and pattern[i] == ",":
            parts.append(pattern[begin:i])
            begin = i + 1
        if depth == 0:
            end = i
            break
    else:
        raise SourceError(spec, f"unbalanced '{{' in {pattern!r}")
    parts.append(pattern[begin:end])
    head, tail = pattern[:start], pattern[end + 1:]
    if len(parts) == 1:
        match = _RANGE.fullmatch(parts[0])
        if match is None:  # "{x}": literal, expand what follows
            return [head + "{" + parts[0] + "}" + rest for rest in expand_braces(spec, tail)]
        a, b = match.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        parts = [f"{n:0{width}d}" for n in range(int(a), int(b) + step, step)]
    return [out for alt in parts for out in expand_braces(spec, head + alt + tail)]


def shard_paths(spec: str, pattern: str) -> tuple[str, list[str]]:
    """(root the shard names are relative to, shard paths in spec order, without repeats).

    Globs and folders contribute their tar files (sorted); a file named outright is taken whatever its
    name. Local files named outright must exist; remote ones are checked when read (one listing call per
    shard would cost more than the read)."""
    if not has_scheme(pattern):
        pattern = os.path.expanduser(pattern)
    root = glob_root(pattern.replace("{", "*"))  # the fixed prefix ends before the first brace too
    paths: list[str] = []
    missing: list[str] = []
    for path in expand_braces(spec, pattern):
        use_beam = has_scheme(path)
        if is_glob(path):
            paths += [p for p in match_files(spec, path, use_beam=use_beam) if p.lower().endswith(TAR_SUFFIXES)]
        elif path.endswith("/") or (not use_beam and os.path.isdir(path)):
            listed = match_files(spec, path.rstrip("/") + "/**", use_beam=use_beam)
            paths += [p for p in listed if p.lower().endswith(TAR_SUFFIXES)]
        elif not use_beam and not os.path.isfile(path):
            missing.append(path)
        else:
            paths.append(path)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SourceError(spec, f"{len(missing)} shard(s) do not exist: {', '.join(missing[:3])}{more}")
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise SourceError(spec, f"no tar files ({', '.join(TAR_SUFFIXES)}) match {pattern!r}")
    if not is_glob(pattern) and "{" not in pattern and (pattern.endswith("/") or os.path.isdir(pattern)):
        root = pattern.rstrip("/") or "/"  # a folder: shards are named relative to it
    return root, paths


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000017.seg.png' -> ('dir/000017', 'seg.png'): the key ends at the first dot of the last part."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


# ----------------------------------------------------------------------------- reading
class _ShardDamaged(Exception):
    """The tar stream cannot be read on from here; the message says where and why."""


class _HeaderWatch(tarfile.TarInfo):
    """TarInfo that notes on its TarFile why header reading stopped: tarfile ends iteration silently on a
    truncated or garbled header, which only a zero block (the end-of-archive marker) justifies."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stop_reason = e
            raise


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members in stream order, forgetting each one (TarFile keeps a list otherwise: memory would grow with
    the shard); raises _ShardDamaged when the stream ends anywhere but at a proper end-of-archive marker."""
    while True:
        try:
            member = tar.next()
        except Exception as e:  # ReadError, EOFError, zlib.error, OSError from the file system
            raise _ShardDamaged(f"at byte {tar.offset}: {type(e).__name__}: {e}") from None
        tar.members = []
        if member is None:
            reason = getattr(tar, "stop_reason", None)
            if not isinstance(reason, tarfile.EOFHeaderError):
                why = f"{type(reason).__name__}: {reason}" if reason is not None else "the stream ended"
                if isinstance(reason, tarfile.EmptyHeaderError):
                    why = "the tar ends without its end-of-archive marker"
                raise _ShardDamaged(f"at byte {tar.offset}: {why}")
            return
        yield member


@dataclasses.dataclass
class _Sample:
    """The members of one sample that the record needs, as read so far."""

    key: str
    image: Optional[bytes] = None
    image_member: str = ""
    cls: Optional[bytes] = None
    json: Optional[bytes] = None
    extra_images: list[str] = dataclasses.field(default_factory=list)
    reject: Optional[str] = None
    detail: str = ""

    def fail(self, reason: str, detail: str) -> None:
        if self.reject is None:
            self.reject, self.detail = reason, detail


class WdsSource(Source):
    """WebDataset tar shards; one unit per shard (its path)."""

    def __init__(self, spec: str, root: str, paths: list[str], *, label_field: Optional[str], with_labels: bool,
                 meta_fields: tuple[str, ...], max_image_bytes: int = MAX_IMAGE_BYTES):
        self.spec, self.root, self.paths = spec, root, paths
        self.label_field, self.with_labels, self.meta_fields = label_field, with_labels, meta_fields
        self.max_image_bytes = max_image_bytes
        self.class_names = None

    @classmethod
    def from_spec(cls, spec: str, body: str, *, labels: str = "auto", meta_fields: Sequence[str] = (),
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> "WdsSource":
        """Lists the shards now (reads none of them)."""
        pattern, options = split_options(spec, body, _OPTIONS) if "=" in body.rpartition("?")[2] else (body, {})
        if not pattern:
            raise SourceError(spec, "expected wds:PATH|GLOB|gs://...[?label=JSON_FIELD], "
                                    "e.g. wds:shards-{000..009}.tar")
        label_field = options.get("label")
        if label_field is not None and labels == "none":
            raise SourceError(spec, f"?label={label_field} asks for labels, but labels='none'")
        root, paths = shard_paths(spec, pattern)
        return cls(spec, root, paths, label_field=label_field, with_labels=labels != "none",
                   meta_fields=tuple(meta_fields), max_image_bytes=max_image_bytes)

    def units(self) -> list[str]:
        return list(self.paths)

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        shard = relative_key(unit, self.root)
        try:
            f = open_file(unit, use_beam=has_scheme(unit))
        except Exception as e:  # vanished, unreadable, or a remote path that never existed
            yield SourceRecord(f"{shard}/<unreadable>", b"", reject="unreadable", detail=f"{type(e).__name__}: {e}")
            return
        with f:
            yield from self._read_stream(f, shard)

    def _read_stream(self, f, shard: str) -> Iterator[SourceRecord]:
        sample: Optional[_Sample] = None
        try:
            try:
                tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_HeaderWatch)
            except Exception as e:
                raise _ShardDamaged(f"not a tar file: {type(e).__name__}: {e}") from None
            for member in _members(tar):
                name = member.name[2:] if member.name.startswith("./") else member.name
                key, extension = split_member_name(name)
                if not member.isreg() or not extension or name.rpartition("/")[2].startswith("."):
                    continue  # folders, links, names without an extension, hidden files (._x.jpg from macOS)
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield from self._records(sample, shard)
                    sample = _Sample(key)
                self._take(tar, member, name, extension, sample)
        except _ShardDamaged as e:
            detail = f"{shard} is damaged {e}"
            if sample is None:
                yield SourceRecord(f"{shard}/<corrupt>", b"", reject="corrupt_tar", detail=detail)
            else:  # the damage cuts this sample (or follows it, so its later members may be lost)
                sample.reject, sample.detail = "truncated", detail
                yield from self._records(sample, shard)
            return
        if sample is not None:
            yield from self._records(sample, shard)

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, extension: str, sample: _Sample) -> None:
        """Read the member into the sample if the record needs it; the stream skips it otherwise."""
        if extension in IMAGE_TYPES:
            if sample.image_member:
                sample.extra_images.append(name)
                return
            sample.image_member = name
            if member.size > self.max_image_bytes:
                sample.fail("too_large", f"image member {name!r} has {member.size} bytes, more than an image within "
                                         f"the pixel limit needs ({self.max_image_bytes})")
                return
            sample.image = _read_member(tar, member)
        elif (extension == "cls" and self.with_labels and self.label_field is None) or \
                (extension == "json" and (self.meta_fields or (self.with_labels and self.label_field is not None))):
            if member.size > MAX_TEXT_BYTES:
                sample.fail("too_large", f"member {name!r} has {member.size} bytes (at most {MAX_TEXT_BYTES} read)")
                return
            setattr(sample, extension, _read_member(tar, member))

    def _records(self, sample: _Sample, shard: str) -> Iterator[SourceRecord]:
        """The sample's record, then one rejection per extra image under its key."""
        key = f"{shard}/{sample.key}"
        label, meta = self._label_and_meta(sample)
        if sample.reject is None and sample.image is None:
            sample.fail("no_image", f"no member with an image extension ({', '.join(sorted(IMAGE_TYPES))})")
        yield SourceRecord(key, sample.image if sample.reject is None else b"", None if sample.reject else label,
                           meta, reject=sample.reject, detail=sample.detail)
        for name in sample.extra_images:
            yield SourceRecord(f"{shard}/{name}", b"", label, meta, reject="extra_image",
                               detail=f"a second image under key {sample.key!r}; {sample.image_member!r} is used")

    def _label_and_meta(self, sample: _Sample) -> tuple[Optional[int], dict[str, Any]]:
        """Sets the sample's rejection for a bad label or json; the label is None when the sample has none."""
        fields: dict[str, Any] = {}
        if sample.json is not None:
            try:
                fields = _json_object(sample.json)
            except ValueError as e:
                sample.fail("bad_json", f"{sample.key}.json: {e}")
        meta = {name: fields.get(name, "") for name in self.meta_fields}
        if not self.with_labels:
            return None, meta
        if self.label_field is not None:
            if fields.get(self.label_field) is None:  # no json, no such field, or null: unlabelled, as a missing cls
                return None, meta
            value, where = fields[self.label_field], f"{sample.key}.json field {self.label_field!r}"
        elif sample.cls is not None:
            value, where = sample.cls.decode("utf-8", "replace"), f"{sample.key}.cls"
        else:
            return None, meta
        label = _integer(value)
        if label is None:
            sample.fail("bad_label", f"{where} is {value!r}, not an integer")
        return label, meta


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        data = tar.extractfile(member).read()
    except Exception as e:
        raise _ShardDamaged(f"in member {member.name!r}: {type(e).__name__}: {e}") from None
    if len(data) != member.size:
        raise _ShardDamaged(f"in member {member.name!r}: {len(data)} of {member.size} bytes")
    return data


def _json_object(data: bytes) -> dict[str, Any]:
    import json

    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _integer(value: Any) -> Optional[int]:
    """An int, or integer text such as '3\\n' (cls members); None for anything else (bools, 3.5, 'cat')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    return None
