"""One owner per output folder: a lock record created atomically before a run touches the folder.

API (any pipeline): `claim = claim_output(dir, overwrite=...)` (creates the folder, takes the lock, then
empties it if overwrite), `claim.check()` before anything that declares the output complete (write_manifest
does it when given `owner=claim.token`), `claim.release()` at the end, success or failure (or use the claim
as a context manager).

The lock, `.navit-pack.lock`, is JSON {host, pid, proc_start, started, command, token}. Local folders use
O_CREAT|O_EXCL; gs:// uses a create with generation precondition 0 (google-cloud-storage, when installed).
A lock is dead, and taken over with a note on stderr, when its host is this host and its pid is gone (or is
another process than the one recorded), or when it is older than STALE_AFTER_S and held by another host.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Callable, Optional

from ._schema import SchemaError

LOCK = ".navit-pack.lock"
STALE_AFTER_S = 24 * 3600  # a lock of another host (or on an object store) older than this is a dead run's


class OutputLocked(SchemaError):
    """Another live run owns the output folder."""


class OwnershipLost(SchemaError):
    """This run's lock on its output folder was removed or replaced by another run before it finished."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(record: dict, now: float) -> bool:
    if record.get("host") != socket.gethostname():
        return now - float(record.get("started", 0)) < STALE_AFTER_S
    pid = int(record.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    recorded, current = record.get("proc_start"), _proc_start(pid)
    return recorded is None or current is None or recorded == current


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    return (f"host {record.get('host')}, pid {record.get('pid')}, started {started}, "
            f"command {record.get('command', '?')!r}")


class _LocalLock:
    """The lock file in a local folder; its `version` is its content."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def read(self) -> Optional[tuple[bytes, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def remove(self, version: Any) -> bool:
        """Remove the lock if it still holds `version`: moved aside atomically, compared, put back if not."""
        aside = f"{self.path}.{uuid.uuid4().hex}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != version:  # another run's fresh lock: give it back (unless a third run took the name)
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True


class _GcsLock:
    """The lock object under a gs:// prefix; its `version` is the object generation (preconditions make
    create, take-over and release atomic). Not covered by tests (no bucket offline)."""

    def __init__(self, directory: str):
        from google.cloud import storage  # optional: pip install google-cloud-storage

        bucket, _, prefix = directory[len("gs://"):].partition("/")
        self.bucket = storage.Client().bucket(bucket)
        self.name = f"{prefix.rstrip('/')}/{LOCK}" if prefix else LOCK

    def create(self, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.bucket.blob(self.name).upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True

    def read(self) -> Optional[tuple[bytes, Any]]:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = self.bucket.get_blob(self.name)
        if blob is None:
            return None
        try:
            return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
        except (NotFound, PreconditionFailed):
            return self.read()

    def remove(self, version: Any) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.bucket.blob(self.name).delete(if_generation_match=version)
        except (NotFound, PreconditionFailed):
            return False
        return True


def _store(directory: "str | os.PathLike[str]"):
    directory = os.fspath(directory)  # write_dataset and the readers accept pathlib paths too
    return _GcsLock(directory) if directory.startswith("gs://") else _LocalLock(directory)


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data.decode("utf-8"))
        return record if isinstance(record, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}  # a lock whose writer died mid-write: judged by its (missing) fields


class OutputClaim:
    """This run's ownership of `directory` (see the module docstring)."""

    def __init__(self, directory: str, record: dict, store):
        self.directory, self.record, self._store = directory, record, store
        self.token = record["token"]

    def check(self) -> None:
        """Raise OwnershipLost unless the lock is still this run's."""
        check_owner(self.directory, self.token)

    def release(self) -> None:
        """Remove the lock if it is still this run's (never another run's)."""
        held = self._store.read()
        if held is not None and _parse(held[0]).get("token") == self.token:
            self._store.remove(held[1])

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_owner(directory: str, token: str) -> None:
    """Raise OwnershipLost unless `directory`'s lock holds `token`."""
    held = _store(directory).read()
    record = _parse(held[0]) if held else None
    if record is None or record.get("token") != token:
        now = f"now held by {describe(record)}" if record else "the lock is gone"
        raise OwnershipLost(f"{directory}: this run no longer owns the output folder ({now}); its output is not "
                            "complete and no manifest was written")


def take_lock(directory: str, *, command: Optional[str] = None,
              note: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> OutputClaim:
    """Create `directory`'s lock for this process; take over a dead run's lock (with a note); raise
    OutputLocked naming a live owner. The folder must exist (local) before this is called."""
    store = _store(directory)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
              "started": time.time(), "command": command if command is not None else " ".join(sys.argv),
              "token": uuid.uuid4().hex}
    data = json.dumps(record, sort_keys=True).encode()
    for attempt in range(5):
        if store.create(data):
            return OutputClaim(directory, record, store)
        held = store.read()
        if held is None:
            continue  # released between our create and read
        other = _parse(held[0])
        if not other and attempt < 4:
            time.sleep(0.1)  # created but not yet written by its run; a dead writer's stays empty
            continue
        if _alive(other, time.time()):
            raise OutputLocked(f"output folder {directory} is in use by another run ({describe(other)}); "
                               f"wait for it, or remove {LOCK} if that run is gone")
        if store.remove(held[1]):
            note(f"navit-pack: note: taking over {directory} from a run that is gone ({describe(other)})")
            if store.create(data):
                return OutputClaim(directory, record, store)
    raise OutputLocked(f"output folder {directory}: could not take its lock (other runs keep taking it)")
