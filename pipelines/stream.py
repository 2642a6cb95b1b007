"""Online packing inside a training job: a resumable iterator of packed records, and its tf.data view.

    stream = PackedStream("photos/", PackConfig(resolution="uniform:64:256"), epochs=None)
    for record in stream: ...              # dicts of numpy arrays, the packer's record fields
    for batch in stream.batches(64): ...   # or ready batches: the same records stacked, leading dim 64
    saved = stream.state()                 # small JSON; PackedStream(..., state=saved) resumes exactly

What runs where. The calling process reads records, plans each image from its header
(packer.plan_header: size and EXIF orientation, no pixels) and decides the sequences on token counts
(packer.PackingCore). Filling (decode, resize, patchify, drop) and assembling whole sequences run in
`num_parallel` worker processes (packer.fill_pool, driven by packer.Driver) that write straight into
shared memory; the calling process only copies finished records (or batches) out. num_parallel 0 fills in
the calling process. The output is the same for every num_parallel.

Order. Epoch e reads the source's units ordered by stable_hash(unit, f"{seed}/{e}/unit") and shuffles the
records inside consecutive blocks of `shuffle_block` records by stable_hash(key, f"{seed}/{e}"): a pure
function of (seed, epoch), in memory bounded by the block. Resolution and token drop are drawn per
(seed, key, epoch); the drop schedule's images_seen is the number of source records the stream has
read before the image (rejected ones included), counted across epochs.

Rejects. Every record is packed or rejected with a reason: at read time (the source's own reject,
or a header that does not plan) or at fill time (pixels that fail to decode, `worker_crashed` when the
worker process filling it died: the worker is replaced). A failed fill leaves its slot as padding:
the record holds the other images (see packer._engine). Fill failures are counted when their record is
returned.

Resume. The state names the read position (epoch, block start, records consumed in the block), the
core's state, whose pending images are named by provenance [unit index, offset in unit, epoch,
images_seen], and the sequences decided but not yet returned (by the provenance of their images and
any exact-fill re-plan). Restoring re-reads those few records and re-plans them (headers only), so the
restored stream yields exactly what the uninterrupted one yields from that point on. The state never
holds image content or unit names, so it stays small (tens of kB at window 1024).
"""
from __future__ import annotations

import collections
import itertools
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

import packer
from packer import Decision, Driver, ImagePlan, ImageRejected, PackConfig, PackingCore, RejectBudget, RejectBudgetExceeded

STATE_VERSION = 2
__all__ = ["PackedStream", "StreamError", "RejectBudgetExceeded", "as_tf_dataset", "element_spec", "resolve_source"]


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


_EPOCH_END = object()


