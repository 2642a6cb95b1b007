"""Fill pools: fill and assemble packing decisions into output slots, results in decision order.

Two pools with one API (`fill_pool(config, workers)` picks): `InProcessPool` (workers=0) fills in the
calling process at submit(); `FillPool` fills in worker processes (their side: packer._worker).

FillPool: the images' encoded bytes are copied into a shared-memory input ring, or, for payloads that are
references, read by the worker itself through the pool's `reader`; up to `task_size` consecutive decisions make a
task (plans and byte offsets, a few hundred bytes a decision) that goes to the least-loaded worker over
its own socket; the worker decodes, resizes, patchifies, drops and assembles each whole sequence
straight into its row of a shared-memory output slot; with an `encoder` (the output format's, e.g.
schemas.record_encoder) it also encodes the row into its on-disk bytes, in a shared encoded slot, so that
the writer only appends them. Only (task id, failed slots, encoded sizes) comes back. This is
the PyTorch DataLoader's shape (per-worker task queues, a bounded number of tasks in flight, a reorder
buffer), with assembly in the workers as the plan/fill design anchors recommend.

- Order: results come out in submission order whatever the number of workers or their timing.
- Window: at most `num_slots * rows_per_slot` decisions are submitted and not yet released; each
  worker holds at most `prefetch` tasks of up to `task_size` decisions (an idle worker gets what
  has been submitted at once).
- Slots: `rows_per_slot` decisions share one output slot (a batch); `get()` returns a slot once all
  its rows are filled (or it was sealed short), as numpy views valid until `release()`. A caller may
  get() several slots before releasing them (oldest first): a writer process still reading a slot's
  encoded rows holds it (SharedBytes).
- Crashes: before each image a worker writes (task, image) into a shared heartbeat. When a worker
  dies (a decoder segfault, an OOM kill) it is replaced, the image it held is rejected
  `worker_crashed` (its slot becomes padding, see packer._assemble) and its tasks are re-issued:
  nothing else is lost and the output is the same as if the image had failed to decode.
- Processes: see packer._worker (started with subprocess, importing packer only; SIGINT ignored;
  single-threaded codecs; anonymous shared memory passed by descriptor, so nothing leaks in /dev/shm
  even when the parent is killed). close() detaches the workers: they wait idle for this process's next
  pool, and end with it, or with stop_idle_workers().
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import select
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ._assemble import Encoder, FillReject, Reader, assemble_into, fill_all, fill_rejects
from ._config import PackConfig
from ._core import Decision
from ._record import slot_layout, slot_views
from ._transform import plan_values
from ._worker import CRASH_KEY_ENV, HB_IMAGES, kill_worker, start_worker, take_idle, give_idle, wait_detached

_MAX_RESPAWNS_WITHOUT_PROGRESS = 3  # a worker slot whose processes die this many times in a row is retired


class WorkerError(RuntimeError):
    """The fill workers cannot go on (they keep dying without filling anything, or a task failed)."""


def resolve_workers(value: "str | int | None") -> int:
    """The one worker-count rule: 'auto' or None -> every core this process may use; an integer >= 0 as
    it is (0: fill in the calling process, N: N worker processes)."""
    if value is None or value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return os.cpu_count() or 1
    number = int(value)
    if number < 0:
        raise ValueError(f"workers must be 'auto' or an integer >= 0, got {value!r}")
    return number


@dataclasses.dataclass
class SlotResult:
    """A filled output slot: the decisions of its rows (in order), their numeric fields as views into the
    pool's memory (leading dimension: rows, only the first len(decisions) used), the failed fills."""

    slot: int
    decisions: list[Decision]
    arrays: dict[str, np.ndarray]
    rejects: list[list[FillReject]]
    encoded: Optional[list[Optional[SharedBytes]]] = None  # per row, its on-disk bytes where a worker encoded it


