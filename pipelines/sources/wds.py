"""`wds:SPEC[?label=FIELD]`: WebDataset tar shards (LAION, DataComp, CC12M, COYO, img2dataset outputs).

SPEC is a local path, folder, glob or gs:// pattern of tar files, with WebDataset's brace expansion
(`shards-{000000..000999}.tar`, `{train,val}-*.tar`). Compressed tars (.tar.gz, ...) are read as well.

A sample is a run of consecutive members sharing a key: the member's path up to the first dot of its
last path component (`dir/000017.jpg`, `dir/000017.json` -> `dir/000017`). The image is the first member
whose extension (everything after that dot) is an image type, e.g. `jpg` but not `seg.png`. The record
key is `<shard>/<sample key>`, the shard named relative to the spec's fixed prefix (`shards-000.tar/000017`).
Member names are normalised first (`member_name`): a leading '/', './', '.' components and repeated '/'
are dropped; a name with a '..' component is rejected `unsafe_key` (its key shows '..' as '%2E%2E').

Labels: the `cls` member (an integer as text), or with `?label=FIELD` (the CLI's --label-field) that
field of the `json` member (an integer, or integer text); a sample without one is unlabelled. A meta
field NAME is the text (UTF-8) of the sample's member with extension NAME (`txt`: img2dataset's caption),
else the json member's field NAME, else "". Opening the source with meta fields reads the first
PROBE_SAMPLES (100) samples, from at most PROBE_SHARDS (4) shards in spec order: a requested field that
none of them has as a member extension or a json field raises SourceError naming what they offer. A field
seen there as a member extension is read from that member only (the json is then not read for it).
`label_description()` reports the labels those first samples hold.

One shard is one unit, read as a stream (tarfile mode "r|*"): only the current sample is held in memory,
and members the record does not need are skipped unread; `SourceRecord.unused` lists their extensions
(and "<hidden>" / "<no_extension>" for members of no sample, counted with the sample they sit in; folder
members are not counted). Failures are rejections, never crashes: a sample without an image, a second
image under one key (the first is used), an oversized member, a bad label, a symlink or hard-link member
(`link_member`: links are not followed; an image link is its own rejection, or the sample's when it has
no other image; a needed cls/json/meta member that is a link rejects the sample; an unneeded one is
unused), a device or FIFO member (`special_member`, the same way), and a damaged tar: every complete
sample before the damage is kept, the one it cuts is rejected."""
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
MAX_TEXT_BYTES = 16 << 20  # json, cls and meta-field members
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


def member_name(raw: str) -> tuple[str, bool]:
    """A tar member name as a sample path: (normalised name, whether it climbs with '..').

    Rewritten: a leading '/' (absolute names), './', '.' components and repeated '/' are dropped
    ('/a//./b.jpg' -> 'a/b.jpg'), as tar does on extraction. A '..' component is kept in the name but
    reported: such a sample is rejected `unsafe_key` (its key written with '..' as '%2E%2E')."""
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    return "/".join(parts), ".." in parts


def _safe(name: str) -> str:
    """A name for a key: '..' components written as '%2E%2E', so that no key climbs out of its shard."""
    return "/".join("%2E%2E" if p == ".." else p for p in name.split("/"))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


@dataclasses.dataclass
class _Sample:
    """The members of one sample that the record needs, as read so far."""

    key: str
    image: Optional[bytes] = None
    image_member: str = ""
    members: dict[str, bytes] = dataclasses.field(default_factory=dict)  # extension -> bytes (cls, json, meta)
    extra_images: list[str] = dataclasses.field(default_factory=list)
    links: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, reason, detail) of images
    unused: list[str] = dataclasses.field(default_factory=list)
    reject: Optional[str] = None
    detail: str = ""

    def fail(self, reason: str, detail: str) -> None:
        if self.reject is None:
            self.reject, self.detail = reason, detail


