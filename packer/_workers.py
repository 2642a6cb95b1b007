"""FillPool: fill and assemble packing decisions in worker processes, results in decision order.

The main process plans and decides (packer._engine.PackingCore); the pool does the rest. The images'
encoded bytes are copied into a shared-memory input ring; a few consecutive decisions make a task
(plans and byte offsets, a few hundred bytes a decision) that goes to the least-loaded worker over
its own socket; the worker decodes, resizes, patchifies, drops and assembles each whole sequence
straight into its row of a shared-memory output slot. Only (task id, failed slots) comes back. This
is the PyTorch DataLoader's shape (per-worker task queues, a bounded number of tasks in flight, a
reorder buffer), with assembly in the workers as the plan/fill design anchors recommend.

- Order: results come out in submission order whatever the number of workers or their timing.
- Window: at most `num_slots * rows_per_slot` decisions are submitted and not yet released; each
  worker holds at most `prefetch` tasks of up to `task_size` decisions (an idle worker gets what
  has been submitted at once).
- Slots: `rows_per_slot` decisions share one output slot (a batch); `get()` returns a slot once all
  its rows are filled (or it was sealed short), as numpy views valid until `release()`.
- Crashes: before each image a worker writes (task, image) into a shared heartbeat. When a worker
  dies (a decoder segfault, an OOM kill) it is replaced, the image it held is rejected
  `worker_crashed` (its slot becomes padding, see packer._engine) and its tasks are re-issued:
  nothing else is lost and the output is the same as if the image had failed to decode.
  Test hook: a worker SIGKILLs itself before filling the key named by the environment variable
  NAVIT_PACK_TEST_CRASH_KEY (read by the pool when it attaches its workers).
- Processes: started with subprocess (`python -c`, importing packer only: no TensorFlow, no
  re-import of the caller's __main__), SIGINT ignored (the parent decides), single-threaded codecs.
  Shared memory is anonymous (memfd) and passed by descriptor, so nothing can leak in /dev/shm even
  when the parent is killed; workers exit when their socket closes. close() (or the context manager)
  detaches the workers: they wait idle for this process's next pool (a new process costs a few
  hundred ms), and end with it, or with stop_idle_workers().
- num_workers=0: the same API, filled in the calling process at submit().
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import gc
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Pipe
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Optional, Sequence

import numpy as np

from ._config import PackConfig
from ._engine import Decision, FillReject, ImagePlan, assemble_into, fill_image
from ._image import ImageRejected
from ._packer import PER_IMAGE_FIELDS

CRASH_KEY_ENV = "NAVIT_PACK_TEST_CRASH_KEY"
_ALIGN = 64
_MAX_RESPAWNS_WITHOUT_PROGRESS = 3
_HB_IMAGES = 1 << 16  # heartbeat: job index in the task * _HB_IMAGES + image index


class WorkerError(RuntimeError):
    """The fill workers cannot go on (they keep dying without filling anything, or a task failed)."""


def slot_layout(config: PackConfig, rows: int) -> tuple[dict[str, tuple[int, tuple[int, ...], np.dtype]], int]:
    """{field: (byte offset, shape, dtype)} of one output slot of `rows` records, and its size in bytes."""
    L, E = config.seq_len, config.max_images_per_seq
    fields: list[tuple[str, tuple[int, ...], Any]] = [
        ("patches", (rows, L, config.token_dim), np.uint8), ("segment_ids", (rows, L), np.int32),
        ("pos_y", (rows, L), np.int32), ("pos_x", (rows, L), np.int32), ("num_images", (rows,), np.int32)]
    fields += [(name, (rows, E), dtype) for name, (dtype, _) in PER_IMAGE_FIELDS.items()]
    layout, offset = {}, 0
    for name, shape, dtype in fields:
        dtype = np.dtype(dtype)
        layout[name] = (offset, shape, dtype)
        offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
    return layout, offset


def _views(buffer, base: int, layout) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, dtype, buffer=buffer, offset=base + off) for name, (off, shape, dtype) in layout.items()}


def _shared(size: int, name: str) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of `size` bytes (fd, writable map)."""
    fd = os.memfd_create(name) if hasattr(os, "memfd_create") else _unlinked_tempfile()
    try:
        os.ftruncate(fd, max(size, 1))
        return fd, mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        raise


def _unlinked_tempfile() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="navit-pack-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.unlink(path)
    return fd


