"""The one fill loop every pipeline runs (the batch job, the Beam transform, the stream, the service):
decisions go in (`put`), filled slots come out (`take`), in decision order.

    driver = Driver(fill_pool(config, workers), meta_fields)
    driver.put(core.add(plan, provenance, payload))     # decide upstream (PackingCore), queue here
    while not driver.wants_input: slot = driver.take()  # backpressure: take what is filled when full
    ...
    driver.put(core.flush()); for slot in driver.drain(): ...

The driver submits queued decisions to its pool whenever the pool has room (output slots, input ring
bytes), takes results in order, and reports each slot's failed fills (`on_failed`, e.g. PackingCore.
fill_failed) as it hands the slot out. A Slot gives its rows as records or as one batch (`records`,
`batch`): the only place that turns a pool's output into record dicts.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from ._assemble import FillReject, filled_plans, record_of
from ._core import Decision
from ._pool import SlotResult
from ._record import ordered, text_rows


class Slot:
    """One filled output slot: `decisions` (its rows, in order), their failed fills (`rejects`), the
    numeric arrays and, where the pool has an encoder, each row's encoded record (`encoded`; views into
    the pool's memory, valid until `release()`)."""

    def __init__(self, result: SlotResult, pool, config, meta_fields: Sequence[str]):
        self.decisions, self.rejects, self.arrays = result.decisions, result.rejects, result.arrays
        self.encoded = result.encoded  # per row, its on-disk bytes where the pool's workers encoded it (else None)
        self._pool, self._config, self._meta_fields = pool, config, meta_fields
        self._released = False

    def __len__(self) -> int:
        return len(self.decisions)

    def records(self, copy: bool = True) -> list[dict[str, Any]]:
        """One record dict per row (copies unless copy=False: then views valid until release())."""
        return [record_of(d, {k: v[i] for k, v in self.arrays.items()}, rejects, self._config, self._meta_fields, copy)
                for i, (d, rejects) in enumerate(zip(self.decisions, self.rejects))]

    def batch(self, copy: bool = True) -> dict[str, Any]:
        """The rows stacked: every field with a leading dimension len(self) (numeric fields copied unless
        copy=False: then views valid until release())."""
        n = len(self.decisions)
        out = {k: (v[:n].copy() if copy else v[:n]) for k, v in self.arrays.items()}
        out.update(text_rows([filled_plans(d, rejects) for d, rejects in zip(self.decisions, self.rejects)],
                             self._config, self._meta_fields))
        return ordered(out, self._meta_fields)

    def release(self) -> None:
        """Give the slot's memory back to the pool (idempotent)."""
        if not self._released:
            self._released = True
            self._pool.release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Driver:
    """Decisions in, filled slots out, in decision order (see the module doc)."""

    def __init__(self, pool, meta_fields: Sequence[str] = (),
                 on_failed: Optional[Callable[[list[FillReject]], None]] = None):
        self.pool, self.meta_fields, self.on_failed = pool, tuple(meta_fields), on_failed
        self._queued: collections.deque[Decision] = collections.deque()  # put, not yet submitted
        self._inflight: collections.deque[Decision] = collections.deque()  # put, not yet taken (queued included)
        self.returned = {"sequences": 0, "images": 0, "tokens_real": 0, "tokens_padding": 0}

    def put(self, decisions: Iterable[Decision]) -> None:
        """Queue decisions (each with its payloads) and submit what the pool has room for."""
        for d in decisions:
            self._queued.append(d)
            self._inflight.append(d)
        self.submit()

    def submit(self) -> bool:
        """Submit queued decisions while the pool has room; True when nothing is left queued."""
        pool, queued = self.pool, self._queued
        while queued and pool.can_submit(queued[0]):
            pool.submit(queued.popleft())
        return not queued

    @property
    def wants_input(self) -> bool:
        """Nothing queued and room in the pool: the caller may decide more before taking."""
        return not self._queued and self.pool.can_submit()

    @property
    def pending(self) -> int:
        """Decisions put and not yet taken."""
        return len(self._inflight)

    @property
    def queued(self) -> int:
        """Decisions put and not yet submitted to the pool (0: every decision put is being filled)."""
        return len(self._queued)

    @property
    def inflight(self) -> list[Decision]:
        """The decisions put and not yet taken, in order (what a resumable state must name)."""
        return list(self._inflight)

    def take(self, final: bool = False) -> Optional[Slot]:
        """The next slot in decision order once filled (waiting for it), or None when there is nothing to
        take now: nothing pending, or (final=False) the oldest slot waits for more decisions and the pool
        has room for them. final: no more decisions will come, so a short last slot (batches) is sealed."""
        pool = self.pool
        while True:
            drained = self.submit()
            if not self._inflight:
                return None
            if drained and final:
                pool.seal()
            if pool.ready():
                return self._take_head()
            if not final and self.wants_input:
                return None
            pool.wait()

    def _take_head(self) -> Slot:
        pool = self.pool
        slot = Slot(pool.get(), pool, pool.config, self.meta_fields)
        for d, rejects in zip(slot.decisions, slot.rejects):
            popped = self._inflight.popleft()
            assert popped is d, "the pool returned decisions out of order"
            tokens = d.tokens - (sum(r.tokens for r in rejects) if rejects else 0)
            self.returned["sequences"] += 1
            self.returned["images"] += len(d.items) - len(rejects)
            self.returned["tokens_real"] += tokens
            self.returned["tokens_padding"] += pool.config.seq_len - tokens
            if rejects and self.on_failed is not None:
                self.on_failed(rejects)
        return slot

    def make_room(self) -> Iterator[Slot]:
        """Take slots until every queued decision is submitted (backpressure for pushing callers)."""
        while not self.submit():
            slot = self.take()
            if slot is None:
                return
            yield slot

    def drain(self) -> Iterator[Slot]:
        """Take every pending slot (the end of the input: a short last slot is sealed)."""
        while (slot := self.take(final=True)) is not None:
            yield slot

    def records(self, slots: Iterable[Slot]) -> Iterator[dict[str, Any]]:
        """The records of `slots`, each slot released once its records are copied out."""
        for slot in slots:
            with slot:
                records = slot.records()
            yield from records

    def close(self) -> None:
        self.pool.close()


