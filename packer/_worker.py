"""The fill worker processes of packer._pool.FillPool: their main loop, and this process's idle ones.

A worker is started with subprocess (`python -c`, importing packer only: no TensorFlow, no re-import of
the caller's __main__), with SIGINT ignored (the parent decides) and single-threaded codecs. It attaches
to a pool (config, reader, and three anonymous shared-memory files passed by descriptor: input ring,
output slots, heartbeat), fills the tasks it is sent straight into the output slots, replies (task id,
failed slots), runs the pool's map() calls (fn(reader, item), answered in turn), and on "detach" waits for the next pool of the same parent. It exits when its socket
closes (the parent is gone: quietly), on None, or when a reply cannot be sent; and, quietly too, within
a second of its parent's death even mid-fill or when the socket's other end lives on in another
process (a thread watches os.getppid()).

Test hook: a worker SIGKILLs itself before filling the key named by the environment variable
NAVIT_PACK_TEST_CRASH_KEY (read by the pool when it attaches its workers).
"""
from __future__ import annotations

import atexit
import gc
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Pipe
from multiprocessing.reduction import recv_handle
from typing import Any, Optional

import numpy as np

from ._assemble import Encoder, Reader, assemble_into, fill_all, row_record
from ._config import PackConfig
from ._record import slot_layout, slot_views
from ._transform import ImagePlan

CRASH_KEY_ENV = "NAVIT_PACK_TEST_CRASH_KEY"
HB_IMAGES = 1 << 16  # heartbeat: job index in the task * HB_IMAGES + image index


def _payload(span: tuple, ring) -> Any:
    """An image's payload as the pool sent it: a view of the input ring, inline bytes, or a reference
    (which fill_all reads through the pool's reader)."""
    return ring[span[1]:span[1] + span[2]] if span[0] == "ring" else span[1]


def _fill_job(config: PackConfig, plans: list, spans: list, ring, reader: Optional[Reader], out: dict, row: int,
              masked: dict, heartbeat, job_index: int, crash_key: Optional[str]) -> list[tuple[int, str, str]]:
    """Fill the images of one decision and assemble it into row `row` of `out`; returns the failed slots."""
    def before(i: int, plan) -> None:
        heartbeat[1] = job_index * HB_IMAGES + i
        if crash_key is not None and plan.key == crash_key:
            os.kill(os.getpid(), signal.SIGKILL)

    payloads = [_payload(s, ring) for s in spans]
    filled = fill_all(plans, payloads, config, reader, masked, before)
    heartbeat[1] = -1
    rows = {name: arr[row, ...] for name, arr in out.items()}  # views, 0-d for num_images
    return assemble_into(rows, plans, filled, config)


def _exit_with_parent(parent: int) -> None:
    """End this process, without a traceback, once `parent` is gone (this process is re-parented)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def worker_main(fd: int, parent: Optional[int] = None) -> None:
    """A fill worker: attach to a pool, serve its tasks, detach, wait for the next; exit on None or EOF,
    or when `parent` (the pid that started it) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent or os.getppid(),), name="parent-watch", daemon=True).start()
    conn = Connection(fd)
    while True:
        try:
            init = conn.recv()
            if init is None:
                return
            config, w, rows, num_slots, ring_size, num_workers, crash_key, reader, encoder = init
            fds = [recv_handle(conn) for _ in range(4)]
        except (EOFError, OSError):
            return
        if not _serve_pool(conn, config, w, rows, num_slots, ring_size, num_workers, crash_key, reader, encoder, fds):
            return