class SharedBytes:
    """A row's encoded record in the pool's shared memory: `view` (its bytes, valid until its slot is
    released) and where another process finds them: offset `offset` of the file `fd` (open until the pool
    closes). A consumer that hands the location to another process instead of reading the bytes sets
    `until_read`, which waits until that process has read them; the slot's holder calls `wait_read()`
    before releasing the slot."""

    __slots__ = ("view", "fd", "offset", "until_read")

    def __init__(self, view: memoryview, fd: int, offset: int):
        self.view, self.fd, self.offset = view, fd, offset
        self.until_read: Optional[Callable[[], None]] = None

    def __len__(self) -> int:
        return self.view.nbytes

    def __bytes__(self) -> bytes:
        return bytes(self.view)

    def wait_read(self) -> None:
        """Return once whoever took the location has read the bytes (at once if nobody did)."""
        if self.until_read is not None:
            self.until_read()
            self.until_read = None


@dataclasses.dataclass
class _Job:
    """One submitted decision: where its bytes are and which output row it fills."""

    decision: Decision
    spans: list  # per image: ("ring", offset, length) | ("bytes", data) | ("ref", payload)
    slot: int  # slot number (its memory: slot % num_slots)
    row: int
    ring_end: int  # ring position after this decision's bytes (freed up to here when it is done)
    masked: dict = dataclasses.field(default_factory=dict)  # image index -> (reason, detail)
    done: bool = False
    failed: list = dataclasses.field(default_factory=list)  # [(image index, reason, detail)]
    encoded: int = -1  # bytes of the row's encoded record in the encoded slot (-1: not encoded)


_END = object()


_INLINE = (bytes, bytearray, memoryview)


def _ring_need(payloads) -> tuple[int, int]:
    """The bytes a decision's inline payloads take in the ring, and the longest of them (what skipping to
    the ring's start may waste)."""
    size = longest = 0
    for p in payloads:
        if isinstance(p, _INLINE):
            n = len(p)
            size += n
            longest = max(longest, n)
    return size, longest


