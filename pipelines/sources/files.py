"""Image files in a folder or matched by a glob, local (standard library) or on any filesystem Beam knows
(gs://, s3://, hdfs://, through apache_beam.io.filesystems, imported only for such paths).

Local folders and globs are listed by one walk (`walk_local`) that never lists a folder twice: each folder
is identified by its real path, the physical tree is listed first, and a folder symlink is followed only
to a folder not listed yet (a symlink back to a folder above it is a `symlink_loop`, one to a folder
already listed under another path is `folder_seen`; both are counted, not followed). What a listing
passes over is counted by reason (`SKIP_REASONS`), with a few examples."""
from __future__ import annotations

import collections
import dataclasses
import errno
import fnmatch
import functools
import glob as globlib
import json
import os
import re
import stat
import struct
import copy
from typing import IO, Iterator, Optional, Sequence

from .base import (FILENAME_LABELS, Listed, SourceError, Source, SourceRecord, check_meta_fields,
                   filename_label_pattern, glob_root, has_scheme, is_glob, relative_key)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FILES_PER_UNIT = 256

# What a folder or glob listing passes over: not inputs, so counted (FileSource.skipped), never rejected.
SKIP_REASONS = {
    "hidden": "a file or folder whose name starts with '.' (.DS_Store, ._x.jpg, .cache/); a hidden folder "
              "counts once and is not listed",
    "other_extension": "a file (or a FIFO, a device, a broken symlink) whose extension is not an image type",
    "folder_named_like_image": "a folder whose name ends in an image extension (x.jpg/): not an image; what it "
                               "holds is listed as usual",
    "symlink_loop": "a folder symlink to the folder it sits in or one above it: not followed",
    "folder_seen": "a folder symlink to a folder already listed under another path: not followed",
}
MAX_SKIP_EXAMPLES = 3


def is_image_name(path: str) -> bool:
    """Judged by extension only (any case): a file whose extension lies is passed on and the decoder rejects it."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _visible(rel: str) -> bool:
    """Hidden files and folders (.DS_Store, ._x.jpg, .cache/) are not part of a dataset."""
    return not any(part.startswith(".") for part in rel.split("/"))


def _beam_filesystems():
    from apache_beam.io.filesystems import FileSystems
    return FileSystems


def match_files(spec: str, pattern: str, *, use_beam: bool) -> list[str]:
    """Sorted paths of the files a glob matches ("**" crosses folders)."""
    if use_beam:
        try:
            results = _beam_filesystems().match([pattern])
        except Exception as e:  # Beam raises BeamIOError or ValueError (filesystem not installed)
            raise SourceError(spec, f"cannot list {pattern!r}: {e}") from None
        return sorted(m.path for m in results[0].metadata_list)
    walk = walk_local(spec, pattern)
    if walk is None:  # a glob with '.' or '..' after its first wildcard: the standard library's (follows loops)
        return sorted(p.replace(os.sep, "/") for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    return sorted(walk.path(e.rel) for e in walk.entries if e.kind == "file")


# ----------------------------------------------------------------------------- local listing
@dataclasses.dataclass
class Entry:
    """One listed non-folder entry: `rel` is its path relative to the walk's root (through the names the walk
    followed). kind: "file" (a regular file, also through a symlink), "special" (a FIFO, socket or device),
    "broken" (a symlink to nothing, or into a loop) or "unreadable" (a folder that cannot be listed)."""

    rel: str
    kind: str
    link: bool = False  # the entry itself is a symlink
    detail: str = ""


class Skips:
    """Counts by reason of what a listing passed over, with the first MAX_SKIP_EXAMPLES examples of each."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_SKIP_EXAMPLES:
            shown.append(example)


@dataclasses.dataclass
class Walk:
    """The result of walk_local: entries matched (files and other non-folders), what was skipped, and the
    real path of every folder listed -> its relative path ("" for the root)."""

    root: str
    entries: list[Entry]
    skips: Skips
    folders: dict[str, str]

    def path(self, rel: str) -> str:
        return rel if self.root in ("", ".") else f"{self.root.rstrip('/')}/{rel}"


def _pattern_parts(pattern: str) -> tuple[str, Optional[tuple[str, ...]]]:
    """A glob -> (its fixed prefix, the components after it); None for the components where one of them is
    '.' or '..' (the walk cannot match those)."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if is_glob(part):
            rest = tuple(p for p in parts[i:] if p)
            return glob_root(pattern), (None if any(p in (".", "..") for p in rest) else rest)
    raise ValueError(f"not a glob: {pattern!r}")


@functools.lru_cache(maxsize=4096)
def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Does the relative path `parts` match the glob components (`**` matches zero or more folders)?"""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