class PackedStream:
    """An endless (or `epochs`-long) iterator of packed records, resumable from `state()`.

    Args:
      source: a source spec string (see pipelines.sources.open_source) or a Source object.
      config: the PackConfig (the same one the CLI builds from its options).
      epochs: None for forever, else the number of passes; the packer is flushed once, at the end.
      shuffle: reshuffle units and records every epoch (pure function of seed and epoch).
      meta_fields: source metadata fields carried into `meta_<name>` record fields.
      max_rejects: None (no limit), an int (most rejected images allowed) or a float in (0, 1) (most
        rejected fraction of the images seen, checked from the 100th image and at each epoch end).
      num_parallel: worker processes that fill and assemble (0: in the calling process; default "auto":
        every core this process may use; packer.resolve_workers).
      shuffle_block: records shuffled together (memory is bounded by one block of encoded images).
      state: a `state()` to resume from.
    """

    def __init__(self, source: Any, config: PackConfig, *, epochs: Optional[int] = None, shuffle: bool = True,
                 meta_fields: Sequence[str] = (), max_rejects: Union[None, int, float] = None,
                 num_parallel: Optional[int] = None, shuffle_block: int = 1024, state: Optional[dict] = None):
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or an integer >= 1, got {epochs!r}")
        RejectBudget(max_rejects)  # checks the spec
        if not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ValueError(f"shuffle_block must be an integer >= 1, got {shuffle_block!r}")
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self.source = resolve_source(source, self.meta_fields)
        self.epochs, self.shuffle, self.max_rejects, self.shuffle_block = epochs, shuffle, max_rejects, shuffle_block
        self.num_parallel = packer.resolve_workers(num_parallel)
        self._units = list(self.source.units())
        self._driver: Optional[Driver] = None
        self._closed = False
        self._reset()
        if state is not None:
            self.restore(state)

    # ------------------------------------------------------------------ public
    @property
    def rejects(self) -> dict[str, int]:
        """Rejected images so far, by reason."""
        return dict(self._core.reject_counts)

    @property
    def reject_examples(self) -> list[dict]:
        """The most recent rejects: {key, reason, detail, provenance: [unit index, offset, epoch, images_seen]}."""
        return list(self._core.budget.examples)

    @property
    def stats(self) -> dict:
        """Counters. Returned: sequences (and the images and tokens in them) the stream has yielded.
        Pending: read ahead and decided (sequences_pending) or still in the packer's window, not yet
        returned. images_seen counts every record read (rejects included)."""
        inflight = self._inflight()
        pending_images = self._core.num_pending + sum(len(d.items) for d in inflight)
        returned = self._returned()
        return {"epoch": self._pos[0], "images_seen": self._core.images_seen, "images_packed": returned["images"],
                "images_rejected": self._core.num_rejected, "rejects": self.rejects,
                "sequences": returned["sequences"], "sequences_pending": len(inflight),
                "images_pending": pending_images, "tokens_real": returned["tokens_real"],
                "tokens_padding": returned["tokens_padding"]}

    def state(self) -> dict:
        """JSON-serializable position: rebuild with PackedStream(..., state=s) or .restore(s)."""
        return {"version": STATE_VERSION, "config": self.config.to_json(), "meta_fields": list(self.meta_fields),
                "epochs": self.epochs, "shuffle": self.shuffle, "shuffle_block": self.shuffle_block,
                "units": _units_fingerprint(self._units), "position": list(self._pos), "core": self._core.state(),
                "queued": [[self._queued_image(p, prov) for p, prov in d.items] for d in self._inflight()],
                "finished": self._reader_done, "accepted_in_epoch": self._accepted_in_epoch,
                "returned": self._returned()}

    def restore(self, state: dict) -> None:
        """Continue from `state` as if the stream that saved it had never stopped."""
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
        self._pos = tuple(state["position"])
        self._reader_done = bool(state["finished"])
        self._accepted_in_epoch = int(state["accepted_in_epoch"])
        self._returned_before = dict(state["returned"])
        pending = PackingCore.pending_provenance(state["core"])
        queued = state["queued"]
        wanted = [list(p) for p in pending] + [entry[:4] for group in queued for entry in group]
        plans, payloads = self._replan(wanted)
        self._core.restore(state["core"], plans[:len(pending)], payloads[:len(pending)])
        rest = list(zip(plans[len(pending):], payloads[len(pending):]))
        first_seq = self._core.next_seq - len(queued)
        self._restored = []
        for n, group in enumerate(queued):
            items = []
            for entry in group:
                plan, payload = rest.pop(0)
                if len(entry) > 4:
                    gh, gw, tokens, rerender = entry[4]
                    plan = plan.with_refit(packer.Refit(gh, gw, tokens, 1.0 - tokens / (gh * gw), bool(rerender)))
                items.append((plan, entry[:4], payload))
            self._restored.append(Decision(first_seq + n, tuple((p, prov) for p, prov, _ in items),
                                           tuple(payload for _, _, payload in items)))
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
    def _reset(self) -> None:
        self._core = PackingCore(self.config, max_rejects=self.max_rejects)
        self._pos = (0, 0, 0, 0)  # (epoch, block start unit index, block start offset in unit, consumed in block)
        self._reader: Optional[Iterator] = None
        self._reads = 0
        self._reader_done = False
        self._accepted_in_epoch = 0
        self._restored: list[Decision] = []  # decided before a restore, not yet returned: put first
        self._returned_before = {"sequences": 0, "images": 0, "tokens_real": 0, "tokens_padding": 0}

    def _start(self, rows: int) -> None:
        if self._closed:
            raise StreamError("the stream is closed")
        if self._driver is None:
            pool = packer.fill_pool(self.config, self.num_parallel, rows_per_slot=rows)
            self._driver = Driver(pool, self.meta_fields, on_failed=self._core.fill_failed)
            self._driver.put(self._restored)
            self._restored = []
        elif self._driver.pool.rows != rows:
            raise StreamError(f"this stream yields {'batches' if self._driver.pool.rows > 1 else 'records'}; "
                              "records and batches cannot be mixed")

    def _close_driver(self) -> None:
        if self._driver is not None:
            self._restored = self._driver.inflight + self._restored
            self._returned_before = self._returned()
            self._driver.close()
            self._driver = None

    def _inflight(self) -> list[Decision]:
        return (self._driver.inflight if self._driver is not None else []) + self._restored

    def _returned(self) -> dict:
        done = self._driver.returned if self._driver is not None else {}
        return {k: v + done.get(k, 0) for k, v in self._returned_before.items()}

    def _queued_image(self, plan: ImagePlan, prov: list) -> list:
        r = plan.refit
        return list(prov) if r is None else list(prov) + [[r.grid_h, r.grid_w, r.tokens, int(r.rerender)]]

    def _next_slot(self):
        """The next filled slot in order (a packer Slot), or None at the end of the stream. Reads ahead
        until the pool is full (a deterministic amount), then waits for the oldest slot."""
        driver = self._driver
        while True:
            while not self._reader_done and driver.wants_input:
                self._read_one()
                self._reads += 1
                if self._reads % 8 == 0:  # keep the workers fed while reading a burst
                    driver.pool.poll()
            slot = driver.take(final=self._reader_done)
            if slot is not None or self._reader_done:
                return slot

    def _read_one(self) -> None:
        """Read one record (or the epoch end, or the end of the stream) and decide on it."""
        if self._reader is None:
            self._reader = self._records()
        try:
            item = next(self._reader)
        except StopIteration:
            self._driver.put(self._core.flush())
            self._reader_done = True
            return
        if item is _EPOCH_END:
            if self._accepted_in_epoch == 0:
                raise StreamError(f"every image of epoch {self._pos[0]} was rejected: {self.rejects}")
            self._core.check_budget(final=True)
            self._pos = (self._pos[0] + 1, 0, 0, 0)
            self._accepted_in_epoch = 0
            return
        epoch, u, off, rec, position = item
        self._pos = position
        seen = self._core.images_seen
        prov = [u, off, epoch, seen]
        if getattr(rec, "reject", None):
            self._core.reject(rec.key, rec.reject, getattr(rec, "detail", ""), prov)
            return
        try:
            plan = packer.plan_header(rec.data, rec.key, self.config, epoch=epoch, images_seen=seen, label=rec.label,
                                      meta=rec.meta)
        except ImageRejected as e:
            self._core.reject(rec.key, e.reason, e.detail, prov)
            return
        self._accepted_in_epoch += 1
        self._driver.put(self._core.add(plan, prov, rec.data))

    def _records(self) -> Iterator:
        """(epoch, unit index, offset, record, position after it) from the current position on, in
        stream order; _EPOCH_END after each epoch."""
        epoch, unit_index, offset, skip = self._pos
        while self.epochs is None or epoch < self.epochs:
            order = _epoch_order(len(self._units), self._units, self.config.seed, epoch, self.shuffle)
            reader = self._read_from(order, unit_index, offset)
            block_start = (unit_index, offset)
            any_read = unit_index > 0 or offset > 0 or skip > 0
            while True:
                block = list(itertools.islice(reader, self.shuffle_block))
                if not block:
                    break
                any_read = True
                if self.shuffle:
                    block.sort(key=lambda t: (packer.stable_hash(t[2].key, f"{self.config.seed}/{epoch}"), t[0], t[1]))
                for i, (u, off, rec) in enumerate(block):
                    if i >= skip:
                        yield epoch, order[u], off, rec, (epoch, block_start[0], block_start[1], i + 1)
                skip = 0
                last_u, last_off, _ = max(block, key=lambda t: (t[0], t[1]))
                block_start = (last_u, last_off + 1)
            if not any_read:
                raise StreamError("the source has no records")
            yield _EPOCH_END
            epoch, unit_index, offset, skip = epoch + 1, 0, 0, 0

    def _read_from(self, order: list[int], position: int, offset: int) -> Iterator[tuple[int, int, Any]]:
        """(position in the epoch's unit order, offset in unit, SourceRecord) from a position on."""
        for p in range(position, len(order)):
            start = offset if p == position else 0
            for off, rec in enumerate(itertools.islice(self.source.read(self._units[order[p]]), start, None), start):
                yield p, off, rec

    def _replan(self, provenances: list[list]) -> tuple[list[ImagePlan], list[bytes]]:
        """Re-plan images from [unit index, offset, epoch, images_seen], reading each unit once: their
        plans and encoded bytes."""
        wanted: dict[int, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for i, (unit, offset, _, _) in enumerate(provenances):
            wanted[int(unit)][int(offset)].append(i)
        out: list[Optional[ImagePlan]] = [None] * len(provenances)
        datas: list[bytes] = [b""] * len(provenances)
        for unit, offsets in wanted.items():
            last = max(offsets)
            if not 0 <= unit < len(self._units):
                break
            for off, rec in enumerate(itertools.islice(self.source.read(self._units[unit]), last + 1)):
                for i in offsets.get(off, ()):
                    _, _, epoch, seen = provenances[i]
                    try:
                        out[i] = packer.plan_header(rec.data, rec.key, self.config, epoch=int(epoch), images_seen=int(seen),
                                                    label=rec.label, meta=rec.meta)
                    except ImageRejected as e:
                        raise StreamError(f"image {rec.key!r} (unit {unit}) was accepted before but now fails: {e}") from None
                    datas[i] = rec.data
        missing = [provenances[i] for i, p in enumerate(out) if p is None]
        if missing:
            raise StreamError(f"the source no longer has the records {missing[:3]} named in the state")
        return out, datas  # type: ignore[return-value]


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