def pack_images(images: Iterable[Sequence[Any]], config, *, meta_fields: Sequence[str] = (), workers: int = 0,
                epoch: int = 0, max_rejects=None, rejects: Optional[list] = None) -> Iterator[dict[str, Any]]:
    """Pack encoded images in memory, on the pipelines' own path: each is planned from its header, the
    sequences are decided on token counts (PackingCore), then filled and assembled (in this process, or in
    `workers` processes), records yielded in decision order. `images`: tuples (key, bytes[, label[, meta]]).
    A rejected image (header or pixels) is appended to `rejects` as {key, reason, detail} when given."""
    from ._core import PackingCore
    from ._image import ImageRejected
    from ._pool import fill_pool
    from ._transform import plan_header

    core = PackingCore(config, max_rejects=max_rejects)
    note = (lambda key, reason, detail: rejects.append({"key": key, "reason": reason, "detail": detail})) \
        if rejects is not None else (lambda *a: None)

    def failed(fill_rejects: list[FillReject]) -> None:
        core.fill_failed(fill_rejects)
        for r in fill_rejects:
            note(r.key, r.reason, r.detail)

    driver = Driver(fill_pool(config, workers), meta_fields, on_failed=failed)
    try:
        for item in images:
            key, data, *rest = item
            label, meta = (list(rest) + [-1, None][len(rest):])[:2]
            try:
                plan = plan_header(data, key, config, epoch=epoch, images_seen=core.images_seen, label=label, meta=meta)
            except ImageRejected as e:
                core.reject(key, e.reason, e.detail)
                note(key, e.reason, e.detail)
                continue
            driver.put(core.add(plan, payload=data))
            yield from driver.records(driver.make_room())
        driver.put(core.flush())
        yield from driver.records(driver.drain())
    finally:
        driver.close()


def pack_patched(images: Iterable[Any], config, meta_fields: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Pack images already made (prepare_image's PatchedImages, or your own transform's) into records:
    PackingCore decides on their token counts, build_record builds each sequence. Exact fill re-renders
    from the encoded bytes, so it is refused here: use pack_images."""
    from ._core import PackingCore
    from ._record import build_record
    from ._transform import ImagePlan

    if config.fill != "none":
        raise ValueError("exact fill re-renders images from their encoded bytes: use pack_images")
    core = PackingCore(config)
    for im in images:
        plan = ImagePlan(im.key, 0, 0, im.label, im.meta, im.orig_h, im.orig_w, im.grid_h, im.grid_w, im.num_tokens,
                         im.drop_rate)
        for d in core.add(plan, payload=im):
            yield build_record(list(d.payloads), config, meta_fields)
    for d in core.flush():
        yield build_record(list(d.payloads), config, meta_fields)
