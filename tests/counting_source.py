"""A folder source that logs every read of an input (test helper, importable by the fill workers through
PYTHONPATH): each opened image appends "key<TAB>bytes read" to the file named by $NAVIT_PACK_READ_LOG."""
from __future__ import annotations

import io
import os

from pipelines.sources.base import Source
from pipelines.sources.files import FileSource, _identity

LOG_ENV = "NAVIT_PACK_READ_LOG"


class _Counted(io.RawIOBase):
    """A read-only file that counts the bytes read through it and logs them when closed."""

    def __init__(self, f, key: str):
        self._f, self._key, self.count = f, key, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"{self._key}\t{self.count}\n".encode())
            os.close(fd)
        super().close()


class CountingSource(FileSource):
    def open_ref(self, ref):
        f, length = super().open_ref(ref)
        return _Counted(f, ref), length

    def _read_local_size(self, identity, ref, max_pixels):
        """Header reads through open_ref too, so that they are counted (FileSource reads a descriptor)."""
        identity.append(_identity(os.stat(self._path(ref))))
        return Source.read_size(self, ref, max_pixels)

    def fetch(self, ref):
        """Whole reads through open_ref too (FileSource reads a local file's descriptor at once)."""
        return Source.fetch(self, ref)