@dataclasses.dataclass
class _Job:
    """One submitted decision: where its bytes are and which output row it fills."""

    decision: Decision
    refs: list  # per image: (offset, length) in the input ring, or the bytes themselves
    slot: int  # slot number (its memory: slot % num_slots)
    row: int
    ring_end: int  # ring position after this decision's bytes (freed up to here when released)
    masked: dict = dataclasses.field(default_factory=dict)  # image index -> (reason, detail)
    done: bool = False
    failed: list = dataclasses.field(default_factory=list)  # [(image index, reason, detail)]


@dataclasses.dataclass
class _Task:
    """What one message to a worker carries: a few consecutive jobs (fewer messages per image)."""

    tid: int
    jobs: list  # job ids
    worker: int = -1
    done: bool = False


@dataclasses.dataclass
class SlotResult:
    """A filled output slot: the decisions of its rows (in order), their numeric fields as views into
    shared memory (leading dimension: rows, only the first len(decisions) used), the failed fills."""

    slot: int
    decisions: list[Decision]
    arrays: dict[str, np.ndarray]
    rejects: list[list[FillReject]]


class FillPool:
    """Worker processes that fill and assemble decisions into shared memory (see the module doc)."""

    def __init__(self, config: PackConfig, num_workers: int, *, rows_per_slot: int = 1, num_slots: Optional[int] = None,
                 prefetch: int = 2, task_size: int = 4, ring_bytes: int = 64 << 20):
        if num_workers < 0 or rows_per_slot < 1 or prefetch < 1 or task_size < 1:
            raise ValueError("num_workers must be >= 0; rows_per_slot, prefetch and task_size >= 1")
        self.config, self.num_workers, self.rows, self.prefetch = config, num_workers, rows_per_slot, prefetch
        self.task_size = task_size
        # Room for every worker's prefetch twice over, so that the workers stay busy while the caller
        # reads and plans a burst of images (a window-bfd round decides many sequences at once).
        in_flight = (2 * prefetch * max(1, num_workers) + 1) * task_size
        self.num_slots = num_slots or max(2, -(-in_flight // rows_per_slot) + 1)
        self._layout, self._slot_bytes = slot_layout(config, rows_per_slot)
        self._closed = False
        self._jobs: dict[int, _Job] = {}  # submitted, not yet released
        self._next_job = 0
        self._building: list[int] = []  # jobs not yet in a task
        self._tasks: dict[int, _Task] = {}  # sent or waiting to be sent, not yet done
        self._next_tid = 0
        # Slots are numbered 0, 1, ... (slot n lives at n % num_slots) and released in that order.
        self._slot_head = 0  # oldest slot not yet released
        self._next_slot = 0  # the next slot to open
        self._open: Optional[int] = None  # the slot taking rows, if any
        self._slot_rows: dict[int, list[int]] = {}  # slot -> its job ids, in row order
        self._slot_waiting: dict[int, int] = {}  # slot -> its jobs not done yet
        self.crashes = 0
        if num_workers == 0:
            self._out_buf = bytearray(self._slot_bytes * self.num_slots)
            self._ring_size = self._ring_head = 0
            return
        self._ring_size = ring_bytes
        sizes = {"input": ring_bytes, "output": self._slot_bytes * self.num_slots, "heartbeat": 16 * num_workers}
        maps = []
        try:
            for name, size in sizes.items():
                maps.append(_shared(size, f"navit-pack-{name}"))
        except OSError as e:
            for fd, m in maps:
                m.close()
                os.close(fd)
            raise WorkerError(f"cannot set up the fill workers' shared memory ({sum(sizes.values()) / 2**20:.0f} MiB; "
                              f"a file size or memory limit?): {e}") from e
        (self._ring_fd, self._ring), (self._out_fd, self._out), (self._hb_fd, self._hb_map) = maps
        self._ring_head = 0  # next write position (monotonic; modulo ring size)
        self._ring_tail = 0  # oldest position still in use
        self._ring_jobs: collections.deque[int] = collections.deque()  # jobs holding ring bytes, in ring order
        self._out_buf = self._out
        self._hb = np.ndarray((num_workers, 2), np.int64, buffer=self._hb_map)
        self._hb[:] = -1
        self._procs: list[Optional[subprocess.Popen]] = [None] * num_workers
        self._conns: list[Optional[Connection]] = [None] * num_workers
        self._assigned: list[list[int]] = [[] for _ in range(num_workers)]
        self._waiting: collections.deque[int] = collections.deque()
        self._poller = select.poll()
        self._fd_worker: dict[int, int] = {}
        self._respawns_without_progress = 0
        try:
            for w in range(num_workers):
                self._spawn(w)
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise WorkerError(f"cannot start {num_workers} fill worker processes: {e}") from e
            raise

    # ---------------------------------------------------------------- workers
    def _spawn(self, w: int) -> None:
        """Give slot w a worker: an idle one of this process if any, else a new process; attach it."""
        proc, conn = _take_idle() or _start_worker()
        crash_key = os.environ.get(CRASH_KEY_ENV) or None
        try:
            conn.send((self.config, w, self.rows, self.num_slots, self._ring_size, self.num_workers, crash_key))
            for fd in (self._ring_fd, self._out_fd, self._hb_fd):
                send_handle(conn, fd, proc.pid)
        except OSError:  # an idle worker that died meanwhile: start a fresh one
            _kill(proc, conn)
            proc, conn = _start_worker()
            conn.send((self.config, w, self.rows, self.num_slots, self._ring_size, self.num_workers, crash_key))
            for fd in (self._ring_fd, self._out_fd, self._hb_fd):
                send_handle(conn, fd, proc.pid)
        self._hb[w] = -1
        self._procs[w], self._conns[w] = proc, conn
        self._poller.register(conn.fileno(), select.POLLIN)
        self._fd_worker[conn.fileno()] = w

    def _dispatch(self) -> None:
        if self._building and any(not a for a in self._assigned):  # an idle worker takes what there is
            self._make_task()
        while self._waiting:
            w = min(range(self.num_workers), key=lambda i: (len(self._assigned[i]), i))
            if len(self._assigned[w]) >= self.prefetch:
                return
            task = self._tasks[self._waiting.popleft()]
            task.worker = w
            self._assigned[w].append(task.tid)
            jobs = [self._jobs[j] for j in task.jobs]
            message = (task.tid, [(job.slot % self.num_slots, job.row, job.decision.plans, job.refs, job.masked)
                                  for job in jobs])
            try:
                self._conns[w].send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # the worker died; _pump notices and re-issues its tasks

    def _make_task(self) -> None:
        """The jobs submitted since the last task become one task, queued for the next free worker."""
        if self._building:
            task = _Task(self._next_tid, self._building)
            self._next_tid += 1
            self._building = []
            self._tasks[task.tid] = task
            self._waiting.append(task.tid)

    def _worker_died(self, w: int) -> None:
        proc = self._procs[w]
        code = proc.wait() if proc is not None else None
        tid, where = (int(x) for x in self._hb[w])
        blamed = False
        if tid in self._tasks and where >= 0 and not self._tasks[tid].done:
            job_index, image = divmod(where, _HB_IMAGES)
            job = self._jobs[self._tasks[tid].jobs[job_index]]
            job.masked[image] = ("worker_crashed", f"the worker process filling it died (exit code {code})")
            blamed = True
        self.crashes += 1
        self._respawns_without_progress = 0 if blamed else self._respawns_without_progress + 1
        if self._respawns_without_progress > _MAX_RESPAWNS_WITHOUT_PROGRESS:
            raise WorkerError(f"fill worker {w} died {self._respawns_without_progress} times without filling (exit code {code})")
        self._poller.unregister(self._conns[w].fileno())
        del self._fd_worker[self._conns[w].fileno()]
        self._conns[w].close()
        self._procs[w] = None
        requeue = [t for t in self._assigned[w] if not self._tasks[t].done]
        self._assigned[w] = []
        self._waiting.extendleft(reversed(requeue))
        self._spawn(w)

    def _free_ring(self) -> None:
        """Free the input bytes of the oldest jobs that are done (a worker has copied them out): a
        batch slot then never waits for ring space held by its own finished rows."""
        while self._ring_jobs and self._jobs[self._ring_jobs[0]].done:
            self._ring_tail = max(self._ring_tail, self._jobs[self._ring_jobs.popleft()].ring_end)

    def wait(self, timeout: float = 1.0) -> None:
        """Take in finished work, waiting up to `timeout` for some (frees slots and ring space)."""
        if self.num_workers and not self._closed:
            if self._building:
                self._make_task()
            self._pump(timeout)

    def _pump(self, timeout: Optional[float]) -> None:
        """Receive what the workers finished (waiting up to `timeout`), replace dead ones, dispatch."""
        self._dispatch()
        # One message per ready socket per round: poll() is one system call, cheaper than draining
        # each socket with Connection.poll (a selector built per call).
        ready = self._poller.poll(None if timeout is None else int(timeout * 1000))
        for fd, _ in ready:
            w = self._fd_worker.get(fd)
            if w is None:
                continue
            conn = self._conns[w]
            try:
                tid, failed = conn.recv()
            except (EOFError, OSError):
                self._worker_died(w)
                continue
            if isinstance(tid, str):  # the worker raised: a bug, not a bad image
                raise WorkerError(f"fill worker {w} failed: {failed}")
            task = self._tasks.pop(tid)
            task.done = True
            for j, job_failed in zip(task.jobs, failed):
                job = self._jobs[j]
                job.done, job.failed = True, job_failed
                self._slot_waiting[job.slot] -= 1
            self._assigned[w].remove(tid)
            self._free_ring()
        if not ready:
            for w, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None:
                    self._worker_died(w)
        self._dispatch()

    # ---------------------------------------------------------------- submit / get
    def can_submit(self, datas: Sequence[bytes] = ()) -> bool:
        """Whether a decision with these bytes can be submitted now without waiting for a release."""
        if self._open is None and self._next_slot - self._slot_head >= self.num_slots:
            return False
        if self.num_workers == 0:
            return True
        size = sum(len(d) for d in datas)
        waste = max((len(d) for d in datas), default=0)  # skipped at the ring's end, at most one image's length
        return size > self._ring_size // 2 or self._ring_head + size + waste - self._ring_tail <= self._ring_size

    def submit(self, decision: Decision, datas: Sequence[bytes]) -> None:
        """Queue `decision` (its images' encoded bytes in slot order) for filling; see can_submit()."""
        if self._closed:
            raise WorkerError("the pool is closed")
        if len(datas) != len(decision.items):
            raise ValueError(f"decision {decision.seq} has {len(decision.items)} images, got {len(datas)} byte strings")
        if not self.can_submit(datas):
            raise WorkerError("no room: get() and release() results first")
        if self._open is None:
            self._open = self._next_slot
            self._next_slot += 1
            self._slot_rows[self._open] = []
            self._slot_waiting[self._open] = 0
        rows = self._slot_rows[self._open]
        slot, row = self._open % self.num_slots, len(rows)
        refs = self._store(datas)
        job = _Job(decision, refs, self._open, row, self._ring_head)
        jid = self._next_job
        self._next_job += 1
        self._jobs[jid] = job
        if self._ring_size:
            self._ring_jobs.append(jid)
        rows.append(jid)
        if self.num_workers:
            self._slot_waiting[self._open] += 1
        if len(rows) == self.rows:
            self._open = None
        if self.num_workers == 0:
            out = _views(self._out_buf, slot * self._slot_bytes, self._layout)
            job.failed = _fill_job(self.config, decision.plans, refs, None, out, row, {}, None, 0, None)
            job.done = True
            return
        self._building.append(jid)
        if len(self._building) >= self.task_size:
            self._make_task()
        self._dispatch()

    def _store(self, datas: Sequence[bytes]) -> list:
        if self.num_workers == 0 or sum(len(d) for d in datas) > self._ring_size // 2:
            return [bytes(d) for d in datas] if self.num_workers else list(datas)
        refs = []
        for d in datas:
            n = len(d)
            pos = self._ring_head % self._ring_size
            if pos + n > self._ring_size:  # does not fit before the end: skip to the start
                self._ring_head += self._ring_size - pos
                pos = 0
            self._ring[pos:pos + n] = d
            refs.append((pos, n))
            self._ring_head += n
        return refs

    def seal(self) -> None:
        """Close the slot being filled short (end of stream): get() returns it with fewer rows."""
        self._open = None
        if self.num_workers:
            self._make_task()

    @property
    def pending(self) -> int:
        """Decisions submitted and not yet released."""
        return len(self._jobs)

    def poll(self) -> None:
        """Take in finished work and hand queued tasks to idle workers without waiting (call it now and
        then while doing other work, e.g. reading and planning)."""
        if self.num_workers and not self._closed:
            self._pump(0)

    def ready(self) -> bool:
        """Whether get() would return without waiting."""
        if self.num_workers:
            self._pump(0)
        return self._head_complete()

    def _head_complete(self) -> bool:
        head = self._slot_head
        if head == self._next_slot or head == self._open:
            return False
        return self._slot_waiting[head] == 0

    def get(self, timeout: Optional[float] = None) -> SlotResult:
        """The oldest slot once complete (blocking); call release() when done with its arrays."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._slot_head == self._next_slot:
            raise WorkerError("nothing submitted to get")
        while not self._head_complete():
            if self.num_workers == 0 or self._slot_head == self._open:
                raise WorkerError("the slot being filled is not full: seal() it first")
            if self._building:
                self._make_task()  # about to wait: send what is not sent yet
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("no result within the timeout")
            self._pump(1.0 if left is None else min(1.0, left))
        head = self._slot_head
        jobs = [self._jobs[j] for j in self._slot_rows[head]]
        slot = head % self.num_slots
        arrays = _views(self._out_buf, slot * self._slot_bytes, self._layout)
        rejects = []
        for job in jobs:
            items = job.decision.items
            rejects.append([FillReject(i, items[i][0].key, reason, detail, items[i][1], items[i][0].final_tokens)
                            for i, reason, detail in job.failed])
        return SlotResult(slot, [job.decision for job in jobs], arrays, rejects)

    def release(self) -> None:
        """Free the oldest slot (after get()); its arrays must not be used afterwards."""
        head = self._slot_head
        del self._slot_waiting[head]
        for j in self._slot_rows.pop(head):
            self._jobs.pop(j)  # its ring bytes were freed when it was done (_free_ring)
        self._slot_head += 1

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Detach the workers (they wait, idle, for the next pool of this process: starting a process
        costs a few hundred ms) and free the shared memory. Idempotent. stop_idle_workers() ends idle
        workers; they also end with this process."""
        if self._closed:
            return
        self._closed = True
        if self.num_workers == 0:
            return
        for w, (proc, conn) in enumerate(zip(self._procs, self._conns)):
            if proc is None:
                continue
            try:
                conn.send("detach")
            except OSError:
                _kill(proc, conn)
                continue
            if not _wait_detached(conn, timeout=5.0):
                _kill(proc, conn)
            else:
                _give_idle(proc, conn)
        self._procs = [None] * self.num_workers
        self._conns = [None] * self.num_workers
        self._hb = None
        for m, fd in ((self._ring, self._ring_fd), (self._out, self._out_fd), (self._hb_map, self._hb_fd)):
            try:
                m.close()
            except BufferError:  # a caller still holds a view: the map goes when it does
                pass
            os.close(fd)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None] if self.num_workers else []

    def __enter__(self) -> "FillPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Not close(): when the pool is collected as part of a reference cycle, its sockets may already
        # be finalized (closed behind their Connection objects), so they must not be used or handed to
        # another pool. Free the shared memory; the workers exit when their sockets close.
        if getattr(self, "_closed", True) or not self.num_workers:
            return
        self._closed = True
        for name in ("_ring_fd", "_out_fd", "_hb_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _fill_job(config: PackConfig, plans: list[ImagePlan], refs: list, ring, out: dict, row: int, masked: dict,
              heartbeat, job_index: int, crash_key: Optional[str]) -> list[tuple[int, str, str]]:
    """Fill the images of one decision and assemble it into row `row` of `out`; returns the failed slots."""
    filled = []
    for i, (plan, ref) in enumerate(zip(plans, refs)):
        if i in masked:
            filled.append(ImageRejected(*masked[i]))
            continue
        if heartbeat is not None:
            heartbeat[1] = job_index * _HB_IMAGES + i
        if crash_key is not None and plan.key == crash_key:
            os.kill(os.getpid(), signal.SIGKILL)
        data = ref if isinstance(ref, (bytes, bytearray, memoryview)) else ring[ref[0]:ref[0] + ref[1]]
        try:
            filled.append(fill_image(data, plan, config))
        except ImageRejected as e:
            filled.append(e)
    if heartbeat is not None:
        heartbeat[1] = -1
    rows = {name: arr[row, ...] for name, arr in out.items()}  # views, 0-d for num_images
    rejects = assemble_into(rows, Decision(-1, tuple((p, None) for p in plans)), filled, config)
    return [(r.slot, r.reason, r.detail) for r in rejects]


def _worker_main(fd: int) -> None:
    """A fill worker: attach to a pool (config and shared memory), fill its tasks into the shared
    output replying (task id, failed slots), detach, wait for the next pool; exit on None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    while True:
        try:
            init = conn.recv()
            if init is None:
                return
            config, w, rows, num_slots, ring_size, num_workers, crash_key = init
            ring_fd, out_fd, hb_fd = (recv_handle(conn) for _ in range(3))
        except (EOFError, OSError):
            return
        if not _serve_pool(conn, config, w, rows, num_slots, ring_size, num_workers, crash_key, ring_fd, out_fd, hb_fd):
            return


def _serve_pool(conn: Connection, config: PackConfig, w: int, rows: int, num_slots: int, ring_size: int,
                num_workers: int, crash_key: Optional[str], ring_fd: int, out_fd: int, hb_fd: int) -> bool:
    """Serve one pool's tasks; True when detached (ready for another pool), False to exit."""
    layout, slot_bytes = slot_layout(config, rows)
    maps = [mmap.mmap(ring_fd, max(ring_size, 1), prot=mmap.PROT_READ), mmap.mmap(out_fd, slot_bytes * num_slots),
            mmap.mmap(hb_fd, 16 * num_workers)]
    for fd in (ring_fd, out_fd, hb_fd):
        os.close(fd)
    ring = maps[0]
    hb = np.ndarray((num_workers, 2), np.int64, buffer=maps[2])[w]
    slots = [_views(maps[1], s * slot_bytes, layout) for s in range(num_slots)]
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return False
            if msg is None:
                return False
            if msg == "detach":
                conn.send("detached")
                return True
            tid, jobs = msg
            hb[1] = -1
            hb[0] = tid
            try:
                failed = [_fill_job(config, plans, refs, ring, slots[slot], row, masked, hb, k, crash_key)
                          for k, (slot, row, plans, refs, masked) in enumerate(jobs)]
            except Exception as e:  # a bug, not a bad image (those are ImageRejected): report it
                conn.send((f"error:{tid}", f"{type(e).__name__}: {e}"))
                return False
            hb[0] = -1
            conn.send((tid, failed))
    finally:
        del slots, hb
        gc.collect()  # views into the maps may sit in reference cycles (e.g. a caught exception's frame)
        for m in maps:
            try:
                m.close()
            except BufferError:  # still referenced: unmapped when the last view goes
                pass


# ---------------------------------------------------------------------------- idle workers of this process
_IDLE: list[tuple[int, subprocess.Popen, Connection]] = []  # (owner pid, process, socket)
_IDLE_LOCK = threading.Lock()
_MAX_IDLE = 32


def _start_worker() -> tuple[subprocess.Popen, Connection]:
    parent, child = Pipe(duplex=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from packer._workers import _worker_main; _worker_main({child.fileno()})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
    child.close()
    return proc, parent


def _take_idle() -> Optional[tuple[subprocess.Popen, Connection]]:
    with _IDLE_LOCK:
        while _IDLE:
            owner, proc, conn = _IDLE.pop()
            if owner == os.getpid() and proc.poll() is None:
                return proc, conn
    return None


def _give_idle(proc: subprocess.Popen, conn: Connection) -> None:
    with _IDLE_LOCK:
        if len(_IDLE) < _MAX_IDLE:
            _IDLE.append((os.getpid(), proc, conn))
            return
    _stop(proc, conn)


def _wait_detached(conn: Connection, timeout: float) -> bool:
    """Drain a detaching worker's last results until it confirms."""
    deadline = time.monotonic() + timeout
    try:
        while conn.poll(max(0.0, deadline - time.monotonic())):
            if conn.recv() == "detached":
                return True
    except (EOFError, OSError):
        pass
    return False


def _stop(proc: subprocess.Popen, conn: Connection) -> None:
    try:
        conn.send(None)
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    conn.close()


def _kill(proc: subprocess.Popen, conn: Connection) -> None:
    proc.kill()
    proc.wait()
    conn.close()


def stop_idle_workers() -> None:
    """End this process's idle fill workers (they end with the process anyway)."""
    with _IDLE_LOCK:
        idle = [(p, c) for owner, p, c in _IDLE if owner == os.getpid()]
        _IDLE.clear()
    for proc, conn in idle:
        _stop(proc, conn)


atexit.register(stop_idle_workers)