@functools.lru_cache(maxsize=4096)
def _may_hold_matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Could something below the folder `parts` match the glob components?"""
    if not pattern:
        return False
    if pattern[0] == "**" or not parts:
        return True
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _may_hold_matches(parts[1:], pattern[1:])


def walk_local(spec: str, pattern: str) -> Optional[Walk]:
    """List a local folder (every entry below it) or glob (the entries it matches) without following a
    symlink into a loop or into a folder listed already; None for a glob this walk cannot match (see
    _pattern_parts). Entries come in no particular order. Raises SourceError if the root cannot be listed."""
    if is_glob(pattern):
        root, glob_parts = _pattern_parts(pattern)
        if glob_parts is None:
            return None
    else:
        root, glob_parts = pattern.rstrip("/") or "/", None
    entries: list[Entry] = []
    skips = Skips()
    root_real = os.path.realpath(root)
    folders = {root_real: ""}
    links: collections.deque = collections.deque()  # folder symlinks, followed after the physical tree

    def wanted(parts: tuple[str, ...]) -> tuple[bool, bool]:
        """(the entry itself matches, something below it may match)."""
        if glob_parts is None:
            return True, True
        return _matches(parts, glob_parts), _may_hold_matches(parts, glob_parts)

    def scan(path: str, prefix: tuple[str, ...], real: str) -> None:
        stack = [(path, prefix, real)]
        while stack:
            path, prefix, real = stack.pop()
            try:
                with os.scandir(path) as it:
                    listed = sorted(it, key=lambda e: e.name)
            except OSError as e:
                if not prefix:
                    raise SourceError(spec, f"cannot list {path!r}: {type(e).__name__}: {e.strerror or e}") from None
                entries.append(Entry("/".join(prefix), "unreadable", detail=f"cannot list the folder: "
                                                                            f"{type(e).__name__}: {e.strerror or e}"))
                continue
            for entry in listed:
                parts = prefix + (entry.name,)
                matched, below = wanted(parts)
                if not matched and not below:
                    continue  # not selected by the glob
                rel = "/".join(parts)
                if entry.name.startswith("."):  # counted where the spec names it (a glob: matches it)
                    if matched:
                        skips.add("hidden", rel)
                    continue
                try:
                    is_link = entry.is_symlink()
                    if is_link:
                        try:
                            mode = os.stat(entry.path).st_mode
                        except OSError as e:  # to nothing, or a chain of links into a loop
                            if matched:
                                entries.append(Entry(rel, "broken", True, _link_detail(entry.path, e)))
                            continue
                    else:  # from the folder listing's entry type: no system call per file
                        mode = (stat.S_IFDIR if entry.is_dir(follow_symlinks=False) else
                                stat.S_IFREG if entry.is_file(follow_symlinks=False) else
                                entry.stat(follow_symlinks=False).st_mode)
                except OSError as e:  # gone since the folder was listed
                    if matched:
                        entries.append(Entry(rel, "broken", False, f"{type(e).__name__}: {e.strerror or e}"))
                    continue
                if stat.S_ISDIR(mode):
                    if matched and is_image_name(entry.name):
                        skips.add("folder_named_like_image", rel + "/")
                    if not below:
                        continue
                    if is_link:
                        links.append((entry.path, parts, real))
                    else:
                        sub_real = os.path.join(real, entry.name)
                        folders[sub_real] = rel
                        stack.append((entry.path, parts, sub_real))
                elif matched:
                    entries.append(Entry(rel, "file" if stat.S_ISREG(mode) else "special", is_link))

    scan(root, (), root_real)
    while links:  # breadth-first over the folder symlinks found, in the order found (deterministic)
        path, parts, parent_real = links.popleft()
        rel = "/".join(parts)
        real = os.path.realpath(path)
        if real == parent_real or parent_real.startswith(real.rstrip("/") + "/"):
            skips.add("symlink_loop", f"{rel} -> {os.readlink(path)}")
        elif real in folders:
            skips.add("folder_seen", f"{rel} -> {folders[real] or '.'}")
        else:
            folders[real] = rel
            scan(path, parts, real)
    return Walk(root, entries, skips, folders)


def _link_detail(path: str, error: OSError) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"a symlink to {target!r}, which cannot be opened: {type(error).__name__}: {error.strerror or error}"


def open_file(path: str, *, use_beam: bool) -> IO[bytes]:
    """A binary file object, local or through Beam's FileSystems (never decompressed on the fly)."""
    if use_beam:
        from apache_beam.io.filesystem import CompressionTypes
        return _beam_filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return open(path, "rb")