class _Slots:
    """What both pools share: numbered output slots of `rows` rows, filled in submission order and
    released oldest first (slot n lives at n % num_slots)."""

    def __init__(self, config: PackConfig, rows_per_slot: int, num_slots: int):
        if rows_per_slot < 1:
            raise ValueError("rows_per_slot must be >= 1")
        self.config, self.rows, self.num_slots = config, rows_per_slot, num_slots
        self._layout, self._slot_bytes = slot_layout(config, rows_per_slot)
        self._closed = False
        self._jobs: dict[int, _Job] = {}  # submitted, not yet released
        self._next_job = 0
        self._slot_head = 0  # oldest slot not yet released
        self._slot_got = 0  # the next slot get() returns (slots from _slot_head up to it are held by the caller)
        self._next_slot = 0  # the next slot to open
        self._open: Optional[int] = None  # the slot taking rows, if any
        self._slot_rows: dict[int, list[int]] = {}  # slot -> its job ids, in row order
        self._slot_waiting: dict[int, int] = {}  # slot -> its jobs not done yet
        self.crashes = 0
        self._slot_views: dict[int, dict[str, np.ndarray]] = {}

    def _out_buffer(self):
        raise NotImplementedError

    def _has_slot(self) -> bool:
        return self._open is not None or self._next_slot - self._slot_head < self.num_slots

    def _check_room(self, decision: Decision) -> None:
        if self._closed:
            raise WorkerError("the pool is closed")
        if not self.can_submit(decision):
            raise WorkerError("no room: get() and release() results first")

    def _add_job(self, decision: Decision, spans: list, ring_end: int) -> tuple[int, _Job]:
        if self._open is None:
            self._open = self._next_slot
            self._next_slot += 1
            self._slot_rows[self._open] = []
            self._slot_waiting[self._open] = 0
        rows = self._slot_rows[self._open]
        job = _Job(decision, spans, self._open, len(rows), ring_end)
        jid = self._next_job
        self._next_job += 1
        self._jobs[jid] = job
        rows.append(jid)
        self._slot_waiting[self._open] += 1
        if len(rows) == self.rows:
            self._open = None
        return jid, job

    def _job_done(self, job: _Job, failed: list, encoded: int = -1) -> None:
        job.done, job.failed, job.encoded = True, failed, encoded
        self._slot_waiting[job.slot] -= 1

    def can_submit(self, decision: Optional[Decision] = None) -> bool:
        """Whether `decision` (or any decision without inline bytes) can be submitted now without waiting."""
        return self._has_slot()

    def submit(self, decision: Decision) -> None:
        """Queue `decision` for filling (its payloads: bytes, or references for the pool's reader); see can_submit()."""
        raise NotImplementedError

    def seal(self) -> None:
        """Close the slot being filled short (end of stream): get() returns it with fewer rows."""
        self._open = None

    @property
    def pending(self) -> int:
        """Decisions submitted and not yet released."""
        return len(self._jobs)

    def poll(self) -> None:
        """Take in finished work without waiting (call it now and then while doing other work)."""

    def wait(self, timeout: float = 1.0) -> None:
        """Take in finished work, waiting up to `timeout` for some (frees slots and ring space)."""

    def ready(self) -> bool:
        """Whether get() would return without waiting."""
        self.poll()
        return self._head_complete()

    def _head_complete(self) -> bool:
        head = self._slot_got
        if head == self._next_slot or head == self._open:
            return False
        return self._slot_waiting[head] == 0

    def _await_head(self, deadline: Optional[float]) -> None:
        raise WorkerError("the slot being filled is not full: seal() it first")

    def get(self, timeout: Optional[float] = None) -> SlotResult:
        """The next slot once complete (blocking), in submission order; release() each slot got, oldest
        first, when done with its arrays."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._slot_got == self._next_slot:
            raise WorkerError("nothing submitted to get")
        while not self._head_complete():
            if self._slot_got == self._open:
                raise WorkerError("the slot being filled is not full: seal() it first")
            self._await_head(deadline)
        head = self._slot_got
        self._slot_got += 1
        jobs = [self._jobs[j] for j in self._slot_rows[head]]
        return SlotResult(head % self.num_slots, [job.decision for job in jobs], dict(self._views(head % self.num_slots)),
                          [fill_rejects(job.decision, job.failed) for job in jobs], self._encoded_views(head, jobs))

    def _views(self, slot: int) -> dict[str, np.ndarray]:
        """Slot `slot`'s arrays, made once (building them costs more than the rest of a get())."""
        views = self._slot_views.get(slot)
        if views is None:
            views = self._slot_views[slot] = slot_views(self._out_buffer(), slot * self._slot_bytes, self._layout)
        return views

    def _encoded_views(self, head: int, jobs: list) -> Optional[list[Optional[SharedBytes]]]:
        return None

    def release(self) -> None:
        """Free the oldest slot got and not yet released; its arrays must not be used afterwards."""
        head = self._slot_head
        if head == self._slot_got:
            raise WorkerError("release() without a slot got")
        del self._slot_waiting[head]
        for j in self._slot_rows.pop(head):
            self._jobs.pop(j)
        self._slot_head += 1

    def map(self, fn, items) -> Iterator[Any]:
        """fn(reader, item) for each item, results in order (the pool's reader is fn's context). In worker
        processes for FillPool: fn must be a module-level function, items and results small picklable
        values (e.g. a unit to list, its headers). Not while decisions are pending."""
        for item in items:
            yield fn(self.reader, item)

    def close(self) -> None:
        self._closed = True

    @property
    def worker_pids(self) -> list[int]:
        return []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessPool(_Slots):
    """The pool API, filled in the calling process at submit() (workers=0)."""

    def __init__(self, config: PackConfig, *, rows_per_slot: int = 1, num_slots: Optional[int] = None,
                 reader: Optional[Reader] = None):
        super().__init__(config, rows_per_slot, num_slots or max(2, -(-20 // rows_per_slot) + 1))
        self.num_workers = 0
        self.reader = reader
        self._out = bytearray(self._slot_bytes * self.num_slots)

    def _out_buffer(self):
        return self._out

    def submit(self, decision: Decision) -> None:
        self._check_room(decision)
        _, job = self._add_job(decision, [], 0)
        row = {name: arr[job.row, ...] for name, arr in self._views(job.slot % self.num_slots).items()}  # views, 0-d for num_images
        filled = fill_all(decision.plans, decision.payloads, self.config, self.reader)
        self._job_done(job, assemble_into(row, decision.plans, filled, self.config))


@dataclasses.dataclass
class _Call:
    """One map() call in flight: fn(reader, item) on a worker; `tries` counts the workers it killed."""

    fn: Any
    item: Any
    worker: int = -1
    tries: int = 0


@dataclasses.dataclass
class _Task:
    """What one message to a worker carries: a few consecutive jobs (fewer messages per image)."""

    tid: int
    jobs: list  # job ids
    worker: int = -1
    done: bool = False


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


class FillPool(_Slots):
    """Worker processes that fill and assemble decisions into shared memory (see the module doc)."""

    def __init__(self, config: PackConfig, num_workers: int, *, rows_per_slot: int = 1, num_slots: Optional[int] = None,
                 prefetch: int = 2, task_size: int = 16, ring_bytes: int = 64 << 20, reader: Optional[Reader] = None,
                 encoder: Optional[Encoder] = None):
        if num_workers < 1 or prefetch < 1 or task_size < 1:
            raise ValueError("num_workers, prefetch and task_size must be >= 1 (0 workers: InProcessPool)")
        # Room for every worker's prefetch of full tasks and the task being built, so that the workers stay
        # busy while the caller reads and plans a burst of images. Tasks are large because each one costs
        # the caller a send, a receive and a wake-up (at 4 decisions a task, about a third of its CPU).
        in_flight = (prefetch * num_workers + 1) * task_size
        super().__init__(config, rows_per_slot, num_slots or max(2, -(-in_flight // rows_per_slot) + 1))
        self.num_workers, self.prefetch, self.task_size, self.reader = num_workers, prefetch, task_size, reader
        self.encoder = encoder
        self._enc_row = encoder.row_bytes if encoder is not None else 0
        self._building: list[int] = []  # jobs not yet in a task
        self._tasks: dict[int, _Task] = {}  # sent or waiting to be sent, not yet done
        self._next_tid = 0
        self._ring_size = ring_bytes
        sizes = {"input": ring_bytes, "output": self._slot_bytes * self.num_slots, "heartbeat": 16 * num_workers,
                 "encoded": self._enc_row * self.rows * self.num_slots}
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
        (self._ring_fd, self._ring), (self._out_fd, self._out), (self._hb_fd, self._hb_map), (self._enc_fd, self._enc) = maps
        self._ring_head = 0  # next write position (monotonic; modulo ring size)
        self._ring_tail = 0  # oldest position still in use
        self._ring_jobs: collections.deque[int] = collections.deque()  # jobs holding ring bytes, in ring order
        self._hb = np.ndarray((num_workers, 2), np.int64, buffer=self._hb_map)
        self._hb[:] = -1
        self._procs: list = [None] * num_workers
        self._conns: list[Optional[Connection]] = [None] * num_workers
        self._assigned: list[list[int]] = [[] for _ in range(num_workers)]
        self._waiting: collections.deque[int] = collections.deque()
        self._calls: dict[int, _Call] = {}  # map() calls sent or waiting, not yet answered
        self._call_waiting: collections.deque[int] = collections.deque()
        self._call_results: dict[int, Any] = {}
        self._poller = select.poll()
        self._fd_worker: dict[int, int] = {}
        self._deaths_in_a_row = [0] * num_workers  # per slot: deaths since its last finished task or blamed image
        self.retired: list[str] = []  # slots given up on, each with why ("fill worker 1 (pids 11, 12, ...): ...")
        self._pids_seen: list[list[int]] = [[] for _ in range(num_workers)]
        try:
            for w in range(num_workers):
                self._spawn(w)
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise WorkerError(f"cannot start {num_workers} fill worker processes: {e}") from e
            raise

    def _out_buffer(self):
        return self._out

    def _encoded_views(self, head: int, jobs: list) -> Optional[list[Optional[SharedBytes]]]:
        if self.encoder is None:
            return None
        view, base = memoryview(self._enc), (head % self.num_slots) * self.rows * self._enc_row
        out = []
        for job in jobs:
            at = base + job.row * self._enc_row
            out.append(SharedBytes(view[at:at + job.encoded], self._enc_fd, at) if job.encoded >= 0 else None)
        return out

    # ---------------------------------------------------------------- workers
    def _attach(self, w: int, proc, conn: Connection) -> None:
        crash_key = os.environ.get(CRASH_KEY_ENV) or None
        conn.send((self.config, w, self.rows, self.num_slots, self._ring_size, self.num_workers, crash_key,
                   self.reader, self.encoder))
        for fd in (self._ring_fd, self._out_fd, self._hb_fd, self._enc_fd):
            send_handle(conn, fd, proc.pid)

    def _spawn(self, w: int) -> None:
        """Give slot w a worker: an idle one of this process if any, else a new process; attach it."""
        proc, conn = take_idle() or start_worker()
        try:
            self._attach(w, proc, conn)
        except OSError:  # an idle worker that died meanwhile: start a fresh one
            kill_worker(proc, conn)
            proc, conn = start_worker()
            self._attach(w, proc, conn)
        self._hb[w] = -1
        self._pids_seen[w].append(proc.pid)
        self._procs[w], self._conns[w] = proc, conn
        self._poller.register(conn.fileno(), select.POLLIN)
        self._fd_worker[conn.fileno()] = w

    def _load(self, w: int) -> int:
        return len(self._assigned[w]) + sum(1 for c in self._calls.values() if c.worker == w)

    def _dispatch(self) -> None:
        live = self._live()
        while self._call_waiting:
            w = min(live, key=lambda i: (self._load(i), i))
            if self._load(w) >= self.prefetch:
                break
            cid = self._call_waiting.popleft()
            call = self._calls[cid]
            call.worker = w
            try:
                self._conns[w].send(("call", cid, call.fn, call.item))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # the worker died; _pump notices and re-issues its calls
        if self._building and any(not self._assigned[i] for i in live):  # an idle worker takes what there is
            self._make_task()
        while self._waiting:
            w = min(live, key=lambda i: (len(self._assigned[i]), i))
            if len(self._assigned[w]) >= self.prefetch:
                return
            task = self._tasks[self._waiting.popleft()]
            task.worker = w
            self._assigned[w].append(task.tid)
            jobs = [self._jobs[j] for j in task.jobs]
            message = (task.tid, [(job.slot % self.num_slots, job.row, [plan_values(p) for p in job.decision.plans],
                                   job.spans, job.masked)
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

    def _live(self) -> list[int]:
        return [w for w, proc in enumerate(self._procs) if proc is not None]

    def _worker_died(self, w: int) -> None:
        """Worker slot w's process ended: blame the image it held (if any), re-issue its work to the live
        slots, and start a new process in the slot, unless its processes keep dying without filling
        anything: then the slot is retired and the others go on (WorkerError once none is left)."""
        proc = self._procs[w]
        code = proc.wait() if proc is not None else None
        tid, where = (int(x) for x in self._hb[w])
        blamed = False
        if tid in self._tasks and where >= 0 and not self._tasks[tid].done:
            job_index, image = divmod(where, HB_IMAGES)
            job = self._jobs[self._tasks[tid].jobs[job_index]]
            job.masked[image] = ("worker_crashed", f"the worker process filling it died (exit code {code})")
            blamed = True
        self.crashes += 1
        self._deaths_in_a_row[w] = 0 if blamed else self._deaths_in_a_row[w] + 1
        self._poller.unregister(self._conns[w].fileno())
        del self._fd_worker[self._conns[w].fileno()]
        self._conns[w].close()
        self._procs[w] = None
        requeue = [t for t in self._assigned[w] if not self._tasks[t].done]
        self._assigned[w] = []
        self._waiting.extendleft(reversed(requeue))
        for cid in sorted((c for c, call in self._calls.items() if call.worker == w), reverse=True):
            call = self._calls[cid]
            call.worker, call.tries = -1, call.tries + 1
            if call.tries > _MAX_RESPAWNS_WITHOUT_PROGRESS:
                raise WorkerError(f"fill worker processes died {call.tries} times running {getattr(call.fn, '__name__', call.fn)}"
                                  f"({call.item!r:.200}) (exit code {code})")
            self._call_waiting.appendleft(cid)
        if self._deaths_in_a_row[w] <= _MAX_RESPAWNS_WITHOUT_PROGRESS:
            self._spawn(w)
            return
        pids = ", ".join(map(str, self._pids_seen[w]))
        self.retired.append(f"fill worker {w} (pids {pids}) died {self._deaths_in_a_row[w]} times in a row "
                            f"without filling an image (last exit code {code})")
        if not self._live():
            raise WorkerError("every fill worker keeps dying: " + "; ".join(self.retired))
        logging.getLogger("navit_pack").warning("navit-pack: %s; going on with %d", self.retired[-1], len(self._live()))

    def _free_ring(self) -> None:
        """Free the input bytes of the oldest jobs that are done (a worker has copied them out): a
        batch slot then never waits for ring space held by its own finished rows."""
        while self._ring_jobs and self._jobs[self._ring_jobs[0]].done:
            self._ring_tail = max(self._ring_tail, self._jobs[self._ring_jobs.popleft()].ring_end)

    def wait(self, timeout: float = 1.0) -> None:
        if not self._closed:
            self._make_task()
            self._pump(timeout)

    def poll(self) -> None:
        if not self._closed:
            self._pump(0)

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
                message = conn.recv()
            except (EOFError, OSError):
                self._worker_died(w)
                continue
            if message[0] in ("call", "call-error"):  # a map() call answered: (kind, cid, result or text)
                kind, cid, result = message
                self._calls.pop(cid)
                if kind != "call":
                    raise WorkerError(f"fill worker {w} failed: {result}")
                self._call_results[cid] = result
                self._deaths_in_a_row[w] = 0
                continue
            if isinstance(message[0], str):  # the worker raised: a bug, not a bad image
                raise WorkerError(f"fill worker {w} failed: {message[1]}")
            tid, failed, encoded = message
            task = self._tasks.pop(tid)
            task.done = True
            for j, job_failed, size in zip(task.jobs, failed, encoded):
                self._job_done(self._jobs[j], job_failed, size)
            self._assigned[w].remove(tid)
            self._deaths_in_a_row[w] = 0
            self._free_ring()
        if not ready and timeout != 0:  # a wait that timed out: a worker gone with its socket open elsewhere?
            for w, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None:
                    self._worker_died(w)
        self._dispatch()

    def _await_head(self, deadline: Optional[float]) -> None:
        self._make_task()  # about to wait: send what is not sent yet
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("no result within the timeout")
        self._pump(1.0 if left is None else min(1.0, left))

    def map(self, fn, items) -> Iterator[Any]:
        if self._jobs:
            raise WorkerError("map() while decisions are pending")
        items = iter(items)
        window = 2 * self.prefetch * self.num_workers
        first = self._next_call = getattr(self, "_next_call", 0)
        end = None  # number of the first call not made (items exhausted)
        head = first
        while end is None or head < end:
            while end is None and len(self._calls) < window:
                item = next(items, _END)
                if item is _END:
                    end = self._next_call
                    break
                self._calls[self._next_call] = _Call(fn, item)
                self._call_waiting.append(self._next_call)
                self._next_call += 1
            if head in self._call_results:
                yield self._call_results.pop(head)
                head += 1
                continue
            if end is not None and head >= end:
                break
            self._pump(1.0)

    # ---------------------------------------------------------------- submit
    def can_submit(self, decision: Optional[Decision] = None) -> bool:
        if not self._has_slot():
            return False
        size, waste = _ring_need(decision.payloads) if decision is not None else (0, 0)  # waste: skipped at the ring's end
        return size > self._ring_size // 2 or self._ring_head + size + waste - self._ring_tail <= self._ring_size

    def submit(self, decision: Decision) -> None:
        if len(decision.payloads) != len(decision.items):
            raise ValueError(f"decision {decision.seq} has {len(decision.items)} images, got "
                             f"{len(decision.payloads)} payloads")
        self._check_room(decision)
        spans = self._store(decision.payloads)
        jid, _ = self._add_job(decision, spans, self._ring_head)
        self._ring_jobs.append(jid)
        self._building.append(jid)
        if len(self._building) >= self.task_size:
            self._make_task()
        self._dispatch()

    def _store(self, payloads) -> list:
        """Where each image's bytes are: copied into the ring (when the decision's bytes fit in half of it),
        else sent with the task; references go as they are, for the worker's reader."""
        in_ring = _ring_need(payloads)[0] <= self._ring_size // 2
        spans = []
        for p in payloads:
            if not isinstance(p, _INLINE):
                spans.append(("ref", p))
            elif not in_ring:
                spans.append(("bytes", bytes(p)))
            else:
                n = len(p)
                pos = self._ring_head % self._ring_size
                if pos + n > self._ring_size:  # does not fit before the end: skip to the start
                    self._ring_head += self._ring_size - pos
                    pos = 0
                self._ring[pos:pos + n] = p
                spans.append(("ring", pos, n))
                self._ring_head += n
        return spans

    def seal(self) -> None:
        self._open = None
        self._make_task()

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Detach the workers (they wait, idle, for the next pool of this process: starting a process
        costs a few hundred ms) and free the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc, conn in zip(self._procs, self._conns):
            if proc is None:
                continue
            try:
                conn.send("detach")
            except OSError:
                kill_worker(proc, conn)
                continue
            if not wait_detached(conn, timeout=5.0):
                kill_worker(proc, conn)
            else:
                give_idle(proc, conn)
        self._procs = [None] * self.num_workers
        self._conns = [None] * self.num_workers
        self._hb = None
        self._slot_views.clear()
        for m, fd in ((self._ring, self._ring_fd), (self._out, self._out_fd), (self._hb_map, self._hb_fd),
                      (self._enc, self._enc_fd)):
            try:
                m.close()
            except BufferError:  # a caller still holds a view: the map goes when it does
                pass
            os.close(fd)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def __del__(self) -> None:
        # Not close(): when the pool is collected as part of a reference cycle, its sockets may already
        # be finalized (closed behind their Connection objects), so they must not be used or handed to
        # another pool. Free the shared memory; the workers exit when their sockets close.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for name in ("_ring_fd", "_out_fd", "_hb_fd", "_enc_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def fill_pool(config: PackConfig, workers: int, **kwargs) -> "InProcessPool | FillPool":
    """The pool for `workers` (resolve_workers' rule): 0 fills in this process, N >= 1 in N processes."""
    if workers == 0:
        kwargs = {k: v for k, v in kwargs.items() if k in ("rows_per_slot", "num_slots", "reader")}  # the caller encodes
        return InProcessPool(config, **kwargs)
    return FillPool(config, workers, **kwargs)
