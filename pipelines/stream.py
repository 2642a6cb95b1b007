"""Online packing inside a training job: a resumable iterator of packed records, and its tf.data view.

    stream = PackedStream("photos/", PackConfig(resolution="uniform:64:256"), epochs=None)
    for record in stream: ...              # dicts of numpy arrays, the packer's record fields
    for batch in stream.batches(64): ...   # or ready batches: the same records stacked, leading dim 64
    saved = stream.state()                 # small JSON; PackedStream(..., state=saved) resumes exactly

    # data-parallel: rank i of N packs its own share of one global plan
    stream = PackedStream("photos/", config, shard_index=i, shard_count=N)   # or shard="auto" (RANK, WORLD_SIZE)

What runs where. Each record's header is read (Source.headers: a plain JPEG's few kB, through a reference
where the source has them, else the record's bytes) and the image planned from it: for one rank reading a
folder of files and filling in worker processes, in a child process a chunk ahead (_Planner), else in the
calling process. The calling process decides the sequences on token counts (packer.PackingCore). Filling
(decode, resize, patchify, drop) and assembling whole sequences run in `num_parallel` worker processes
(packer.fill_pool, driven by packer.Driver), which read referenced images themselves and write straight
into shared memory; the calling process only copies finished records (or batches) out. num_parallel 0 fills in the calling
process. The output is the same for every num_parallel.

Order. Epoch e reads the source's units ordered by stable_hash(unit, f"{seed}/{e}/unit") and shuffles the
records inside consecutive blocks of `shuffle_block` records by stable_hash(key, f"{seed}/{e}"): a pure
function of (seed, epoch), in memory bounded by the block. Resolution and token drop are drawn per
(seed, key, epoch); the drop schedule's images_seen is the number of source records the stream has
read before the image (rejected ones included), counted across epochs.

Ranks. The decisions form one global plan, numbered 0, 1, ..., the same on every rank (every rank reads
and plans every header; it fills only its own sequences). Step s takes the next shard_count x B of them
(B: the batch size; 1 when iterating records) and deals them: by default balanced, the costliest first
(sum over its images of tokens squared: segment-aware attention) to the least-loaded rank that holds
fewer than B (ties by rank, then global number); with balance=False round robin. Each rank yields its
share of a step in global order, so every rank yields the same number of sequences; the last, short step
of a finite stream gives every rank ceil(n / shard_count), the gap filled with all-padding sequences
(num_images 0, counted in stats as sequences_padding). shard_count=1 yields exactly the global plan.

Rejects. Every record is packed or rejected with a reason: at read time (the source's own reject,
or a header that does not plan; every rank sees these, and each is a share of one rank's stats:
images_seen mod shard_count) or at fill time (pixels that fail to decode, `worker_crashed` when the
worker process filling it died; the filling rank's). A failed fill leaves its slot as padding: the record
holds the other images (see packer._assemble). `max_rejects` is checked on the read-time rejects (the
same on every rank) and, apart, on each rank's fill failures against the images it filled.

Resume. The state is a position in the global plan (the number of its sequences dealt and taken) with
what rebuilds the plan from there: the read position and the core's state right after the decisions
that hold that position were made, and those decisions from it on (named by the provenance of their
images [unit index, offset, epoch, images_seen] and any exact-fill re-plan). It depends on nothing
local (not the read-ahead, nor the rank), so after the same number of batches it is the same JSON on
every rank, and `PackedStream(..., shard_index=i, shard_count=M, state=s)` continues the plan for any
M: over the old ranks' batches and the new ranks', every image appears exactly once. Restoring re-reads
a window's worth of headers. It never holds image content or unit names: tens of kB at window 1024.
With shard_count=1 it also carries the counters of what was returned.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import json
import logging
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

import packer
from packer import Decision, Driver, ImagePlan, ImageRejected, PackConfig, PackingCore, RejectBudget, RejectBudgetExceeded

STATE_VERSION = 3
PLAN_KIND = "navit-pack plan"
PLAN_VERSION = 1
__all__ = ["PackedStream", "StreamError", "RejectBudgetExceeded", "as_tf_dataset", "element_spec", "resolve_source",
           "deal", "attention_cost", "shard_from_environment"]


class StreamError(RuntimeError):
    """The stream cannot go on (empty source, a state that does not match, ...)."""


def resolve_source(source: Any, meta_fields: Sequence[str] = ()):
    """A Source object from a spec string (pipelines.sources.open_source) or a Source as it is."""
    if isinstance(source, (str, os.PathLike)):
        from pipelines.sources import open_source
        return open_source(str(source), meta_fields=tuple(meta_fields))
    if not (hasattr(source, "units") and hasattr(source, "read")):
        raise TypeError(f"expected a source spec string or an object with units() and read(unit), got {type(source).__name__}")
    return source


def _epoch_order(num_units: int, units: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Unit indices in epoch order."""
    if not shuffle:
        return list(range(num_units))
    return sorted(range(num_units), key=lambda i: (packer.stable_hash(units[i], f"{seed}/{epoch}/unit"), units[i]))