# ----------------------------------------------------------------------------- the first samples
PROBE_SAMPLES = 100  # samples looked at when the source is opened (meta field check, label preview) ...
PROBE_SHARDS = 4  # ... from at most this many shards, in spec order


@dataclasses.dataclass
class Preview:
    """What the first samples hold: read at open time from at most PROBE_SHARDS shards, PROBE_SAMPLES samples."""

    samples: int = 0
    shards: list[str] = dataclasses.field(default_factory=list)
    extensions: set[str] = dataclasses.field(default_factory=set)  # of members (links too), images included
    json_keys: set[str] = dataclasses.field(default_factory=set)
    cls_labels: list[int] = dataclasses.field(default_factory=list)  # one per sample with an integer .cls
    json_labels: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # json field -> integer values

    def offered(self) -> str:
        members = sorted(self.extensions - IMAGE_TYPES)
        return (f"json fields: {', '.join(sorted(self.json_keys)) or 'none'}; "
                f"member extensions: {', '.join(members) or 'none'}")


def read_preview(paths: Sequence[str], root: str, label_field: Optional[str]) -> Preview:
    """Read the first PROBE_SAMPLES samples' member names, json fields and labels (images are not read).
    Shards that cannot be opened or are damaged contribute what they held before the damage."""
    seen = Preview()
    for unit in paths[:PROBE_SHARDS]:
        seen.shards.append(relative_key(unit, root))
        try:
            with open_file(unit, use_beam=has_scheme(unit)) as f:
                tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_HeaderWatch)
                key = None
                for member in _members(tar):
                    name, _ = member_name(member.name)
                    sample_key, extension = split_member_name(name)
                    if member.isdir() or not extension or name.rpartition("/")[2].startswith("."):
                        continue  # links count: a requested member that is one gets its sample rejected, not the run
                    if sample_key != key:
                        if seen.samples == PROBE_SAMPLES:
                            return seen
                        key, seen.samples = sample_key, seen.samples + 1
                    seen.extensions.add(extension)
                    if extension in ("cls", "json") and member.isreg() and member.size <= MAX_TEXT_BYTES:
                        _preview_member(seen, _read_member(tar, member), extension, label_field)
        except Exception:  # unreadable, not a tar, damaged: the records will say so; the preview uses what it got
            pass
    return seen


def _preview_member(seen: Preview, data: bytes, extension: str, label_field: Optional[str]) -> None:
    if extension == "cls":
        label = _integer(_text(data))
        if label is not None:
            seen.cls_labels.append(label)
        return
    try:
        fields = _json_object(data)
    except ValueError:
        return
    seen.json_keys.update(fields)
    if label_field is not None and _integer(fields.get(label_field)) is not None:
        seen.json_labels.setdefault(label_field, []).append(_integer(fields[label_field]))


