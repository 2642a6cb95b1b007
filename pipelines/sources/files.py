"""Image files in a folder or matched by a glob, local (standard library) or on any filesystem Beam knows
(gs://, s3://, hdfs://, through apache_beam.io.filesystems, imported only for such paths)."""
from __future__ import annotations

import errno
import glob as globlib
import json
import os
import re
import stat
from typing import IO, Iterator, Optional, Sequence

from .base import (FILENAME_LABELS, SourceError, Source, SourceRecord, check_meta_fields, filename_label_pattern,
                      glob_root, has_scheme, is_glob, relative_key)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FILES_PER_UNIT = 256


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
    return sorted(p.replace(os.sep, "/") for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))


def open_file(path: str, *, use_beam: bool) -> IO[bytes]:
    """A binary file object, local or through Beam's FileSystems (never decompressed on the fly)."""
    if use_beam:
        from apache_beam.io.filesystem import CompressionTypes
        return _beam_filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return open(path, "rb")


def read_file(path: str, *, use_beam: bool) -> bytes:
    """A file's bytes. Locally only a regular file is read (opened non-blocking, so a FIFO put in its place
    cannot hang the run): FileNotFoundError if it is gone or a broken symlink, OSError if it is a folder,
    a FIFO or a device, or unreadable."""
    if use_beam:
        with open_file(path, use_beam=True) as f:
            return f.read()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", path) \
                if stat.S_ISDIR(os.fstat(fd).st_mode) else OSError(errno.EINVAL, "not a regular file", path)
        return f.read()


def expand_input(spec: str, pattern: str, suffixes: Sequence[str] = ()) -> tuple[str, list[str], bool]:
    """A glob, folder or file -> (root for keys, sorted matching paths, whether Beam's FileSystems is used).

    A folder stands for every file below it whose name ends with one of `suffixes` (any if empty). A local
    pattern may start with `~` (the user's home), as in a shell."""
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
    paths = [p for p in paths if _visible(relative_key(p, root))]
    if not paths:
        raise SourceError(spec, f"no input files match {pattern!r}")
    return root, paths, use_beam


def _filename_class(pattern: "re.Pattern", key: str) -> Optional[str]:
    """The first group of `pattern` searched in the file name of `key`, or None when it does not match."""
    match = pattern.search(key.rsplit("/", 1)[-1])
    return match.group(1) if match and match.group(1) else None


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
                 meta_fields: tuple[str, ...] = (), files_per_unit: int = FILES_PER_UNIT, labels: str = "auto"):
        self.spec, self.root, self.use_beam = spec, root, use_beam
        self.class_names, self.meta_fields = class_names, meta_fields
        self.labels = labels
        self._pattern = filename_label_pattern(spec, labels) if labels.startswith(FILENAME_LABELS) else None
        self._units = [json.dumps(keys[i:i + files_per_unit]) for i in range(0, len(keys), files_per_unit)]
        self._class_index = {name: i for i, name in enumerate(class_names or ())}

    @classmethod
    def from_spec(cls, spec: str, *, labels: str = "auto", meta_fields: Sequence[str] = (),
                  use_beam: Optional[bool] = None, files_per_unit: int = FILES_PER_UNIT) -> "FileSource":
        """Lists the files now. `use_beam=True` reads even local paths through Beam's FileSystems."""
        meta_fields = check_meta_fields(spec, meta_fields, cls.META)
        pattern = spec
        if use_beam and not has_scheme(spec):
            pattern = os.path.abspath(spec)
        root, paths, beam_paths = expand_input(spec, pattern)
        use_beam = beam_paths if use_beam is None else use_beam
        if len(paths) == 1 and not is_glob(pattern) and paths[0] == pattern:
            keys = [relative_key(pattern, root)]  # one file named explicitly: passed on whatever its name
        else:
            keys = [k for k in (relative_key(p, root) for p in paths) if is_image_name(k)]
        if not keys:
            raise SourceError(spec, f"no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) found")
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
        return cls(spec, root, keys, use_beam=use_beam, class_names=class_names, meta_fields=meta_fields,
                   files_per_unit=files_per_unit, labels=labels)

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

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        for key in json.loads(unit):
            class_name = self._class_name(key)
            label = self._class_index[class_name] if class_name is not None else None
            path = self._path(key)
            meta = {name: (path if name == "path" else class_name or "") for name in self.meta_fields}
            try:
                data = read_file(path, use_beam=self.use_beam)
            except Exception as e:  # vanished or unreadable since listing: recorded, not fatal
                reason = "missing" if isinstance(e, FileNotFoundError) else "unreadable"
                yield SourceRecord(key, b"", label, meta, reject=reason, detail=f"{type(e).__name__}: {e}")
                continue
            yield SourceRecord(key, data, label, meta)