def _epoch_units(units: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """Units in epoch order (the service reads them so too)."""
    return [units[i] for i in _epoch_order(len(units), units, seed, epoch, shuffle)]


def _units_fingerprint(units: Sequence[str]) -> list[int]:
    h = 0
    for u in units:
        h = packer.stable_hash(u, str(h))
    return [len(units), h]


def _config_diff(theirs: dict, mine: dict) -> str:
    names = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    return ", ".join(f"{k}={theirs.get(k)!r} (this stream: {mine.get(k)!r})" for k in names)


def shard_from_environment() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK / WORLD_SIZE, else JAX's process index and
    count when jax is imported and initialized, else (0, 1)."""
    import sys

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    jax = sys.modules.get("jax")
    if jax is not None:
        return int(jax.process_index()), int(jax.process_count())
    return 0, 1


def attention_cost(decision: Decision) -> int:
    """A sequence's attention cost under a segment-aware kernel: the sum of its images' tokens squared."""
    return sum(p.final_tokens ** 2 for p in decision.plans)


def deal(costs: Sequence[int], ranks: int, balance: bool = True) -> list[list[int]]:
    """The sequences of one step (their costs, in global order) dealt to `ranks` ranks, ceil(n / ranks)
    each at most: per rank, its sequences' positions in global order. balance: costliest first to the
    least-loaded rank with room (ties by rank, then position); else round robin."""
    n = len(costs)
    room = -(-n // ranks)
    if not balance:
        return [list(range(r, n, ranks)) for r in range(ranks)]
    owned: list[list[int]] = [[] for _ in range(ranks)]
    open_ranks = [(0, r) for r in range(ranks)]  # (load, rank) of the ranks with room: a heap
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(open_ranks)
        owned[r].append(i)
        if len(owned[r]) < room:
            heapq.heappush(open_ranks, (load + costs[i], r))
    return [sorted(o) for o in owned]


def unit_headers(source, unit: str, max_pixels: int):
    """Source.headers of a unit; a source object with only units() and read() gives its records whole."""
    from pipelines.sources import Listed

    if hasattr(source, "headers"):
        return source.headers(unit, max_pixels)
    return (Listed(r.key, r.label, r.meta, getattr(r, "reject", None), getattr(r, "detail", ""), data=r.data)
            for r in source.read(unit))


def _stream_records(source, units: list, config: PackConfig, epochs: Optional[int], shuffle: bool, shuffle_block: int,
                    headers: Optional[dict], pos: tuple, seen: int, by_ref: bool) -> Iterator[Optional[tuple]]:
    """The stream's records from read position `pos` (epoch, block start unit index and offset, records
    taken from the block), the first of them the stream's `seen`-th, in stream order, each read and
    planned: (epoch, unit index, offset, key, position after it, (reason, detail) of a read-time reject or
    None, its ImagePlan, what fills it); None after each epoch. A block's plans are made together
    (PlanBlock.plans). `headers`: {unit: its Source.headers list} read elsewhere. by_ref: the payload is
    the record's reference even where the listing read its bytes (a plan file names images by reference)."""
    epoch, unit_index, offset, skip = pos
    while epochs is None or epoch < epochs:
        order = _epoch_order(len(units), units, config.seed, epoch, shuffle)
        reader = _read_from(source, units, config, headers, order, unit_index, offset)
        block_start = (unit_index, offset)
        any_read = unit_index > 0 or offset > 0 or skip > 0
        while True:
            block = list(itertools.islice(reader, shuffle_block))
            if not block:
                break
            any_read = True
            if shuffle:
                salt = f"{config.seed}/{epoch}"
                block.sort(key=lambda t: (packer.stable_hash(t[2].key, salt), t[0], t[1]))
            rest = block[skip:]
            planner = packer.PlanBlock(config, [rec.key for _, _, rec in rest], epoch, [rec.size for _, _, rec in rest])
            plans = planner.plans(range(seen, seen + len(rest)), [rec.label for _, _, rec in rest],
                                  [rec.meta for _, _, rec in rest])
            for i, (u, off, rec) in enumerate(rest):
                plan, reject = plans[i], (rec.reject, rec.detail) if rec.reject else None
                if plan is None and reject is None:  # not planned with its block (see PlanBlock.plans)
                    try:
                        plan = rec.plan(config, epoch=epoch, images_seen=seen + i, block=(planner, i))
                    except ImageRejected as e:
                        reject = (e.reason, e.detail)
                payload = rec.ref if by_ref and rec.ref is not None else rec.payload
                yield (epoch, order[u], off, rec.key, (epoch, block_start[0], block_start[1], skip + i + 1), reject,
                       plan if reject is None else None, payload)
            seen += len(rest)
            skip = 0
            last_u, last_off, _ = max(block, key=lambda t: (t[0], t[1]))
            block_start = (last_u, last_off + 1)
        if not any_read:
            raise StreamError("the source has no records")
        yield None
        epoch, unit_index, offset, skip = epoch + 1, 0, 0, 0


