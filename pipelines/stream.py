"""Online packing inside a training job: a resumable iterator of packed records, and its tf.data view.

    stream = PackedStream("photos/", PackConfig(resolution="uniform:64:256"), epochs=None)
    for record in stream: ...              # dicts of numpy arrays, the packer's record fields
    saved = stream.state()                 # small JSON; PackedStream(..., state=saved) resumes exactly

Order. Epoch e reads the source's units ordered by stable_hash(unit, f"{seed}/{e}") and shuffles the
records inside consecutive blocks of `shuffle_block` records by stable_hash(key, f"{seed}/{e}"): a pure
function of (seed, epoch), in memory bounded by the block. Resolution and token drop are drawn per
(seed, key, epoch) by packer.prepare_image; the drop schedule's images_seen is the number of source
records the stream has read before the image (rejected ones included), counted across epochs.

Resume. The state names the position (epoch, block start, records consumed in the block), the
packer's state, whose pending images are named by provenance [unit, offset in unit, epoch,
images_seen], and the sequences packed but not yet yielded (by the provenance of their images).
Restoring re-reads those few records and re-creates the images with packer.prepare_image, so the
restored stream yields exactly what the uninterrupted one yields from that point on.

Parallelism. A thread pool runs packer.prepare_image (decode, resize, patchify, drop) on up to
`num_parallel` images at once, in order. Threads and not processes: Pillow releases the GIL while
decoding and resizing, which is most of the work, so threads scale with cores without pickling the
encoded bytes in and the patch arrays out, start instantly, and work inside tf.data's generator thread.
Results are consumed in submission order, so the output does not depend on `num_parallel`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

import packer
from packer import ImageRejected, PackConfig, PatchedImage, SequencePacker

STATE_VERSION = 1
_MAX_REJECT_EXAMPLES = 20  # the stream keeps this many recent rejects (key, reason, detail); counts are complete
_FRACTION_MIN_IMAGES = 100  # a fractional reject budget is checked from this many images seen on


class StreamError(RuntimeError):
    """The stream cannot go on (empty source, a state that does not match, ...)."""


class RejectBudgetExceeded(StreamError):
    """More images were rejected than `max_rejects` allows; `counts` has the rejects by reason."""

    def __init__(self, message: str, counts: dict[str, int], examples: list[dict]):
        super().__init__(message)
        self.counts = counts
        self.examples = examples


def resolve_source(source: Any, meta_fields: Sequence[str] = ()):
    """A Source object from a spec string (pipelines.sources.open_source) or a Source as it is."""
    if isinstance(source, (str, os.PathLike)):
        from pipelines.sources import open_source
        return open_source(str(source), meta_fields=tuple(meta_fields))
    if not (hasattr(source, "units") and hasattr(source, "read")):
        raise TypeError(f"expected a source spec string or an object with units() and read(unit), got {type(source).__name__}")
    return source


def _epoch_units(units: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    if not shuffle:
        return list(units)
    return sorted(units, key=lambda u: (packer.stable_hash(u, f"{seed}/{epoch}/unit"), u))


def _prepare(config: PackConfig, record, epoch: int, images_seen: int) -> "PatchedImage | ImageRejected":
    try:
        return packer.prepare_image(record.data, record.key, config, epoch=epoch, images_seen=images_seen,
                                    label=record.label, meta=record.meta)
    except ImageRejected as e:
        return e


class _Item:
    """One source record on its way through the stream, with where it came from."""

    __slots__ = ("record", "unit", "offset", "epoch", "block_start", "index", "images_seen")

    def __init__(self, record, unit, offset, epoch, block_start, index, images_seen):
        self.record, self.unit, self.offset, self.epoch = record, unit, offset, epoch
        self.block_start, self.index, self.images_seen = block_start, index, images_seen

    @property
    def provenance(self) -> list:
        return [self.unit, self.offset, self.epoch, self.images_seen]


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
      num_parallel: images prepared at once by the thread pool (0 or 1: in the calling thread).
      shuffle_block: records shuffled together (memory is bounded by one block of encoded images).
      state: a `state()` to resume from.
    """

    def __init__(self, source: Any, config: PackConfig, *, epochs: Optional[int] = None, shuffle: bool = True,
                 meta_fields: Sequence[str] = (), max_rejects: Union[None, int, float] = None,
                 num_parallel: Optional[int] = None, shuffle_block: int = 1024, state: Optional[dict] = None):
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or an integer >= 1, got {epochs!r}")
        if max_rejects is not None and not (
                (isinstance(max_rejects, int) and max_rejects >= 0) or (isinstance(max_rejects, float) and 0 < max_rejects < 1)):
            raise ValueError(f"max_rejects must be None, an integer >= 0 or a fraction in (0, 1), got {max_rejects!r}")
        if not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ValueError(f"shuffle_block must be an integer >= 1, got {shuffle_block!r}")
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self.source = resolve_source(source, self.meta_fields)
        self.epochs, self.shuffle, self.max_rejects, self.shuffle_block = epochs, shuffle, max_rejects, shuffle_block
        self.num_parallel = min(8, os.cpu_count() or 1) if num_parallel is None else max(0, int(num_parallel))
        self._units = list(self.source.units())
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_parallel, "navit-prepare") if self.num_parallel > 1 else None
        self._reset()
        if state is not None:
            self.restore(state)

    # ------------------------------------------------------------------ public
    @property
    def rejects(self) -> dict[str, int]:
        """Rejected images so far, by reason."""
        return dict(self._reject_counts)

    @property
    def reject_examples(self) -> list[dict]:
        """The most recent rejects: {key, reason, detail, epoch}."""
        return list(self._reject_examples)

    @property
    def stats(self) -> dict:
        """Counters: images read, packed and rejected, sequences yielded, tokens, epoch."""
        s = dict(self._packer.stats)
        return {"epoch": self._pos[0], "images_seen": self._images_seen, "images_packed": s["images"],
                "images_rejected": sum(self._reject_counts.values()), "rejects": self.rejects,
                "sequences": self._yielded, "tokens_real": s["tokens_real"], "tokens_padding": s["tokens_padding"]}

    def state(self) -> dict:
        """JSON-serializable position: rebuild with PackedStream(..., state=s) or .restore(s)."""
        return {"version": STATE_VERSION, "config": self.config.to_json(), "meta_fields": list(self.meta_fields),
                "epochs": self.epochs, "shuffle": self.shuffle, "shuffle_block": self.shuffle_block,
                "position": list(self._pos), "images_seen": self._images_seen, "yielded": self._yielded,
                "packer": self._packer.state(), "queued": [provs for _, provs in self._out],
                "finished": self._finished, "accepted_in_epoch": self._accepted_in_epoch, "rejects": dict(self._reject_counts),
                "reject_examples": list(self._reject_examples)}

    def restore(self, state: dict) -> None:
        """Continue from `state` as if the stream that saved it had never stopped."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        for name, mine in (("config", self.config.to_json()), ("meta_fields", list(self.meta_fields)),
                           ("epochs", self.epochs), ("shuffle", self.shuffle), ("shuffle_block", self.shuffle_block)):
            theirs = state[name]
            if name == "config":
                theirs = PackConfig(**theirs).to_json()
            if theirs != mine and name == "config":
                differ = ", ".join(f"{k}={theirs.get(k)!r} (this stream: {mine.get(k)!r})"
                                   for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k))
                raise StreamError(f"state was saved with another config: {differ}")
            if theirs != mine:
                raise StreamError(f"state was saved with {name}={theirs!r}, this stream has {mine!r}")
        self._reset()
        self._pos = tuple(state["position"])
        self._images_seen = int(state["images_seen"])
        self._yielded = int(state["yielded"])
        self._finished = bool(state["finished"])
        self._accepted_in_epoch = int(state["accepted_in_epoch"])
        self._reject_counts = collections.Counter(state["rejects"])
        self._reject_examples = collections.deque(state["reject_examples"], maxlen=_MAX_REJECT_EXAMPLES)
        provs = self._packer.pending_provenance(state["packer"])
        queued = state["queued"]
        images = self._recreate(list(provs) + [p for group in queued for p in group])
        self._packer.restore(state["packer"], images[:len(provs)])
        self._next_id = int(state["packer"]["next_id"])
        self._inflight = {int(i): (prov, im) for (i, prov), im in zip(state["packer"]["pending"], images)}
        rest = images[len(provs):]
        for group in queued:
            batch, rest = rest[:len(group)], rest[len(group):]
            self._out.append((packer.build_record(batch, self.config, self.meta_fields), group))

    def close(self) -> None:
        """Stop the worker threads (the stream cannot be iterated afterwards)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "PackedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._out:
            if self._finished:
                raise StopIteration
            self._step()
        record, _ = self._out.popleft()
        self._yielded += 1
        return record

    # ------------------------------------------------------------------ internals
    def _reset(self) -> None:
        self._packer = SequencePacker(self.config, self.meta_fields)
        self._pos = (0, 0, 0, 0)  # (epoch, block start unit index, block start offset in unit, consumed in block)
        self._images_seen = 0
        self._yielded = 0
        self._finished = False
        self._out: collections.deque = collections.deque()  # (record, [provenance of its images])
        self._reject_counts: collections.Counter = collections.Counter()
        self._reject_examples: collections.deque = collections.deque(maxlen=_MAX_REJECT_EXAMPLES)
        self._accepted_in_epoch = 0
        self._pipeline: Optional[Iterator] = None
        self._inflight: dict[int, tuple[list, PatchedImage]] = {}  # packer item id -> (provenance, image)
        self._next_id = 0

    def _records_from(self, epoch: int, unit_index: int, offset: int) -> Iterator[tuple[int, int, Any]]:
        """(unit index, offset in unit, SourceRecord) in epoch order, starting at a position."""
        units = _epoch_units(self._units, self.config.seed, epoch, self.shuffle)
        for u in range(unit_index, len(units)):
            start = offset if u == unit_index else 0
            for off, rec in enumerate(itertools.islice(self.source.read(units[u]), start, None), start):
                yield u, off, rec

    def _items(self) -> Iterator[_Item]:
        """Every record from the current position on, in stream order; None marks an epoch end."""
        epoch, unit_index, offset, skip = self._pos
        seen = self._images_seen
        while self.epochs is None or epoch < self.epochs:
            units = _epoch_units(self._units, self.config.seed, epoch, self.shuffle)
            reader = self._records_from(epoch, unit_index, offset)
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
                        yield _Item(rec, units[u], off, epoch, block_start, i, seen)
                        seen += 1
                skip = 0
                last_u, last_off, _ = max(block, key=lambda t: (t[0], t[1]))
                block_start = (last_u, last_off + 1)
            if not any_read:
                raise StreamError("the source has no records")
            yield None
            epoch, unit_index, offset, skip = epoch + 1, 0, 0, 0

    def _pipeline_iter(self) -> Iterator[tuple[Optional[_Item], Any]]:
        """(item, PatchedImage or ImageRejected) in stream order, prepared up to num_parallel at once."""
        items = self._items()
        if self._pool is None:
            for it in items:
                yield it, (None if it is None else _prepare(self.config, it.record, it.epoch, it.images_seen))
            return
        window: collections.deque = collections.deque()
        ahead = 4 * self.num_parallel
        for it in items:
            fut = None if it is None else self._pool.submit(_prepare, self.config, it.record, it.epoch, it.images_seen)
            window.append((it, fut))
            if len(window) >= ahead:
                it0, f0 = window.popleft()
                yield it0, (None if f0 is None else f0.result())
        while window:
            it0, f0 = window.popleft()
            yield it0, (None if f0 is None else f0.result())

    def _step(self) -> None:
        """Consume one record (or the epoch end, or the end of the stream)."""
        if self._pipeline is None:
            self._pipeline = self._pipeline_iter()
        try:
            item, result = next(self._pipeline)
        except StopIteration:
            self._emit(self._packer.flush())
            self._finished = True
            return
        if item is None:  # epoch end
            if self._accepted_in_epoch == 0:
                raise StreamError(f"every image of epoch {self._pos[0]} was rejected: {self.rejects}")
            self._check_budget(final=True)
            self._pos = (self._pos[0] + 1, 0, 0, 0)
            self._accepted_in_epoch = 0
            return
        self._images_seen = item.images_seen + 1
        self._pos = (item.epoch, item.block_start[0], item.block_start[1], item.index + 1)
        if isinstance(result, ImageRejected):
            self._reject_counts[result.reason] += 1
            self._reject_examples.append({"key": item.record.key, "reason": result.reason, "detail": result.detail,
                                          "epoch": item.epoch})
            self._check_budget(final=False)
            return
        self._accepted_in_epoch += 1
        self._inflight[self._next_id] = (item.provenance, result)
        self._next_id += 1
        self._emit(self._packer.add(result, item.provenance))

    def _emit(self, records: list[dict]) -> None:
        """Queue records the packer closed, each with the provenance of its images (for state())."""
        if not records:
            return
        pending = {int(i) for i, _ in self._packer.state()["pending"]}
        emitted = [i for i in self._inflight if i not in pending]
        for rec in records:
            seg = rec["segment_ids"]
            provs = []
            for j in range(int(rec["num_images"])):
                sel = seg == j + 1
                for i in emitted:
                    prov, im = self._inflight[i]
                    # The first in-flight image equal to this slot; equal images are interchangeable.
                    if im.key == rec["image_keys"][j] and im.num_tokens == int(sel.sum()) and \
                            np.array_equal(im.pos_y, rec["pos_y"][sel]) and np.array_equal(im.pos_x, rec["pos_x"][sel]) and \
                            np.array_equal(im.patches, rec["patches"][sel]):
                        emitted.remove(i)
                        del self._inflight[i]
                        provs.append(prov)
                        break
                else:
                    raise AssertionError(f"packed image {rec['image_keys'][j]!r} not found among the images in flight")
            self._out.append((rec, provs))

    def _check_budget(self, final: bool) -> None:
        budget, rejected, seen = self.max_rejects, sum(self._reject_counts.values()), self._images_seen
        if budget is None:
            return
        if isinstance(budget, int):
            over = rejected > budget
            limit = f"{budget} images"
        else:
            over = (final or seen >= _FRACTION_MIN_IMAGES) and rejected > budget * seen
            limit = f"{budget:.2%} of the images seen"
        if over:
            raise RejectBudgetExceeded(
                f"{rejected} of {seen} images rejected, over the budget max_rejects={budget} ({limit}); "
                f"by reason: {dict(self._reject_counts)}; last: {list(self._reject_examples)[-3:]}",
                dict(self._reject_counts), list(self._reject_examples))

    def _recreate(self, provenances: list) -> list[PatchedImage]:
        """Re-create images from [unit, offset, epoch, images_seen], reading each unit once."""
        wanted: dict[str, dict[int, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for i, (unit, offset, _, _) in enumerate(provenances):
            wanted[unit][int(offset)].append(i)
        out: list[Optional[PatchedImage]] = [None] * len(provenances)
        for unit, offsets in wanted.items():
            last = max(offsets)
            for off, rec in enumerate(itertools.islice(self.source.read(unit), last + 1)):
                for i in offsets.get(off, ()):
                    _, _, epoch, seen = provenances[i]
                    result = _prepare(self.config, rec, int(epoch), int(seen))
                    if isinstance(result, ImageRejected):
                        raise StreamError(f"image {rec.key!r} (unit {unit!r}) was accepted before but now fails: {result}")
                    out[i] = result
        missing = [provenances[i] for i, im in enumerate(out) if im is None]
        if missing:
            raise StreamError(f"the source no longer has the records {missing[:3]} named in the state")
        return out  # type: ignore[return-value]


def element_spec(config: PackConfig, meta_fields: Sequence[str] = ()) -> dict:
    """The tf.TensorSpec of every record field: static shapes [L, P*P*3], [L], [E_max], []."""
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

    It wraps a PackedStream (same arguments) in Dataset.from_generator: decoding and resizing run in
    the stream's thread pool (`num_parallel`), not in tf.data map calls, because packing is a
    sequential, stateful step that tf.data cannot parallelize and py_function calls would hold the GIL;
    add `.prefetch()` to overlap packing with the training step. Each iteration of the dataset starts a
    fresh stream (from `state` when given)."""
    import tensorflow as tf

    meta_fields = tuple(stream_kwargs.get("meta_fields", ()))
    resolved = resolve_source(source, meta_fields)

    def generate():
        with PackedStream(resolved, config, state=state, **stream_kwargs) as stream:
            for record in stream:
                yield _tf_ready(record)

    return tf.data.Dataset.from_generator(generate, output_signature=element_spec(config, meta_fields))
