"""A shard's bytes written to disk by a child process that hashes them (sha256) as they pass and fsyncs the
file: the writing process only copies bytes into a pipe. This takes the digest, the disk write and the fsync
off the batch job's main process, and lets the ArrayRecord writer (which takes a path, never a file object)
be hashed as it writes instead of read back. Any format's writer writes to `file()` or to `path`
(/dev/fd/N of the pipe); the bytes on disk are the same as a direct write (tested per format).

The child runs in a session of its own (a terminal's Ctrl-C reaches the writer, which ends the child), and
a writer killed outright leaves it to finish a temporary file on EOF that the next run removes. A failed
write in the child (a full disk, a file-size limit) comes back as the OSError it raised, with its errno.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys

AVAILABLE = os.path.isdir("/dev/fd") and sys.platform != "win32"
_PIPE_BYTES = 1 << 20  # a pipe this large takes a whole record frame at once where the system allows it

_CHILD = r"""
import hashlib, os, sys
h, n = hashlib.sha256(), 0
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
    while True:
        b = os.read(0, 1 << 20)
        if not b:
            break
        h.update(b)
        v = memoryview(b)
        while v:
            v = v[os.write(fd, v):]
        n += len(b)
    os.fsync(fd)
    os.close(fd)
except OSError as e:
    sys.stdout.write(f"error {e.errno or 0} {e.strerror or e}\n")
    sys.exit(1)
sys.stdout.write(f"ok {h.hexdigest()} {n}\n")
"""


class SinkFile(io.RawIOBase):
    """The writer's side of the pipe as a binary file that counts what it takes (tell(), for pyarrow)."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd, self._pos = fd, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view:
            view = view[os.write(self._fd, view):]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def writable(self) -> bool:
        return True


class ShardSink:
    """A child process that writes what comes through `file()` or `path` to `target`; finish() returns
    (sha256 hex digest, bytes written) once the file is on disk and fsynced. close() always: it ends the
    child if finish() was not reached."""

    def __init__(self, target: str):
        self.target = target
        self._file: io.BufferedWriter | None = None
        self._said: list[str] | None = None
        r, self._w = os.pipe()
        if sys.platform.startswith("linux"):
            import fcntl

            try:
                fcntl.fcntl(self._w, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe works, with more switches
        try:
            self._child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD, target], stdin=r,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(self._w)
            raise
        finally:
            os.close(r)

    @property
    def path(self) -> str:
        """A path that opens the pipe (for writers that take a path)."""
        return f"/dev/fd/{self._w}"

    def file(self) -> io.BufferedWriter:
        """A buffered binary file over the pipe."""
        self._file = io.BufferedWriter(SinkFile(self._w), _PIPE_BYTES)
        return self._file

    def finish(self) -> tuple[str, int]:
        """Close the pipe and wait for the child: (sha256, size) of the file it wrote; its OSError if it failed."""
        if self._file is not None and not self._file.closed:  # a writer may close its file itself (pyarrow)
            self._file.flush()
        said = self._outcome()
        if said[0] == "ok" and len(said) == 3:
            return said[1], int(said[2])
        raise self.failure()

    def failure(self) -> OSError | None:
        """None if the child wrote what it got; else its OSError (EIO if it died without saying). Closes the
        pipe and waits for the child."""
        said = self._outcome()
        if said[0] == "ok" and len(said) == 3:
            return None
        if said[0] == "error" and len(said) == 3 and said[1].isdigit() and int(said[1]):
            return OSError(int(said[1]), said[2], self.target)
        return OSError(errno.EIO, f"the shard writer process ended with status {self._child.returncode}", self.target)

    def close(self) -> None:
        """End the child unless it is done, and release the pipe."""
        if self._said is None:
            if self._child.poll() is None:
                self._child.kill()  # first: what is still buffered here is not sent
            self._outcome()

    def _outcome(self) -> list[str]:
        """The child's last line, split (waits for it to end once the pipe is closed)."""
        if self._said is None:
            self._close_pipe()
            out = self._child.communicate()[0]
            self._said = out.decode("utf-8", "replace").strip().split(" ", 2)
        return self._said

    def _close_pipe(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the child has gone: failure() says why
            self._file = None
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