def _read_from(source, units: list, config: PackConfig, headers: Optional[dict], order: list[int], position: int,
               offset: int) -> Iterator[tuple[int, int, Any]]:
    """(position in the epoch's unit order, offset in unit, Listed record) from a position on."""
    for p in range(position, len(order)):
        start = offset if p == position else 0
        unit = units[order[p]]
        records = headers[unit] if headers is not None else unit_headers(source, unit, config.max_pixels)
        for off, rec in enumerate(itertools.islice(records, start, None), start):
            yield p, off, rec


class _PlannerLost(Exception):
    """The planning child process ended without its records (killed, out of memory)."""


_PLANNER_CHUNK = 512  # records a message: the child reads and plans the next chunk while this one is decided


class _Planner:
    """_stream_records run in a child process, a chunk ahead: reading every header and planning take most
    of a stream's main-process CPU (a large input's headers are all read once), so they overlap with
    deciding and handing out work here. Records arrive in order, the same as made here; the child's
    errors are raised here at the record where they happened; _PlannerLost if the child dies."""

    def __init__(self, args: tuple):
        import subprocess
        import sys
        from multiprocessing import Pipe

        self._conn, child = Pipe(duplex=True)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from pipelines.stream import _planner_main; _planner_main({child.fileno()})")
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        self._items: collections.deque = collections.deque()
        self._ended = False
        self.cpu: Optional[float] = None  # the child's CPU seconds reading and planning (its start-up left out), at the end
        try:
            self._conn.send(args)
        except OSError:  # died at once: the first read says so
            pass

    def __iter__(self) -> "_Planner":
        return self

    def __next__(self) -> Optional[tuple]:
        while not self._items:
            if self._ended:
                raise StopIteration
            try:
                kind, body = self._conn.recv()
                if kind == "items":
                    self._conn.send("more")
            except (EOFError, OSError):
                self.close()
                raise _PlannerLost(f"the planning process ended (exit code {self._proc.returncode})") from None
            if kind == "error":
                self.close()
                raise body
            if kind == "end":
                self._ended, self.cpu = True, body
                continue
            self._items.extend(body)
        return self._items.popleft()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._conn.close()


def _planner_main(fd: int) -> None:
    """The planning child: _stream_records of the arguments it is sent, a chunk a message, each after the
    parent asks for more; ("error", exception) or ("end", its CPU seconds) last."""
    import pickle
    import signal
    import time
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; its exit ends this
    conn = Connection(fd)
    try:
        records = _stream_records(*conn.recv())
        started = time.process_time()
        while True:
            try:
                chunk = list(itertools.islice(records, _PLANNER_CHUNK))
            except Exception as e:
                try:
                    conn.send(("error", pickle.loads(pickle.dumps(e))))
                except Exception:  # an exception that does not pickle: its text
                    conn.send(("error", StreamError(f"{type(e).__name__}: {e}")))
                return
            if not chunk:
                conn.send(("end", time.process_time() - started))
                return
            conn.send(("items", chunk))
            if conn.recv() != "more":
                return
    except (EOFError, OSError):  # the parent has gone
        return


class _Fetch:
    """The fill pool's reader: a source's references read by the worker processes themselves."""

    def __init__(self, source):
        self.source = source

    def __call__(self, ref) -> bytes:
        return self.source.fetch(ref)


class _Burst:
    """Decisions made by one read (numbered from `first`), and the plan's snapshot right after them."""

    __slots__ = ("first", "decisions", "snapshot")

    def __init__(self, first: int, decisions: list, snapshot: dict):
        self.first, self.decisions, self.snapshot = first, decisions, snapshot

    @property
    def end(self) -> int:
        return self.first + len(self.decisions)