class WdsSource(Source):
    """WebDataset tar shards; one unit per shard (its path)."""

    def __init__(self, spec: str, root: str, paths: list[str], *, label_field: Optional[str], with_labels: bool,
                 meta_fields: tuple[str, ...], max_image_bytes: int = MAX_IMAGE_BYTES,
                 json_fields: Optional[tuple[str, ...]] = None, seen: Optional[Preview] = None):
        self.spec, self.root, self.paths = spec, root, paths
        self.label_field, self.with_labels, self.meta_fields = label_field, with_labels, meta_fields
        self.max_image_bytes = max_image_bytes
        self.class_names = None
        # Meta fields that may come from the json member (all of them unless the first samples show a member
        # with that extension): the json member is read only when a label field or one of these needs it.
        self.json_fields = tuple(meta_fields) if json_fields is None else tuple(json_fields)
        self._read_json = bool(self.json_fields) or (with_labels and label_field is not None)
        self._seen = seen

    @classmethod
    def from_spec(cls, spec: str, body: str, *, labels: str = "auto", meta_fields: Sequence[str] = (),
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> "WdsSource":
        """Lists the shards now. With meta fields, also reads the first samples (`preview`): a requested field
        that none of them offers (as a json field or a member extension) raises SourceError. When none of the
        first shards yields a sample (unreadable, damaged or empty), nothing is checked: the records say why."""
        pattern, options = split_options(spec, body, _OPTIONS) if "=" in body.rpartition("?")[2] else (body, {})
        if not pattern:
            raise SourceError(spec, "expected wds:PATH|GLOB|gs://...[?label=JSON_FIELD], "
                                    "e.g. wds:shards-{000..009}.tar")
        label_field = options.get("label")
        if label_field is not None and labels == "none":
            raise SourceError(spec, f"?label={label_field} asks for labels, but labels='none'")
        meta_fields = tuple(meta_fields)
        images = [name for name in meta_fields if name in IMAGE_TYPES]
        if images:
            raise SourceError(spec, f"meta field {images[0]!r} names the image member; meta fields are json fields "
                                    "or the other members' extensions (txt, cls, json ...)")
        root, paths = shard_paths(spec, pattern)
        seen, json_fields = None, None
        if meta_fields:
            seen = read_preview(paths, root, label_field)
            if seen.samples:
                missing = [n for n in meta_fields if n not in seen.extensions and n not in seen.json_keys]
                if missing:
                    where = f"the first {seen.samples} samples ({', '.join(seen.shards)})"
                    raise SourceError(spec, f"meta field(s) {', '.join(map(repr, missing))} not found in {where}; "
                                            f"they offer {seen.offered()}")
                json_fields = tuple(n for n in meta_fields if n not in seen.extensions)
        return cls(spec, root, paths, label_field=label_field, with_labels=labels != "none", meta_fields=meta_fields,
                   max_image_bytes=max_image_bytes, json_fields=json_fields, seen=seen)

    def preview(self) -> Preview:
        """The first samples (see `read_preview`), read once and kept."""
        if self._seen is None:
            self._seen = read_preview(self.paths, self.root, self.label_field)
        return self._seen

    def label_description(self) -> str:
        """Where labels come from, and which ones the first samples hold (the source cannot know all of them
        before reading every shard): "from .cls members: 7 distinct labels (0..6) in the first 100 samples"."""
        if not self.with_labels:
            return "none: every label is -1"
        where = f"from json field {self.label_field!r}" if self.label_field is not None else "from .cls members"
        seen = self.preview()
        if not seen.samples:
            return f"{where} (no sample could be read to preview them)"
        values = seen.json_labels.get(self.label_field, []) if self.label_field is not None else seen.cls_labels
        first = f"the first {seen.samples} samples"
        if not values:
            return f"{where}: none in {first} (unlabelled: -1)"
        distinct = sorted(set(values))
        unlabelled = f"; {seen.samples - len(values)} unlabelled (-1)" if len(values) < seen.samples else ""
        return f"{where}: {len(distinct)} distinct labels ({distinct[0]}..{distinct[-1]}) in {first}{unlabelled}"

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
        orphans: list[str] = []  # members of no sample before the first sample: counted with it
        try:
            try:
                tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_HeaderWatch)
            except Exception as e:
                raise _ShardDamaged(f"not a tar file: {type(e).__name__}: {e}") from None
            for member in _members(tar):
                if member.isdir():
                    continue  # folders are structure, not members of a sample
                name, climbs = member_name(member.name)
                key, extension = split_member_name(name)
                if not name:
                    continue
                base = name.rpartition("/")[2]
                if base.startswith(".") or not extension:  # hidden (._x.jpg from macOS), README: in no sample
                    (sample.unused if sample is not None else orphans).append(
                        "<hidden>" if base.startswith(".") else "<no_extension>")
                    continue
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield from self._records(sample, shard)
                    sample = _Sample(key, unused=orphans)
                    orphans = []
                    if climbs:
                        sample.fail("unsafe_key", f"member name {member.name!r} climbs out of the shard with '..'")
                self._take(tar, member, name, extension, sample)
        except _ShardDamaged as e:
            detail = f"{shard} is damaged {e}"
            if sample is None:
                yield SourceRecord(f"{shard}/<corrupt>", b"", reject="corrupt_tar", detail=detail, unused=tuple(orphans))
            else:  # the damage cuts this sample (or follows it, so its later members may be lost)
                sample.reject, sample.detail = "truncated", detail
                yield from self._records(sample, shard)
            return
        if sample is not None:
            yield from self._records(sample, shard)

    def _needs(self, extension: str) -> bool:
        """Does a record read members with this (non-image) extension?"""
        return ((extension == "cls" and self.with_labels and self.label_field is None)
                or (extension == "json" and self._read_json) or extension in self.meta_fields)

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, extension: str, sample: _Sample) -> None:
        """Read the member into the sample if the record needs it; the stream skips it otherwise."""
        if not member.isreg():  # a symlink or hard link (not followed: its target may be anywhere), a device
            reason = "link_member" if member.issym() or member.islnk() else "special_member"
            kind = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link"}.get(member.type, "not a file")
            target = f" to {member.linkname!r}" if member.linkname else ""
            detail = f"member {name!r} is {kind}{target}; a shard's links are not followed"
            if extension in IMAGE_TYPES:
                sample.links.append((name, reason, detail))
            elif self._needs(extension):
                sample.fail(reason, detail)
            else:
                sample.unused.append(extension)
            return
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
        elif self._needs(extension):
            if member.size > MAX_TEXT_BYTES:
                sample.fail("too_large", f"member {name!r} has {member.size} bytes (at most {MAX_TEXT_BYTES} read)")
                return
            sample.members[extension] = _read_member(tar, member)
        else:
            sample.unused.append(extension)

    def _records(self, sample: _Sample, shard: str) -> Iterator[SourceRecord]:
        """The sample's record, then one rejection per extra image and per image link under its key."""
        key = f"{shard}/{_safe(sample.key)}"
        label, meta = self._label_and_meta(sample)
        if sample.reject is None and sample.image is None:
            if sample.links:  # its only images are links: the sample is rejected for the first
                _, reason, detail = sample.links.pop(0)
                sample.fail(reason, detail)
            else:
                sample.fail("no_image", f"no member with an image extension ({', '.join(sorted(IMAGE_TYPES))})")
        yield SourceRecord(key, sample.image if sample.reject is None else b"", None if sample.reject else label,
                           meta, reject=sample.reject, detail=sample.detail, unused=tuple(sample.unused))
        for name in sample.extra_images:
            yield SourceRecord(f"{shard}/{_safe(name)}", b"", label, meta, reject="extra_image",
                               detail=f"a second image under key {sample.key!r}; {sample.image_member!r} is used")
        for name, reason, detail in sample.links:
            yield SourceRecord(f"{shard}/{_safe(name)}", b"", label, meta, reject=reason, detail=detail)

    def _label_and_meta(self, sample: _Sample) -> tuple[Optional[int], dict[str, Any]]:
        """Sets the sample's rejection for a bad label or json; the label is None when the sample has none.
        A meta field is the text of the sample's member with that extension, else its json field, else ""."""
        fields: dict[str, Any] = {}
        if self._read_json and "json" in sample.members:
            try:
                fields = _json_object(sample.members["json"])
            except ValueError as e:
                sample.fail("bad_json", f"{sample.key}.json: {e}")
        meta = {name: _text(sample.members[name]) if name in sample.members else fields.get(name, "")
                for name in self.meta_fields}
        if not self.with_labels:
            return None, meta
        if self.label_field is not None:
            if fields.get(self.label_field) is None:  # no json, no such field, or null: unlabelled, as a missing cls
                return None, meta
            value, where = fields[self.label_field], f"{sample.key}.json field {self.label_field!r}"
        elif "cls" in sample.members:
            value, where = _text(sample.members["cls"]), f"{sample.key}.cls"
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