def open_image_file(path: str, *, use_beam: bool) -> tuple[IO[bytes], int]:
    """(a binary file object, its size). Locally only a regular file is opened (non-blocking, so a FIFO put
    in its place cannot hang the run): FileNotFoundError if it is gone or a broken symlink, OSError if it is
    a folder, a FIFO or a device, or unreadable."""
    if use_beam:
        f = open_file(path, use_beam=True)
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        return f, size
    fd, st = open_local(path)
    return open(fd, "rb", buffering=0, closefd=True), st.st_size  # unbuffered: a header read takes what it asks for


def open_local(path: str) -> tuple[int, os.stat_result]:
    """(an open file descriptor, its fstat) of a local regular file: open_image_file's checks and errors."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", path) \
            if stat.S_ISDIR(st.st_mode) else OSError(errno.EINVAL, "not a regular file", path)
    return fd, st


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is rewritten, replaced or touched: inode, device, size, mtime, ctime."""
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _SizeMemo:
    """A unit's plain-JPEG display sizes from its last full header pass, each with its file's identity at
    the read (_identity), packed 48 bytes an image. A later pass stats the file and keeps the size when the
    identity is unchanged (as git's index trusts a file's stat), else reads the header again."""

    _ROW = struct.Struct("<5q2i")

    def __init__(self, max_pixels: int, rows: list):
        self.max_pixels = max_pixels
        none = (-1, -1, -1, -1, -1, 0, 0)  # never an identity: inodes and sizes are >= 0
        self._table = b"".join(self._ROW.pack(*(row or none)) for row in rows)

    def get(self, i: int, path: str) -> "tuple | None":
        """Image i's row (identity + (height, width)) when its file is as it was; None otherwise."""
        if (i + 1) * self._ROW.size > len(self._table):
            return None
        row = self._ROW.unpack_from(self._table, i * self._ROW.size)
        if row[0] < 0:
            return None
        try:
            same = _identity(os.stat(path)) == row[:5]
        except OSError:  # gone or unreadable: the header read records why
            return None
        return row if same else None


def read_file(path: str, *, use_beam: bool) -> bytes:
    """A file's bytes (open_image_file's checks and errors)."""
    f, _ = open_image_file(path, use_beam=use_beam)
    with f:
        return f.read()


def expand_input(spec: str, pattern: str, suffixes: Sequence[str] = (),
                 keep_hidden: bool = False) -> tuple[str, list[str], bool]:
    """A glob, folder or file -> (root for keys, sorted matching paths, whether Beam's FileSystems is used).

    A folder stands for every file below it whose name ends with one of `suffixes` (any if empty). Hidden
    paths are left out unless `keep_hidden` (then the caller counts them). A local pattern may start with
    `~` (the user's home), as in a shell."""
    use_beam = has_scheme(pattern)
    if not use_beam:
        pattern = os.path.expanduser(pattern)
    if is_glob(pattern):
        root, paths = glob_root(pattern), match_files(spec, pattern, use_beam=use_beam)
    elif not use_beam and os.path.isfile(pattern):
        return os.path.dirname(pattern) or ".", [pattern], False
    elif not use_beam and not os.path.isdir(pattern):
        raise SourceError(spec, f"{pattern!r} does not exist")
    else:
        root = pattern.rstrip("/") or "/"
        paths = match_files(spec, root.rstrip("/") + "/**", use_beam=use_beam)
        if not paths and use_beam and match_files(spec, pattern, use_beam=True) == [pattern]:
            return pattern.rsplit("/", 1)[0], [pattern], True  # a single remote file
        if suffixes:
            paths = [p for p in paths if p.lower().endswith(tuple(suffixes))]
    if not keep_hidden:
        paths = [p for p in paths if _visible(relative_key(p, root))]
    if not paths:
        raise SourceError(spec, f"no input files match {pattern!r}")
    return root, paths, use_beam


@dataclasses.dataclass
class ImageListing:
    """The image files of a folder or glob: `keys` (sorted, relative to `root`) include those already known to
    be unusable, with their (reason, detail) in `rejects`; `skips` counts what is not an image at all."""

    root: str
    keys: list[str]
    rejects: dict[str, tuple[str, str]]
    skips: Skips
    use_beam: bool