class _PlanWriter:
    """Stands in for the driver while write_plan runs: the dealt decisions go to the plan file, a line each."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def put(self, decisions) -> None:
        for d in decisions:
            if any(p is None or isinstance(p, (bytes, bytearray, memoryview)) for p in d.payloads):
                raise StreamError("a plan file names each image by a reference its source reads alone (folders, "
                                  "synthetic); this source gives the images' bytes: plan on the fly instead")
            line = [[ref, list(prov), p.key, p.label, dict(p.meta), p.orig_h, p.orig_w, p.grid_h, p.grid_w,
                     p.num_tokens, p.drop_rate, list(dataclasses.astuple(p.refit)) if p.refit else None]
                    for (p, prov), ref in zip(d.items, d.payloads)]
            self.f.write(json.dumps(line) + "\n")
            self.count += 1


class PackedStream:
    """An endless (or `epochs`-long) iterator of packed records, resumable from `state()`.

    Args:
      source: a source spec string (see pipelines.sources.open_source) or a Source object.
      config: the PackConfig (the same one the CLI builds from its options).
      epochs: None for forever, else the number of passes; the packer is flushed once, at the end.
      shuffle: reshuffle units and records every epoch (pure function of seed and epoch).
      meta_fields: source metadata fields carried into `meta_<name>` record fields.
      max_rejects: None (no limit), an int (most rejected images allowed) or a float in [0, 1) (most
        rejected fraction of the images seen, checked from the 100th image and at each epoch end).
      num_parallel: worker processes that fill and assemble (0: in the calling process; default "auto":
        every core this process may use; packer.resolve_workers).
      shuffle_block: records shuffled together (memory is bounded by one block of encoded images).
      shard_index, shard_count: this rank and the number of ranks (data-parallel; see the module doc);
        shard="auto" takes them from the launcher (shard_from_environment) unless given.
      balance: deal each step's sequences by attention cost (True) or round robin.
      plan: a plan file (write_plan, `navit-pack plan`) to read the global plan from instead of reading
        and planning every header (its options must be this stream's).
      state: a `state()` to resume from (of a run with any shard_count).
    """

    def __init__(self, source: Any, config: PackConfig, *, epochs: Optional[int] = None, shuffle: bool = True,
                 meta_fields: Sequence[str] = (), max_rejects: Union[None, int, float] = None,
                 num_parallel: "int | str | None" = None, shuffle_block: int = 1024,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None, shard: Optional[str] = None,
                 balance: bool = True, plan: Optional[str] = None, state: Optional[dict] = None):
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or an integer >= 1, got {epochs!r}")
        RejectBudget(max_rejects)  # checks the spec
        if not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ValueError(f"shuffle_block must be an integer >= 1, got {shuffle_block!r}")
        if shard not in (None, "auto"):
            raise ValueError(f"shard must be None or 'auto', got {shard!r}")
        rank, world = shard_from_environment() if shard == "auto" else (0, 1)
        self.shard_index = rank if shard_index is None else shard_index
        self.shard_count = world if shard_count is None else shard_count
        if not (isinstance(self.shard_count, int) and self.shard_count >= 1 and isinstance(self.shard_index, int)
                and 0 <= self.shard_index < self.shard_count):
            raise ValueError(f"shard_index must be in [0, shard_count), shard_count >= 1; got "
                             f"{self.shard_index!r} of {self.shard_count!r}")
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self.source = resolve_source(source, self.meta_fields)
        self.epochs, self.shuffle, self.max_rejects, self.shuffle_block = epochs, shuffle, max_rejects, shuffle_block
        self.balance = balance
        self.num_parallel = packer.resolve_workers(num_parallel)
        self._units = list(self.source.units())
        self.plan = plan
        if plan is not None:
            self._check_plan(plan)
        self._driver: Optional[Driver] = None
        self._headers: Optional[dict] = None  # write_plan's headers listed elsewhere (the Beam plan job)
        self._closed = False
        self._reader: Optional[Iterator] = None  # the records from the read position on (_open_reader)
        self._reset()
        if state is not None:
            self.restore(state)

    # ------------------------------------------------------------------ public
    @property
    def rejects(self) -> dict[str, int]:
        """This rank's rejected images so far, by reason (its share of the read-time rejects, and its fill
        failures)."""
        planned = self._core.reject_counts if self.shard_count == 1 else self._my_rejects
        return dict(planned + self._fill_budget.counts)

    @property
    def reject_examples(self) -> list[dict]:
        """The most recent rejects: {key, reason, detail, provenance: [unit index, offset, epoch, images_seen]}
        (read-time ones of every rank, then this rank's fill failures)."""
        return list(self._core.budget.examples) + list(self._fill_budget.examples)

    @property
    def stats(self) -> dict:
        """Counters of this rank. Returned: sequences (and the images and tokens in them) the stream has
        yielded, sequences_padding of them all-padding (the last step's gap). Pending: read ahead and
        decided (sequences_pending) or still in the packer's window, not yet returned. images_seen counts
        every record read (rejects included) by the global plan."""
        inflight = self._inflight()
        returned = self._returned()
        return {"epoch": self._pos[0], "images_seen": self._core.images_seen, "images_packed": returned["images"],
                "images_rejected": sum(self.rejects.values()), "rejects": self.rejects,
                "sequences": returned["sequences"], "sequences_padding": returned["padding"],
                "sequences_pending": len(inflight), "images_pending": self._core.num_pending + sum(
                    len(d.items) for d in inflight), "tokens_real": returned["tokens_real"],
                "tokens_padding": returned["tokens_padding"]}

    def state(self) -> dict:
        """JSON-serializable position in the global plan: rebuild with PackedStream(..., state=s) (any
        shard_count) or .restore(s). The same on every rank after the same number of batches."""
        burst = next((b for b in self._bursts if b.first <= self._consumed < b.end), None)
        if burst is None:
            burst = self._bursts[-1] if self._bursts else None
        snapshot = burst.snapshot if burst is not None else self._initial
        queued = [] if burst is None else burst.decisions[max(0, self._consumed - burst.first):]
        out = {"version": STATE_VERSION, "config": self.config.to_json(), "meta_fields": list(self.meta_fields),
               "epochs": self.epochs, "shuffle": self.shuffle, "shuffle_block": self.shuffle_block,
               "units": _units_fingerprint(self._units), "next_sequence": self._consumed}
        if self.plan is None:  # a plan file is resumed by its line number alone
            out.update(snapshot, queued=[[self._queued_image(p, prov) for p, prov in d.items] for d in queued])
        if self.shard_count == 1:
            out["returned"] = self._returned()
            out["fill_budget"] = self._fill_budget.state()
        return out

    def restore(self, state: dict) -> None:
        """Continue from `state` as if the stream that saved it had never stopped (with this stream's ranks)."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        for name, mine in (("config", self.config.to_json()), ("meta_fields", list(self.meta_fields)),
                           ("epochs", self.epochs), ("shuffle", self.shuffle), ("shuffle_block", self.shuffle_block),
                           ("units", _units_fingerprint(self._units))):
            theirs = state[name]
            if name == "config":
                theirs = PackConfig(**theirs).to_json()
                if theirs != mine:
                    raise StreamError(f"state was saved with another config: {_config_diff(theirs, mine)}")
            if theirs != mine:
                raise StreamError(f"state was saved with {name}={theirs!r}, this stream has {mine!r}")
        rows = self._driver.pool.rows if self._driver is not None else None
        self._close_driver()
        self._reset()
        if self.plan is not None:
            self._consumed = self._dealt = self._plan_line = int(state["next_sequence"])
            if rows is not None:
                self._start(rows)
            return
        self._pos = tuple(state["position"])
        self._reader_done = bool(state["finished"])
        self._accepted_in_epoch = int(state["accepted_in_epoch"])
        pending = PackingCore.pending_provenance(state["core"])
        queued = state["queued"]
        wanted = [list(p) for p in pending] + [entry[:4] for group in queued for entry in group]
        plans, payloads = self._replan(wanted)
        self._core.restore(state["core"], plans[:len(pending)], payloads[:len(pending)])
        rest = list(zip(plans[len(pending):], payloads[len(pending):]))
        decisions = []
        first = self._core.next_seq - len(queued)
        for n, group in enumerate(queued):
            items = []
            for entry in group:
                plan, payload = rest.pop(0)
                if len(entry) > 4:
                    gh, gw, tokens, rerender = entry[4]
                    plan = plan.with_refit(packer.Refit(gh, gw, tokens, 1.0 - tokens / (gh * gw), bool(rerender)))
                items.append((plan, entry[:4], payload))
            decisions.append(Decision(first + n, tuple((p, prov) for p, prov, _ in items),
                                      tuple(payload for _, _, payload in items)))
        self._consumed = self._dealt = int(state["next_sequence"])
        self._initial = self._snapshot()
        self._bursts.append(_Burst(self._consumed, decisions, {k: state[k] for k in self._initial}))
        self._plan.extend(decisions)
        if "returned" in state and self.shard_count == 1:
            self._returned_before = dict(state["returned"])
            self._fill_budget.restore(state["fill_budget"])
        if rows is not None:
            self._start(rows)

    def batches(self, batch_size: int, *, drop_remainder: bool = False, copy: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Ready batches: every record field stacked with a leading dimension of `batch_size` (the last
        batch of a finite stream may be shorter unless drop_remainder). Worker processes assemble each
        batch in one shared-memory slot, so the calling process does no per-record work beyond its own
        reading and planning. copy=False yields views into shared memory that stay valid until the next
        batch is requested (saves one copy per batch). state() between batches resumes after the last
        batch yielded. Cannot be mixed with iterating records on the same stream."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self._start(batch_size)
        while True:
            slot = self._next_slot()
            if slot is None:
                return
            if len(slot) < batch_size and drop_remainder:
                slot.release()
                return
            batch = slot.batch(copy)
            if copy:
                slot.release()
            yield batch
            slot.release()

    def close(self) -> None:
        """Stop the worker processes (the stream cannot be iterated afterwards)."""
        self._closed = True
        self._close_driver()
        self._close_reader()

    def __enter__(self) -> "PackedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._start(1)
        slot = self._next_slot()
        if slot is None:
            raise StopIteration
        with slot:
            return slot.records()[0]

    # ------------------------------------------------------------------ internals
    def _close_reader(self) -> None:
        if isinstance(self._reader, _Planner):
            self._reader.close()
        self._reader = None

    def _reset(self) -> None:
        self._close_reader()
        self._core = PackingCore(self.config, max_rejects=self.max_rejects, on_reject=self._planning_reject)
        self._fill_budget = RejectBudget(self.max_rejects)
        self._my_rejects: collections.Counter = collections.Counter()
        self._pos = (0, 0, 0, 0)  # (epoch, block start unit index, block start offset in unit, consumed in block)
        self._reads = 0
        self._reader_done = False
        self._accepted_in_epoch = 0
        self._initial = self._snapshot()  # the plan's state before any decision (state() before the first)
        self._bursts: collections.deque[_Burst] = collections.deque()  # those holding decisions not yet taken
        self._plan: collections.deque[Decision] = collections.deque()  # global decisions not yet dealt
        self._dealt = 0  # global decisions dealt to the ranks
        self._consumed = 0  # global decisions whose step this rank has taken in full (the state's position)
        self._steps: collections.deque[tuple[int, int]] = collections.deque()  # (end of step, own sequences left)
        self._returned_before = {"sequences": 0, "images": 0, "tokens_real": 0, "tokens_padding": 0, "padding": 0}
        self._padding = 0
        self._plan_line = 0  # plan file: the next decision's line

    def _snapshot(self) -> dict:
        return {"position": list(self._pos), "core": self._core.state(), "finished": self._reader_done,
                "accepted_in_epoch": self._accepted_in_epoch}

    def _planning_reject(self, key: str, reason: str, detail: str, provenance) -> None:
        """A read-time reject of the global plan: this rank's share when images_seen mod shard_count is its index."""
        if provenance is not None and int(provenance[3]) % self.shard_count == self.shard_index:
            self._my_rejects[reason] += 1

    def _fill_failed(self, rejects) -> None:
        for r in rejects:
            self._fill_budget.reject(r.key, r.reason, r.detail, r.provenance)

    def _start(self, rows: int) -> None:
        if self._closed:
            raise StreamError("the stream is closed")
        if self._driver is None:
            reader = _Fetch(self.source.reader()) if hasattr(self.source, "reader") else None
            pool = packer.fill_pool(self.config, self.num_parallel, rows_per_slot=rows, reader=reader)
            self._driver = Driver(pool, self.meta_fields, on_failed=self._fill_failed)
            self._rows = rows
            self._deal(final=self._reader_done)
        elif self._driver.pool.rows != rows:
            raise StreamError(f"this stream yields {'batches' if self._driver.pool.rows > 1 else 'records'}; "
                              "records and batches cannot be mixed")

    def _close_driver(self) -> None:
        """Stop filling; what was dealt and not taken goes back to be dealt again."""
        if self._driver is not None:
            self._returned_before = self._returned()
            self._driver.close()
            self._driver = None
            self._plan.extendleft(reversed([d for d in self._global_inflight()]))
            self._dealt = self._consumed
            self._steps.clear()
            self._padding = 0

    def _global_inflight(self) -> list[Decision]:
        """The global decisions dealt but whose step is not taken yet, in global order."""
        out = []
        for b in self._bursts:
            for i, d in enumerate(b.decisions):
                if self._consumed <= b.first + i < self._dealt:
                    out.append(d)
        return out

    def _inflight(self) -> list[Decision]:
        return (self._driver.inflight if self._driver is not None else []) + list(self._plan)

    def _returned(self) -> dict:
        done = dict(self._driver.returned) if self._driver is not None else {}
        done["padding"] = self._padding
        return {k: v + done.get(k, 0) for k, v in self._returned_before.items()}

    def _queued_image(self, plan: ImagePlan, prov: list) -> list:
        r = plan.refit
        return list(prov) if r is None else list(prov) + [[r.grid_h, r.grid_w, r.tokens, int(r.rerender)]]

    def _decided(self, decisions: list[Decision]) -> None:
        """A read's decisions join the global plan, with the snapshot that resumes after them."""
        if decisions:
            first = self._bursts[-1].end if self._bursts else self._consumed
            self._bursts.append(_Burst(first, decisions, self._snapshot()))
            self._plan.extend(decisions)
        self._deal(final=False)

    def _deal(self, final: bool) -> None:
        """Deal every complete step of the plan (and, when final, the last short one) to the ranks; this
        rank's sequences go to the driver."""
        step = self.shard_count * self._rows
        while len(self._plan) >= step or (final and self._plan):
            take = [self._plan.popleft() for _ in range(min(step, len(self._plan)))]
            if self.shard_count == 1:
                own = take
            else:
                mine = deal([attention_cost(d) for d in take], self.shard_count, self.balance)[self.shard_index]
                own = [take[i] for i in mine]
                room = -(-len(take) // self.shard_count)
                own += [Decision(-1, ()) for _ in range(room - len(own))]  # the last step's gap: all padding
            self._dealt += len(take)
            self._steps.append((self._dealt, len(own)))
            self._driver.put(own)

    def _took(self, slot) -> None:
        """Account for a slot handed out: padding sequences, and the steps now taken in full."""
        n = len(slot)
        self._padding += sum(1 for d in slot.decisions if not d.items)
        while n:
            end, left = self._steps[0]
            used = min(n, left)
            n -= used
            if used == left:
                self._steps.popleft()
                self._consumed = end
            else:
                self._steps[0] = (end, left - used)
        while self._bursts and self._bursts[0].end <= self._consumed and len(self._bursts) > 1:
            self._bursts.popleft()

    def _next_slot(self):
        """The next filled slot of this rank in order (a packer Slot), or None at the end of the stream.
        Reads ahead until the pool is full (a deterministic amount), then waits for the oldest slot."""
        driver = self._driver
        while True:
            while not self._reader_done and driver.wants_input:
                self._read_one()
                self._reads += 1
                if self._reads % 8 == 0:  # keep the workers fed while reading a burst
                    driver.pool.poll()
            slot = driver.take(final=self._reader_done)
            if slot is not None:
                self._took(slot)
                return slot
            if self._reader_done:
                return None

    def _read_one(self) -> None:
        """Read one record (or the epoch end, or the end of the stream) and decide on it; from a plan file,
        read its next decision."""
        if self.plan is not None:
            return self._read_plan_line()
        if self._reader is None:
            self._reader = self._open_reader()
        try:
            item = next(self._reader)
        except StopIteration:
            self._reader_done = True
            self._decided(self._core.flush())
            self._deal(final=True)
            return
        except _PlannerLost as e:  # read and plan here from the same position: the same items
            logging.getLogger("navit_pack").warning("navit-pack: %s; planning in this process from here", e)
            self._reader = self._records(False)
            return self._read_one()
        if item is None:  # the epoch's end
            if self._accepted_in_epoch == 0:
                raise StreamError(f"every image of epoch {self._pos[0]} was rejected: {dict(self._core.reject_counts)}")
            self._core.check_budget(final=True)
            self._pos = (self._pos[0] + 1, 0, 0, 0)
            self._accepted_in_epoch = 0
            return
        epoch, u, off, key, position, reject, plan, payload = item
        self._pos = position
        prov = [u, off, epoch, self._core.images_seen]
        if reject is not None:
            self._core.reject(key, *reject, prov)
            return
        self._accepted_in_epoch += 1
        self._decided(self._core.add(plan, prov, payload))

    def _open_reader(self) -> Iterator:
        """The stream's records from the read position on: read and planned in a child process a chunk ahead
        (_Planner) where one rank fills in worker processes from a folder of files, else here. Across ranks
        every rank plans every record, N times its own share: there the host's CPU is the tighter budget,
        and the child's hand-over (about a third more CPU a record) would outweigh what it frees here."""
        from pipelines.sources import FileSource

        if self.num_parallel > 0 and self.shard_count == 1 and self._headers is None \
                and isinstance(self.source, FileSource) and not isinstance(self._driver, _PlanWriter):
            try:
                return _Planner(self._record_args(False))
            except OSError as e:  # no process to be had (a process or memory limit): plan here
                logging.getLogger("navit_pack").warning("navit-pack: cannot start the planning process (%s); "
                                                        "planning in this process", e)
        return self._records(isinstance(self._driver, _PlanWriter))

    def _record_args(self, by_ref: bool) -> tuple:
        return (self.source, self._units, self.config, self.epochs, self.shuffle, self.shuffle_block, self._headers,
                self._pos, self._core.images_seen, by_ref)

    def _records(self, by_ref: bool) -> Iterator:
        return _stream_records(*self._record_args(by_ref))

    # ------------------------------------------------------------------ plan files
    def _plan_header(self) -> dict:
        return {"kind": PLAN_KIND, "version": PLAN_VERSION, "config": self.config.to_json(),
                "meta_fields": list(self.meta_fields), "epochs": self.epochs, "shuffle": self.shuffle,
                "shuffle_block": self.shuffle_block, "units": _units_fingerprint(self._units)}

    def _check_plan(self, path: str) -> None:
        if self.epochs is None:
            raise ValueError("a plan file holds a finite number of epochs: give epochs")
        with open(path, encoding="utf-8") as f:
            try:
                theirs = json.loads(f.readline())
            except ValueError:
                theirs = {}
        mine = self._plan_header()
        if theirs.get("kind") != PLAN_KIND:
            raise StreamError(f"{path} is not a navit-pack plan file")
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise StreamError(f"{path} was planned with other options: " + ", ".join(
                f"{k}={theirs.get(k)!r} (this stream: {mine[k]!r})" for k in diff))

    def _read_plan_line(self) -> None:
        if self._reader is None:
            f = open(self.plan, encoding="utf-8")
            self._reader = itertools.islice(f, 1 + self._plan_line, None)
        line = next(self._reader, None)
        if line is None:
            self._reader_done = True
            self._deal(final=True)
            return
        items, payloads = [], []
        for ref, prov, key, label, meta, oh, ow, gh, gw, n, rate, refit in json.loads(line):
            plan = ImagePlan.of_values((key, prov[2], prov[3], label, meta, oh, ow, gh, gw, n, rate,
                                        packer.Refit(*refit) if refit else None))
            items.append((plan, prov))
            payloads.append(ref)
        self._decided([Decision(self._plan_line, tuple(items), tuple(payloads))])
        self._plan_line += 1

    def write_plan(self, path: str, headers: Optional[dict] = None) -> int:
        """Write this stream's global plan (every decision of its epochs, in order) to a plan file that
        ranks read with PackedStream(..., plan=path) instead of reading and planning every header: JSON
        lines, the options first, then one decision per line (each image's reference, provenance and
        plan). Needs a source that reads one record by reference (folders, synthetic). `headers`: {unit:
        its Source.headers list}, read elsewhere (pipelines.batch.plan_job, in parallel), else read here.
        Returns the number of decisions; nothing is filled."""
        if self.epochs is None:
            raise ValueError("a plan file holds a finite number of epochs: give epochs")
        if self.shard_count != 1 or self.plan is not None:
            raise ValueError("write_plan writes the whole global plan: from a stream of one rank, planning itself")
        count = 0
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(self._plan_header(), sort_keys=True) + "\n")
                self._rows = 1
                self._driver = _PlanWriter(f)
                self._headers = headers
                while not self._reader_done:
                    self._read_one()
                count = self._driver.count
            os.replace(tmp, path)
        finally:
            self._driver, self._headers = None, None
            if os.path.exists(tmp):
                os.remove(tmp)
        return count

    def _replan(self, provenances: list[list]) -> tuple[list[ImagePlan], list[Any]]:
        """Re-plan images from [unit index, offset, epoch, images_seen], reading each unit once: their
        plans and payloads."""
        wanted: dict[int, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for i, (unit, offset, _, _) in enumerate(provenances):
            wanted[int(unit)][int(offset)].append(i)
        out: list[Optional[ImagePlan]] = [None] * len(provenances)
        payloads: list[Any] = [None] * len(provenances)
        for unit, offsets in wanted.items():
            last = max(offsets)
            if not 0 <= unit < len(self._units):
                break
            records = unit_headers(self.source, self._units[unit], self.config.max_pixels)
            for off, rec in enumerate(itertools.islice(records, last + 1)):
                for i in offsets.get(off, ()):
                    _, _, epoch, seen = provenances[i]
                    try:
                        if rec.reject:
                            raise ImageRejected(rec.reject, rec.detail)
                        out[i] = rec.plan(self.config, epoch=int(epoch), images_seen=int(seen))
                    except ImageRejected as e:
                        raise StreamError(f"image {rec.key!r} (unit {unit}) was accepted before but now fails: {e}") from None
                    payloads[i] = rec.payload
        missing = [provenances[i] for i, p in enumerate(out) if p is None]
        if missing:
            raise StreamError(f"the source no longer has the records {missing[:3]} named in the state")
        return out, payloads  # type: ignore[return-value]


def element_spec(config: PackConfig, meta_fields: Sequence[str] = ()) -> dict:
    """The tf.TensorSpec of every record field (packer.record_fields): static shapes [L, P*P*3], [L], [E], []."""
    import tensorflow as tf

    dtypes = {"uint8": tf.uint8, "int32": tf.int32, "float32": tf.float32, "string": tf.string}
    return {f.name: tf.TensorSpec(f.shape(config.seq_len, config.token_dim, config.max_images_per_seq), dtypes[f.dtype],
                                  f.name) for f in packer.record_fields(meta_fields)}


def _tf_ready(record: dict) -> dict:
    """Object arrays of str become bytes arrays, which tf.data takes as tf.string."""
    return {k: (v.astype(np.bytes_) if v.dtype == object else v) for k, v in record.items()}


def as_tf_dataset(source: Any, config: PackConfig, *, state: Optional[dict] = None, **stream_kwargs):
    """A tf.data.Dataset of packed records (unbatched; every shape static, so the caller batches).

    It wraps a PackedStream (same arguments) in Dataset.from_generator: decoding, resizing and
    assembly run in the stream's worker processes (`num_parallel`), not in tf.data map calls, because
    packing is a sequential, stateful step that tf.data cannot parallelize and py_function calls would
    hold the GIL; add `.prefetch()` to overlap packing with the training step. Each iteration of the dataset starts a
    fresh stream (from `state` when given)."""
    import tensorflow as tf

    meta_fields = tuple(stream_kwargs.get("meta_fields", ()))
    resolved = resolve_source(source, meta_fields)

    def generate():
        with PackedStream(resolved, config, state=state, **stream_kwargs) as stream:
            for record in stream:
                yield _tf_ready(record)

    return tf.data.Dataset.from_generator(generate, output_signature=element_spec(config, meta_fields))
