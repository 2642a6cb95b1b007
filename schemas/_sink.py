"""A shard's bytes written to disk by a child process that hashes them (sha256) as they pass and fsyncs the
file: the writing process only copies bytes into a pipe. This takes the digest, the disk write and the fsync
off the batch job's main process, and lets the ArrayRecord writer (which takes a path, never a file object)
be hashed as it writes instead of read back. Any format's writer writes to `file()` or to `path`
(/dev/fd/N of the pipe); the bytes on disk are the same as a direct write (tested per format).

Records already in shared memory (packer.SharedBytes: rows that fill workers encoded) need not pass through
the pipe at all: with `shared_fd` (the pool's file of encoded rows, which the child maps), the pipe carries
framed messages, each record either inline ("B", its length, its bytes) or by location ("R", offset,
length), and the child answers each record read by location with one byte on an acknowledgement pipe.
`SharedBytes.until_read` waits for that byte, so the pool's slot is reused only after the child read it.

The child runs in a session of its own (a terminal's Ctrl-C reaches the writer, which ends the child), and
a writer killed outright leaves it to finish a temporary file on EOF that the next run removes. A failed
write in the child (a full disk, a file-size limit) comes back as the OSError it raised, with its errno.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import struct
import subprocess
import sys

from packer import SharedBytes

AVAILABLE = os.path.isdir("/dev/fd") and sys.platform != "win32"
_PIPE_BYTES = 1 << 20  # a pipe this large takes a whole record frame at once where the system allows it

_FLUSH_BYTES = 16 << 20  # the child sends what it has written to disk in the background every this many bytes

_CHILD = r"""
import hashlib, os, queue, sys, threading
h, n, synced, failed = hashlib.sha256(), 0, 0, []
kicks = queue.SimpleQueue()


def flusher():
    # The bytes written so far go to disk while more come (an fdatasync here each time FLUSH more bytes are
    # written), so that the fsync at the end, which the writer waits for, has little left to do (a 175 MB
    # shard: about 25 ms instead of 260).
    global synced
    while kicks.get():
        try:
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as e:  # the fsync below would not see it again: keep it
            failed.append(e)
            return
        synced += 1


try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
    flush_every = next_flush = int(sys.argv[2])
    background = threading.Thread(target=flusher, daemon=True)
    background.start()
    if len(sys.argv) > 3:  # framed: records inline or by location in the shared file
        import mmap, struct
        shared, ack = int(sys.argv[3]), int(sys.argv[4])
        region = memoryview(mmap.mmap(shared, 0, prot=mmap.PROT_READ))
        src = open(0, "rb", buffering=1 << 16)

        def records():
            while head := src.read(17):
                kind, a, b = struct.unpack("<cQQ", head)
                if kind == b"R" and a + b <= len(region):
                    yield region[a:a + b], True
                elif kind == b"B" and len(data := src.read(a)) == a:
                    yield data, False
                else:
                    raise OSError(5, f"a malformed or cut message from the writer ({kind!r}, {a}, {b})")
    else:
        records = lambda: ((b, False) for b in iter(lambda: os.read(0, 1 << 20), b""))
    for b, by_location in records():
        h.update(b)
        v = memoryview(b)
        while v:
            v = v[os.write(fd, v):]
        n += len(b)
        if by_location:
            os.write(ack, b"\0")
        if n >= next_flush:
            next_flush = n + flush_every
            if failed:
                raise failed[0]
            kicks.put(True)
    kicks.put(False)
    background.join()
    if failed:
        raise failed[0]
    os.fsync(fd)
    os.close(fd)
except OSError as e:
    sys.stdout.write(f"error {e.errno or 0} {e.strerror or e}\n")
    sys.exit(1)
sys.stdout.write(f"ok {h.hexdigest()} {n} {synced}\n")
"""
_HEAD = struct.Struct("<cQQ")
# Records by location go to the child this many at a time (or sooner, when one is waited for): the child
# then wakes once per batch, not once per record, and on a shared core preempts a fill worker less often.
_QUEUED = 4


class SinkFile(io.RawIOBase):
    """The writer's side of the pipe as a binary file that counts what it takes (tell(), for pyarrow)."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd, self._pos = fd, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        _write_all(self._fd, view)
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def writable(self) -> bool:
        return True