def list_images(spec: str, pattern: str) -> ImageListing:
    """List the image files a folder, glob or file names (see FileSource). Locally, through walk_local:

    - a file reached through a symlink is identified by its real path: a second path to one file (a symlink
      to a file listed already, or two symlinks to one file) is rejected `duplicate_file`, naming the key
      kept. The key kept is the file's own path when it is listed, else the first symlink in key order.
      Hard links are separate files (each is packed).
    - a broken symlink with an image name is rejected `missing`, a folder that cannot be listed `unreadable`
      (its path is the key);
    - hidden entries, other extensions, folders named like images, folder symlink loops and folders seen
      twice are counted in `skips` (SKIP_REASONS).
    Raises SourceError if the input does not exist or holds no image file. A local pattern may start with
    `~` (the user's home), as in a shell."""
    use_beam = has_scheme(pattern)
    if not use_beam:
        pattern = os.path.expanduser(pattern)
    skips = Skips()
    rejects: dict[str, tuple[str, str]] = {}
    if not use_beam and not is_glob(pattern) and os.path.isfile(pattern):  # one file named outright
        return ImageListing(os.path.dirname(pattern) or ".", [os.path.basename(pattern)], rejects, skips, False)
    if not use_beam and not is_glob(pattern) and not os.path.isdir(pattern):
        raise SourceError(spec, f"{pattern!r} does not exist")
    walk = None if use_beam else walk_local(spec, pattern)
    if walk is None:  # Beam's FileSystems, or a glob the walk cannot match
        root, paths, _ = expand_input(spec, pattern, keep_hidden=True)
        if len(paths) == 1 and not is_glob(pattern) and paths[0] == pattern:  # a single remote file
            return ImageListing(root, [relative_key(pattern, root)], rejects, skips, use_beam)
        entries = [Entry(relative_key(p, root), "file") for p in paths]
    else:
        root, entries, skips = walk.root, walk.entries, walk.skips
    keys, links = [], []
    for e in entries:
        if e.kind == "unreadable":
            rejects[e.rel] = ("unreadable", e.detail)
        elif not _visible(e.rel):  # only on paths not walked (the walk skips hidden entries itself)
            skips.add("hidden", e.rel)
            continue
        elif not is_image_name(e.rel):
            skips.add("other_extension", e.rel)
            continue
        elif e.kind == "broken":
            rejects[e.rel] = ("missing", e.detail)
        elif e.link and e.kind == "file":
            links.append(e.rel)
        keys.append(e.rel)
    if links:
        _reject_second_paths(walk, sorted(links), set(keys) - set(links) - set(rejects), rejects)
    if not keys:
        found = f"; skipped: {describe_skips(skips.counts)}" if skips.counts else ""
        if not entries:
            raise SourceError(spec, f"no input files match {pattern!r}{found}")
        raise SourceError(spec, f"no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) found{found}")
    return ImageListing(root, sorted(keys), rejects, skips, use_beam)


def _reject_second_paths(walk: Walk, links: list[str], plain: set[str], rejects: dict[str, tuple[str, str]]) -> None:
    """Reject every symlink whose file is listed already: by its own path (a plain key), or by an earlier link."""
    first_link: dict[str, str] = {}
    for rel in links:
        real = os.path.realpath(walk.path(rel))
        folder, name = os.path.split(real)
        kept = None
        if folder in walk.folders:
            own = f"{walk.folders[folder]}/{name}" if walk.folders[folder] else name
            kept = own if own in plain else None
        kept = kept or first_link.get(real)
        if kept is None:
            first_link[real] = rel
        else:
            rejects[rel] = ("duplicate_file", f"a symlink to {real!r}, the same file as {kept!r}, which is kept "
                                              "(a file is read once, by its real path)")


