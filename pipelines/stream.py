"""Online packing inside a training job: a resumable iterator of packed records, and its tf.data view.

    stream = PackedStream("photos/", PackConfig(resolution="uniform:64:256"), epochs=None)
    for record in stream: ...              # dicts of numpy arrays, the packer's record fields
    for batch in stream.batches(64): ...   # or ready batches: the same records stacked, leading dim 64
    saved = stream.state()                 # small JSON; PackedStream(..., state=saved) resumes exactly

What runs where. The calling process reads records, plans each image from its header
(packer.plan_header: size and EXIF orientation, no pixels) and decides the sequences on token counts
(packer.PackingCore). Filling (decode, resize, patchify, drop) and assembling whole sequences run in
`num_parallel` worker processes (packer.FillPool) that write straight into shared memory; the calling
process only copies finished records (or batches) out. num_parallel 0 or 1 fills in the calling process.
The output is the same for every num_parallel.

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
from packer import Decision, FillPool, ImagePlan, ImageRejected, PackConfig, PackingCore, RejectBudgetExceeded, Refit
from packer import check_budget_spec

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


def default_parallelism() -> int:
    """Worker processes by default: the cores this process may run on, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(16, cores)


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
      num_parallel: worker processes that fill and assemble (0 or 1: in the calling process; default:
        the cores this process may use, at most 16).
      shuffle_block: records shuffled together (memory is bounded by one block of encoded images).
      state: a `state()` to resume from.
    """

    def __init__(self, source: Any, config: PackConfig, *, epochs: Optional[int] = None, shuffle: bool = True,
                 meta_fields: Sequence[str] = (), max_rejects: Union[None, int, float] = None,
                 num_parallel: Optional[int] = None, shuffle_block: int = 1024, state: Optional[dict] = None):
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or an integer >= 1, got {epochs!r}")
        check_budget_spec(max_rejects)
        if not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ValueError(f"shuffle_block must be an integer >= 1, got {shuffle_block!r}")
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self.source = resolve_source(source, self.meta_fields)
        self.epochs, self.shuffle, self.max_rejects, self.shuffle_block = epochs, shuffle, max_rejects, shuffle_block
        self.num_parallel = default_parallelism() if num_parallel is None else max(0, int(num_parallel))
        self._units = list(self.source.units())
        self._pool: Optional[FillPool] = None
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
        return list(self._core.reject_examples)

    @property
    def stats(self) -> dict:
        """Counters. Returned: sequences (and the images and tokens in them) the stream has yielded.
        Pending: read ahead and decided (sequences_pending) or still in the packer's window, not yet
        returned. images_seen counts every record read (rejects included)."""
        pending_images = self._core.num_pending + sum(len(d.items) for d in self._inflight)
        return {"epoch": self._pos[0], "images_seen": self._core.images_seen, "images_packed": self._returned["images"],
                "images_rejected": self._core.num_rejected, "rejects": self.rejects,
                "sequences": self._returned["sequences"], "sequences_pending": len(self._inflight),
                "images_pending": pending_images, "tokens_real": self._returned["tokens_real"],
                "tokens_padding": self._returned["tokens_padding"]}

    def state(self) -> dict:
        """JSON-serializable position: rebuild with PackedStream(..., state=s) or .restore(s)."""
        return {"version": STATE_VERSION, "config": self.config.to_json(), "meta_fields": list(self.meta_fields),
                "epochs": self.epochs, "shuffle": self.shuffle, "shuffle_block": self.shuffle_block,
                "units": _units_fingerprint(self._units), "position": list(self._pos), "core": self._core.state(),
                "queued": [[self._queued_image(p, prov) for p, prov in d.items] for d in self._inflight],
                "finished": self._reader_done, "accepted_in_epoch": self._accepted_in_epoch,
                "returned": dict(self._returned)}

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
        self._drain_pool()
        self._reset()
        self._pos = tuple(state["position"])
        self._reader_done = bool(state["finished"])
        self._accepted_in_epoch = int(state["accepted_in_epoch"])
        self._returned = dict(state["returned"])
        pending = PackingCore.pending_provenance(state["core"])
        queued = state["queued"]
        wanted = [list(p) for p in pending] + [entry[:4] for group in queued for entry in group]
        plans = self._replan(wanted)
        self._core.restore(state["core"], plans[:len(pending)])
        rest = plans[len(pending):]
        first_seq = self._core.next_seq - len(queued)
        for n, group in enumerate(queued):
            items = []
            for entry in group:
                plan, rest = rest[0], rest[1:]
                if len(entry) > 4:
                    gh, gw, tokens, rerender = entry[4]
                    plan = plan.with_refit(Refit(gh, gw, tokens, 1.0 - tokens / (gh * gw), bool(rerender)))
                items.append((plan, entry[:4]))
            d = Decision(first_seq + n, tuple(items))
            self._inflight.append(d)
            self._decided.append(d)

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
            result = self._next_result()
            if result is None:
                return
            n = len(result.decisions)
            try:
                if n < batch_size and drop_remainder:
                    return
                batch = {k: (v[:n].copy() if copy else v[:n]) for k, v in result.arrays.items()}
                texts = [packer.text_fields(d, (r.slot for r in rej), self.config, self.meta_fields)
                         for d, rej in zip(result.decisions, result.rejects)]
                for name in texts[0]:
                    batch[name] = np.stack([t[name] for t in texts])
                self._returned_slot(result)
            finally:
                if copy or n < batch_size and drop_remainder:
                    self._pool.release()
            yield self._ordered(batch)
            if not copy:
                self._pool.release()

    def close(self) -> None:
        """Stop the worker processes (the stream cannot be iterated afterwards)."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "PackedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._start(1)
        result = self._next_result()
        if result is None:
            raise StopIteration
        try:
            d, rejects = result.decisions[0], result.rejects[0]
            record = {k: v[0].copy() for k, v in result.arrays.items()}
            record["num_images"] = np.int32(record["num_images"])
            record.update(packer.text_fields(d, (r.slot for r in rejects), self.config, self.meta_fields))
            self._returned_slot(result)
        finally:
            self._pool.release()
        return self._ordered(record)

    # ------------------------------------------------------------------ internals
    def _reset(self) -> None:
        self._core = PackingCore(self.config, self.meta_fields, max_rejects=self.max_rejects)
        self._pos = (0, 0, 0, 0)  # (epoch, block start unit index, block start offset in unit, consumed in block)
        self._reader: Optional[Iterator] = None
        self._reads = 0
        self._reader_done = False
        self._accepted_in_epoch = 0
        self._data: dict[int, bytes] = {}  # images_seen -> encoded bytes, for images not yet submitted
        self._inflight: collections.deque[Decision] = collections.deque()  # decided, not yet returned
        self._decided: collections.deque[Decision] = collections.deque()  # decided, not yet submitted
        self._returned = {"sequences": 0, "images": 0, "tokens_real": 0, "tokens_padding": 0}

    def _start(self, rows: int) -> None:
        if self._closed:
            raise StreamError("the stream is closed")
        if self._pool is None:
            workers = self.num_parallel if self.num_parallel > 1 else 0
            self._pool = FillPool(self.config, workers, rows_per_slot=rows)
        elif self._pool.rows != rows:
            raise StreamError(f"this stream yields {'batches' if self._pool.rows > 1 else 'records'}; "
                              "records and batches cannot be mixed")

    def _drain_pool(self) -> None:
        """Forget what the pool holds (before a restore)."""
        if self._pool is not None:
            rows = self._pool.rows
            self._pool.close()
            self._pool = None
            self._start(rows)

    def _queued_image(self, plan: ImagePlan, prov: list) -> list:
        r = plan.refit
        return list(prov) if r is None else list(prov) + [[r.grid_h, r.grid_w, r.tokens, int(r.rerender)]]

    def _ordered(self, record: dict) -> dict:
        order = ["patches", "segment_ids", "pos_y", "pos_x", "num_images", "image_keys", *packer.PER_IMAGE_FIELDS,
                 *(packer.META_PREFIX + m for m in self.meta_fields)]
        return {name: record[name] for name in order}

    def _returned_slot(self, result) -> None:
        """Account for the decisions of a slot being returned: failed fills, returned counters."""
        for d, rejects in zip(result.decisions, result.rejects):
            popped = self._inflight.popleft()
            assert popped is d
            self._core.fill_failed(rejects)
            tokens = d.tokens - sum(r.tokens for r in rejects)
            self._returned["sequences"] += 1
            self._returned["images"] += len(d.items) - len(rejects)
            self._returned["tokens_real"] += tokens
            self._returned["tokens_padding"] += self.config.seq_len - tokens

    def _next_result(self):
        """The next filled slot in order, or None at the end of the stream. Reads ahead until the pool
        is full (a deterministic amount), then waits for the oldest slot."""
        pool = self._pool
        while True:
            while self._decided:
                d = self._decided[0]
                datas = [self._data[prov[3]] for prov in d.provenances]
                if not pool.can_submit(datas):
                    break
                self._decided.popleft()
                for prov in d.provenances:
                    del self._data[prov[3]]
                pool.submit(d, datas)
            if self._decided and not pool.ready():  # no room yet: wait for the workers to free some
                pool.wait()
                continue
            if not self._decided and not self._reader_done and pool.can_submit():
                self._read_one()
                self._reads += 1
                if self._reads % 8 == 0:  # keep the workers fed while reading a burst
                    pool.poll()
                continue
            if self._reader_done and not self._decided:
                pool.seal()
            if pool.pending == 0:
                return None
            return pool.get()

    def _read_one(self) -> None:
        """Read one record (or the epoch end, or the end of the stream) and decide on it."""
        if self._reader is None:
            self._reader = self._records()
        try:
            item = next(self._reader)
        except StopIteration:
            self._decided.extend(self._decide(self._core.flush()))
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
        self._data[seen] = rec.data
        self._decided.extend(self._decide(self._core.add(plan, prov)))

    def _decide(self, decisions: list[Decision]) -> list[Decision]:
        self._inflight.extend(decisions)
        return decisions

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

    def _replan(self, provenances: list[list]) -> list[ImagePlan]:
        """Re-plan images from [unit index, offset, epoch, images_seen], reading each unit once; keeps
        their bytes for filling."""
        wanted: dict[int, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for i, (unit, offset, _, _) in enumerate(provenances):
            wanted[int(unit)][int(offset)].append(i)
        out: list[Optional[ImagePlan]] = [None] * len(provenances)
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
                    self._data[int(seen)] = rec.data
        missing = [provenances[i] for i, p in enumerate(out) if p is None]
        if missing:
            raise StreamError(f"the source no longer has the records {missing[:3]} named in the state")
        return out  # type: ignore[return-value]


def element_spec(config: PackConfig, meta_fields: Sequence[str] = ()) -> dict:
    """The tf.TensorSpec of every record field: static shapes [L, P*P*3], [L], [max_images_per_seq], []."""
    import tensorflow as tf

    L, E = config.seq_len, config.max_images_per_seq
    spec = {"patches": tf.TensorSpec((L, config.token_dim), tf.uint8, "patches"),
            "segment_ids": tf.TensorSpec((L,), tf.int32, "segment_ids"),
            "pos_y": tf.TensorSpec((L,), tf.int32, "pos_y"), "pos_x": tf.TensorSpec((L,), tf.int32, "pos_x"),
            "num_images": tf.TensorSpec((), tf.int32, "num_images"),
            "image_keys": tf.TensorSpec((E,), tf.string, "image_keys")}
    for name, (dtype, _) in packer.PER_IMAGE_FIELDS.items():
        spec[name] = tf.TensorSpec((E,), tf.as_dtype(dtype), name)
    for name in meta_fields:
        spec[packer.META_PREFIX + name] = tf.TensorSpec((E,), tf.string, packer.META_PREFIX + name)
    return spec


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