class FramedFile:
    """The writer's side of a framed pipe (see the module doc): write() takes bytes, or a SharedBytes in the
    child's shared file, which goes by location and waits, through its `until_read`, for the child."""

    def __init__(self, sink: "ShardSink"):
        self._sink, self._pos = sink, 0

    def write(self, data) -> int:
        sink = self._sink
        if isinstance(data, SharedBytes) and data.fd == sink.shared_fd:
            n = len(data)
            sink._queue(_HEAD.pack(b"R", data.offset, n))
            sink._sent += 1
            data.until_read = functools.partial(sink._until_read, sink._sent)
        else:
            sink._send_queued()
            view = memoryview(data.view if isinstance(data, SharedBytes) else data).cast("B")
            n = view.nbytes
            _write_all(sink._w, _HEAD.pack(b"B", n, 0))
            _write_all(sink._w, view)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._sink._send_queued()

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return self._sink._w < 0


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ShardSink:
    """A child process that writes what comes through `file()` or `path` to `target`; finish() returns
    (sha256 hex digest, bytes written) once the file is on disk and fsynced. With `shared_fd`, file() is a
    FramedFile that sends SharedBytes of that file by location. close() always: it ends the child if
    finish() was not reached."""

    def __init__(self, target: str, shared_fd: int | None = None):
        self.target, self.shared_fd = target, shared_fd
        self._file: io.BufferedWriter | FramedFile | None = None
        self._said: list[str] | None = None
        self._sent = self._read = 0  # records sent by location; those the child has acknowledged
        self._queued: list[bytes] = []  # messages of records by location not yet in the pipe (_QUEUED at most)
        self._ack = -1
        self.background_syncs = 0  # the child's fdatasyncs while writing (finish() sets it)
        r, self._w = os.pipe()
        if sys.platform.startswith("linux"):
            import fcntl

            try:
                fcntl.fcntl(self._w, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe works, with more switches
        args, keep, ack_w = [], (), -1
        try:
            if shared_fd is not None:
                self._ack, ack_w = os.pipe()
                args, keep = [str(shared_fd), str(ack_w)], (shared_fd, ack_w)
            self._child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD, target, str(_FLUSH_BYTES), *args], stdin=r,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                           pass_fds=keep)
        except BaseException:
            os.close(self._w)
            if self._ack >= 0:
                os.close(self._ack)
            raise
        finally:
            os.close(r)
            if ack_w >= 0:
                os.close(ack_w)

    @property
    def path(self) -> str:
        """A path that opens the pipe (for writers that take a path; not framed)."""
        return f"/dev/fd/{self._w}"

    def file(self) -> "io.BufferedWriter | FramedFile":
        """A binary file over the pipe: buffered, or framed with `shared_fd`."""
        self._file = FramedFile(self) if self.shared_fd is not None else io.BufferedWriter(SinkFile(self._w), _PIPE_BYTES)
        return self._file

    def finish(self) -> tuple[str, int]:
        """Close the pipe and wait for the child: (sha256, size) of the file it wrote; its OSError if it failed."""
        if self._file is not None and not self._file.closed:  # a writer may close its file itself (pyarrow)
            self._file.flush()
        said = self._outcome()
        if said[0] == "ok" and len(said) == 3:
            size, self.background_syncs = (int(x) for x in said[2].split())
            return said[1], size
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
        """End the child unless it is done, and release the pipes."""
        if self._said is None:
            if self._child.poll() is None:
                self._child.kill()  # first: what is still buffered here is not sent
            self._outcome()

    def _queue(self, message: bytes) -> None:
        self._queued.append(message)
        if len(self._queued) >= _QUEUED:
            self._send_queued()

    def _send_queued(self) -> None:
        data = b"".join(self._queued)
        self._queued.clear()
        if data and self._w >= 0:  # after the pipe is closed (finish() sent them, or an error): dropped
            _write_all(self._w, data)

    def _until_read(self, n: int) -> None:
        """Wait until the child has read the first n records sent by location (or has ended)."""
        if n > self._sent - len(self._queued):  # one of them is still queued here
            self._send_queued()
        while self._read < n and self._ack >= 0:
            got = os.read(self._ack, 1 << 16)
            if not got:  # the child ended: it reads nothing more
                os.close(self._ack)
                self._ack = -1
            self._read += len(got)

    def _outcome(self) -> list[str]:
        """The child's last line, split (waits for it to end once the pipe is closed)."""
        if self._said is None:
            self._close_pipe()
            self._until_read(self._sent + 1)  # every acknowledgement, up to the child's end (it cannot block on them)
            out = self._child.communicate()[0]
            self._said = out.decode("utf-8", "replace").strip().split(" ", 2)
        return self._said

    def _close_pipe(self) -> None:
        if isinstance(self._file, io.BufferedWriter):
            try:
                self._file.close()
            except OSError:
                pass  # the child has gone: failure() says why
        self._file = None
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