def describe_skips(counts) -> str:
    """{"hidden": 2, "other_extension": 1} -> "2 hidden, 1 other_extension"."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _filename_class(pattern: "re.Pattern", key: str) -> Optional[str]:
    """The first group of `pattern` searched in the file name of `key`, or None when it does not match."""
    match = pattern.search(key.rsplit("/", 1)[-1])
    return match.group(1) if match and match.group(1) else None


def _unreadable_reason(error: Exception) -> str:
    return "missing" if isinstance(error, FileNotFoundError) else "unreadable"


class FileSource(Source):
    """Image files; key = path relative to the folder (or the glob's fixed prefix), POSIX separators.

    Labels: with labels="auto" and every image in a sub-folder, the first sub-folder name is the class
    (sorted class names -> 0, 1, ...); "folder" demands that layout; "none" gives no labels;
    "filename:REGEX" takes the class name from the first group of REGEX searched in the file name
    (without its folders); a file whose name does not match gets no label (-1).
    Units are JSON lists of up to FILES_PER_UNIT relative paths, in sorted order."""

    unique_keys = True
    META = ("path", "class_name")

    def __init__(self, spec: str, root: str, keys: list[str], *, use_beam: bool, class_names: Optional[tuple[str, ...]],
                 meta_fields: tuple[str, ...] = (), files_per_unit: int = FILES_PER_UNIT, labels: str = "auto",
                 rejects: Optional[dict[str, tuple[str, str]]] = None, skips: Optional[Skips] = None):
        self.spec, self.root, self.use_beam = spec, root, use_beam
        self.class_names, self.meta_fields = class_names, meta_fields
        self.labels = labels
        self._rejects = dict(rejects or {})  # key -> (reason, detail), known from the listing
        skips = skips or Skips()
        self.skipped, self.skipped_examples = dict(skips.counts), {r: list(e) for r, e in skips.examples.items()}
        self._pattern = filename_label_pattern(spec, labels) if labels.startswith(FILENAME_LABELS) else None
        self._units = [json.dumps(keys[i:i + files_per_unit]) for i in range(0, len(keys), files_per_unit)]
        self._class_index = {name: i for i, name in enumerate(class_names or ())}
        self._memo: dict[str, _SizeMemo] = {}  # unit -> its header pass's sizes (headers)

    @classmethod
    def from_spec(cls, spec: str, *, labels: str = "auto", meta_fields: Sequence[str] = (),
                  use_beam: Optional[bool] = None, files_per_unit: int = FILES_PER_UNIT) -> "FileSource":
        """Lists the files now. `use_beam=True` reads even local paths through Beam's FileSystems."""
        meta_fields = check_meta_fields(spec, meta_fields, cls.META)
        pattern = spec
        if use_beam and not has_scheme(spec):
            pattern = os.path.abspath(spec)
        listing = list_images(spec, pattern)
        root, all_keys = listing.root, listing.keys
        use_beam = listing.use_beam if use_beam is None else use_beam
        keys = [k for k in all_keys if k not in listing.rejects]  # labels come from the usable ones
        if not keys:
            reasons = describe_skips(collections.Counter(reason for reason, _ in listing.rejects.values()))
            raise SourceError(spec, f"no usable image file: {reasons}; e.g. {next(iter(listing.rejects.items()))}")
        nested = ["/" in k for k in keys]
        if labels == "folder" and not all(nested):
            loose = keys[nested.index(False)]
            raise SourceError(spec, f"labels='folder' needs every image in a class sub-folder, but {loose!r} is not")
        if labels == "auto" and any(nested) and not all(nested):
            loose, inner = keys[nested.index(False)], keys[nested.index(True)]
            raise SourceError(spec, f"some images sit in sub-folders ({inner!r}) and some do not ({loose!r}), so the "
                                    "sub-folder labels are ambiguous: pass labels='none' or move the loose images")
        if labels.startswith(FILENAME_LABELS):
            pattern = filename_label_pattern(spec, labels)
            class_names = tuple(sorted({c for c in (_filename_class(pattern, k) for k in keys) if c is not None}))
        else:
            class_names = tuple(sorted({k.split("/", 1)[0] for k in keys})) if labels != "none" and all(nested) else None
        return cls(spec, root, all_keys, use_beam=use_beam, class_names=class_names, meta_fields=meta_fields,
                   files_per_unit=files_per_unit, labels=labels, rejects=listing.rejects, skips=listing.skips)

    def label_description(self) -> str:
        if self.class_names is None:
            return "none: every label is -1"
        if self._pattern is not None:
            return f"from file names by {self._pattern.pattern}: {len(self.class_names)} classes"
        return f"from folder names: {len(self.class_names)} classes"

    def _class_name(self, key: str) -> Optional[str]:
        if self.class_names is None:
            return None
        if self._pattern is not None:
            return _filename_class(self._pattern, key)
        return key.split("/", 1)[0]

    def units(self) -> list[str]:
        return list(self._units)

    def _path(self, key: str) -> str:
        return key if self.root in ("", ".") else f"{self.root.rstrip('/')}/{key}"

    def _describe(self, key: str) -> tuple[str, Optional[int], dict, Optional[tuple[str, str]]]:
        """(path, label, meta, the listing's (reason, detail) reject or None) of a file of the listing."""
        path = self._path(key)
        known = self._rejects.get(key)
        if known is not None:  # unusable from the listing: a second path to a file, a broken link ...
            return path, None, {name: (path if name == "path" else "") for name in self.meta_fields}, known
        class_name = self._class_name(key)
        label = self._class_index[class_name] if class_name is not None else None
        return path, label, {name: (path if name == "path" else class_name or "") for name in self.meta_fields}, None

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        for key in json.loads(unit):
            path, label, meta, known = self._describe(key)
            if known is not None:
                yield SourceRecord(key, b"", label, meta, reject=known[0], detail=known[1])
                continue
            try:
                data = read_file(path, use_beam=self.use_beam)
            except Exception as e:  # vanished or unreadable since listing: recorded, not fatal
                yield SourceRecord(key, b"", label, meta, reject=_unreadable_reason(e), detail=f"{type(e).__name__}: {e}")
                continue
            yield SourceRecord(key, data, label, meta)

    def scan(self, unit: str) -> Iterator[Listed]:
        """Each file by reference (its key), unread: the listing opens it (open_ref) for its header."""
        return (r for _, r in self._scan(unit, None))

    def _scan(self, unit: str, memo: "Optional[_SizeMemo]") -> Iterator[tuple[Optional[tuple], Listed]]:
        """scan's records, each with its memo row (and the row's size on the record) where `memo` holds the
        file as it is now, else None."""
        for i, key in enumerate(json.loads(unit)):
            path, label, meta, known = self._describe(key)
            if known is not None:
                yield None, Listed(key, label, meta, reject=known[0], detail=known[1])
                continue
            row = memo.get(i, path) if memo is not None else None
            yield row, Listed.by_ref(key, label, meta, key, None if row is None else row[5:])

    def open_ref(self, ref: str) -> tuple[IO[bytes], int]:
        return open_image_file(self._path(ref), use_beam=self.use_beam)

    def fetch(self, ref: str) -> bytes:
        """Source.fetch; a local file in one read of its size (and a byte more, which finds the end) on
        its descriptor: what every fill worker runs per image (a fifth less CPU than through a file object)."""
        if self.use_beam:
            return super().fetch(ref)
        fd, st = open_local(self._path(ref))
        try:
            data = os.read(fd, st.st_size + 1)
            if len(data) <= st.st_size:  # a short read: the end (the usual case)
                return data
            chunks = [data]  # the file grew since its fstat: read to its end
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_size(self, ref: str, max_pixels: int) -> tuple[tuple[int, int], Optional[bytes]]:
        if self.use_beam:
            return super().read_size(ref, max_pixels)
        return self._read_local_size([], ref, max_pixels)

    def _read_local_size(self, identity: list, ref: str, max_pixels: int) -> tuple[tuple[int, int], Optional[bytes]]:
        """read_size of a local file through its file descriptor (fewer system calls than a file object);
        appends the file's _identity at the read to `identity`."""
        import packer

        fd, st = open_local(self._path(ref))
        try:
            identity.append(_identity(st))
            return packer.read_image_size(fd, st.st_size, max_pixels)
        finally:
            os.close(fd)

    def headers(self, unit: str, max_pixels: int) -> Iterator[Listed]:
        """Source.headers; a local plain JPEG whose file is unchanged since this source's last pass over the
        unit keeps the size read then (_SizeMemo: one stat instead of opening and reading it)."""
        if self.use_beam:
            yield from super().headers(unit, max_pixels)
            return
        memo = self._memo.get(unit)
        memo = memo if memo is not None and memo.max_pixels == max_pixels else None
        rows = []
        for row, r in self._scan(unit, memo):
            if row is not None:
                rows.append(row)
                yield r
                continue
            identity: list = []
            listed = self._sized(r, max_pixels, functools.partial(self._read_local_size, identity))
            plain = bool(identity) and listed.size is not None and listed.data is None and listed.reject is None
            rows.append(identity[0] + tuple(listed.size) if plain else None)
            yield listed
        self._memo[unit] = _SizeMemo(max_pixels, rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memo"] = {}  # copies (fill workers, Beam) start without this process's memo
        return state

    def reader(self) -> "FileSource":
        light = copy.copy(self)
        light._units = []  # the listing stays here; each scan call carries its unit
        return light