def _serve_pool(conn: Connection, config: PackConfig, w: int, rows: int, num_slots: int, ring_size: int,
                num_workers: int, crash_key: Optional[str], reader: Optional[Reader], encoder: Optional[Encoder],
                fds: list[int]) -> bool:
    """Serve one pool's tasks; True when detached (ready for another pool), False to exit."""
    layout, slot_bytes = slot_layout(config, rows)
    enc_row = encoder.row_bytes if encoder is not None else 0
    sizes = (ring_size, slot_bytes * num_slots, 16 * num_workers, enc_row * rows * num_slots)
    maps = [mmap.mmap(fd, max(size, 1), prot=mmap.PROT_READ if i == 0 else mmap.PROT_READ | mmap.PROT_WRITE)
            for i, (fd, size) in enumerate(zip(fds, sizes))]
    for fd in fds:
        os.close(fd)
    ring, encoded = maps[0], np.frombuffer(maps[3], np.uint8)
    hb = np.ndarray((num_workers, 2), np.int64, buffer=maps[2])[w]
    slots = [slot_views(maps[1], s * slot_bytes, layout) for s in range(num_slots)]

    def encode(slot: int, row: int, plans: list, failed: list) -> int:
        """Encode the assembled row into its place in the encoded slots; its size, or -1 (too big: the
        writer encodes it)."""
        if encoder is None:
            return -1
        gone = {f[0] for f in failed}
        record = row_record([p for i, p in enumerate(plans) if i not in gone], {k: v[row] for k, v in slots[slot].items()},
                            config, encoder.meta_fields, copy=False)
        at = (slot * rows + row) * enc_row
        return encoder.into(record, encoded[at:at + enc_row])

    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return False
            if msg is None:
                return False
            if msg == "detach":
                return _reply(conn, "detached")
            if msg[0] == "call":  # a map() call: fn(reader, item)
                _, cid, fn, item = msg
                try:
                    answer = ("call", cid, fn(reader, item))
                except Exception as e:  # a bug or an unusable input the caller must hear of
                    answer = ("call-error", cid, f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}")
                if not _reply(conn, answer):
                    return False
                continue
            tid, jobs = msg
            hb[1] = -1
            hb[0] = tid
            try:
                failed, sizes = [], []
                for k, (slot, row, plans, spans, masked) in enumerate(jobs):
                    plans = [ImagePlan.of_values(values) for values in plans]  # sent as plan_values
                    failed.append(_fill_job(config, plans, spans, ring, reader, slots[slot], row, masked, hb, k, crash_key))
                    sizes.append(encode(slot, row, plans, failed[-1]))
            except Exception as e:  # a bug, not a bad image (those are ImageRejected): report it
                _reply(conn, (f"error:{tid}", f"{type(e).__name__}: {e}"))
                return False
            hb[0] = -1
            if not _reply(conn, (tid, failed, sizes)):
                return False
    finally:
        del slots, hb, encoded
        gc.collect()  # views into the maps may sit in reference cycles (e.g. a caught exception's frame)
        for m in maps:
            try:
                m.close()
            except BufferError:  # still referenced: unmapped when the last view goes
                pass


def _reply(conn: Connection, message: Any) -> bool:
    """Send `message` to the pool; False (the caller exits quietly) when the pool's process is gone."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------- idle workers of this process
_IDLE: list[tuple[int, subprocess.Popen, Connection]] = []  # (owner pid, process, socket)
_IDLE_LOCK = threading.Lock()
_MAX_IDLE = 32


# glibc: the worker's buffers of 100 kB to a few MB (encoded images, decoded and resized pixels) are
# allocated and freed once per image. By default each is served by a fresh mmap or from a heap top that is
# trimmed back after it, so every image pays page faults to touch them again: kept here instead (reading a
# file: 40 -> 28 us in a pinned loop). Other C libraries ignore these variables.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def start_worker() -> tuple[subprocess.Popen, Connection]:
    parent, child = Pipe(duplex=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from packer._worker import worker_main; worker_main({child.fileno()}, {os.getpid()})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **_MALLOC_ENV}
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
    child.close()
    return proc, parent


def take_idle() -> Optional[tuple[subprocess.Popen, Connection]]:
    with _IDLE_LOCK:
        while _IDLE:
            owner, proc, conn = _IDLE.pop()
            if owner == os.getpid() and proc.poll() is None:
                return proc, conn
    return None


def give_idle(proc: subprocess.Popen, conn: Connection) -> None:
    with _IDLE_LOCK:
        if len(_IDLE) < _MAX_IDLE:
            _IDLE.append((os.getpid(), proc, conn))
            return
    stop_worker(proc, conn)


def wait_detached(conn: Connection, timeout: float) -> bool:
    """Drain a detaching worker's last results until it confirms."""
    deadline = time.monotonic() + timeout
    try:
        while conn.poll(max(0.0, deadline - time.monotonic())):
            if conn.recv() == "detached":
                return True
    except (EOFError, OSError):
        pass
    return False


def stop_worker(proc: subprocess.Popen, conn: Connection) -> None:
    try:
        conn.send(None)
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    conn.close()


def kill_worker(proc: subprocess.Popen, conn: Connection) -> None:
    proc.kill()
    proc.wait()
    conn.close()


def stop_idle_workers() -> None:
    """End this process's idle fill workers (they end with the process anyway)."""
    with _IDLE_LOCK:
        idle = [(p, c) for owner, p, c in _IDLE if owner == os.getpid()]
        _IDLE.clear()
    for proc, conn in idle:
        stop_worker(proc, conn)


atexit.register(stop_idle_workers)
