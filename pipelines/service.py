"""Scale-out with tf.data service: a dispatcher and workers that run the packing pipeline, and the
dataset graph trainers read from them.

Graph. `service_dataset` is `range(epochs * num_units).batch(group_units).flat_map(pack the group)`:
the source elements are (epoch, unit) indices; index i is unit (i mod U) of epoch i // U, in the
epoch's order (units ordered by stable_hash(unit, f"{seed}/{epoch}/unit"), as in PackedStream). Each
group of up to `group_units` consecutive indices a worker receives is packed on its own by the same
core as PackedStream (packer.PackingCore plans and decides in the tf.data worker's thread; a
packer.Driver over a fill pool of `num_parallel` worker processes fills and assembles; the packer is flushed at the
group's end), so no image is ever split or lost.

Sharding (the `processing_mode` readers pass):
  - "dynamic" (ShardingPolicy.DYNAMIC, the default here): the dispatcher hands the range's elements
    (source units) to the workers one split at a time, so every unit of every epoch goes to exactly one
    worker: each image is packed exactly once per epoch while no worker fails, at most once if one does
    (its unfinished splits are not re-sent, and the job would wait for it for good: read_service's
    watch fails the reader with ServiceWorkerLost instead, see pipelines.service_health). Which worker packs which unit, and so the sequence order,
    depends on timing.
  - "off": every worker runs the whole pipeline, so each image is packed once per worker per epoch
    (identical sequences from every worker; use it only with one worker or to test).
Both are tested with a dispatcher and two workers on 127.0.0.1 (tests/test_service.py).

Processes. from_generator runs Python code, which a tf.data worker can only run in the process that
built the graph. So `navit-pack serve` builds and registers the dataset in the same process as its
workers (register_dataset with a fixed dataset_id), and trainers in other processes read it with
`read_service` (tf.data.experimental.service.from_dataset_id); inside one process, `distribute` works too.
Worker processes started apart from the dispatcher (`navit-pack serve --dispatcher HOST:PORT`) each build
the same graph and register it under the same id: the first registration wins, and the generator it
names is found in every such process under the same name (py_func tokens are numbered in creation order).
Each worker then runs its own process's generator, so every process must pack with the same options. The
dispatcher compares only element specs, so `claim_options` registers a marker dataset whose cardinality is
a fingerprint of the options; a process with other options is refused before its workers join.
"""
from __future__ import annotations

import collections
import functools
import json
import queue
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import packer
from packer import ImageRejected, PackConfig

from . import service_health
from .stream import _epoch_units, _tf_ready, element_spec, resolve_source

SHARDING_MODES = ("dynamic", "off")
DEFAULT_DATASET_ID = "navit-pack"

# Rejected images in this process's service pipelines, by reason (tf.data workers cannot report them
# to the trainer); `navit-pack serve` prints them.
REJECTS: collections.Counter = collections.Counter()
_REJECTS_LOCK = threading.Lock()


class _Pools:
    """Fill pools for the group generators of this process: tf.data may run several at once (one per
    service worker), each takes a pool of its own and gives it back when its group is done."""

    def __init__(self, config: PackConfig, workers: int):
        self.config, self.workers = config, workers
        self._idle: list = []
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return packer.fill_pool(self.config, self.workers)

    def give_back(self, pool) -> None:
        if pool.pending:  # abandoned mid-group: what it holds is stale
            pool.close()
            return
        with self._lock:
            self._idle.append(pool)


def _count_rejects(rejects) -> None:
    with _REJECTS_LOCK:
        REJECTS.update(r.reason for r in rejects)


def _count_reject(reason: str) -> None:
    with _REJECTS_LOCK:
        REJECTS[reason] += 1


def _pack_group(source, units: list[str], config: PackConfig, indices: np.ndarray, *, shuffle: bool,
                meta_fields: Sequence[str], pool, images_per_unit: float,
                max_rejects: "int | float | None" = None) -> Iterator[dict]:
    """Packed records of the units named by `indices` (i -> unit i mod U of epoch i // U), flushed at
    the end: planned and decided here, filled and assembled by `pool`, yielded in decision order."""
    order = functools.lru_cache(maxsize=4)(lambda e: _epoch_units(units, config.seed, e, shuffle))
    core = packer.PackingCore(config, max_rejects=max_rejects)

    def failed(rejects) -> None:
        _count_rejects(rejects)
        core.fill_failed(rejects)

    driver = packer.Driver(pool, meta_fields, on_failed=failed)
    n = 0
    for i in (int(x) for x in indices):
        epoch, pos = divmod(i, len(units))
        for k, rec in enumerate(source.read(order(epoch)[pos])):
            if getattr(rec, "reject", None):
                _count_reject(rec.reject)
                core.reject(rec.key, rec.reject, getattr(rec, "detail", ""))
                continue
            try:
                plan = packer.plan_header(rec.data, rec.key, config, epoch=epoch, images_seen=int(i * images_per_unit) + k,
                                          label=rec.label, meta=rec.meta)
            except ImageRejected as e:
                _count_reject(e.reason)
                core.reject(rec.key, e.reason, e.detail)
                continue
            driver.put(core.add(plan, n, rec.data))
            n += 1
            yield from driver.records(driver.make_room())
    driver.put(core.flush())
    yield from driver.records(driver.drain())
    core.check_budget(final=True)


def service_dataset(source: Any, config: PackConfig, *, epochs: int = 1, group_units: int = 64,
                    shuffle: bool = True, meta_fields: Sequence[str] = (), num_parallel: "int | str | None" = None,
                    images_per_unit: float = 1.0, max_rejects: "int | float | None" = None):
    """The dataset graph tf.data service workers run (see the module docstring for its sharding).

    num_parallel: fill processes per group generator (packer.resolve_workers: "auto"/None every core,
    0 in the tf.data worker's thread). images_per_unit: the drop schedule's images_seen is estimated as
    index * images_per_unit (exact for one-image units such as files in a folder). max_rejects: the reject
    budget of each group (packer.RejectBudget), which fails the reading trainer when exceeded."""
    import tensorflow as tf

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1 for tf.data service, got {epochs!r}")
    if not isinstance(group_units, int) or group_units < 1:
        raise ValueError(f"group_units must be an integer >= 1, got {group_units!r}")
    meta_fields = tuple(meta_fields)
    src = resolve_source(source, meta_fields)
    units = list(src.units())
    if not units:
        raise ValueError("the source has no units")
    packer.RejectBudget(max_rejects)  # checks the spec before any worker runs
    pools = _Pools(config, packer.resolve_workers(num_parallel))
    spec = element_spec(config, meta_fields)

    def generate(indices):
        pool = pools.take()
        try:
            for record in _pack_group(src, units, config, indices, shuffle=shuffle, meta_fields=meta_fields,
                                      pool=pool, images_per_unit=images_per_unit, max_rejects=max_rejects):
                yield _tf_ready(record)
        finally:
            pools.give_back(pool)

    def pack(indices):
        return tf.data.Dataset.from_generator(generate, args=(indices,), output_signature=spec)

    return tf.data.Dataset.range(epochs * len(units)).batch(group_units).flat_map(pack)


def distribute(dataset, service: str, processing_mode: str = "dynamic", job_name: Optional[str] = None):
    """`dataset` read through the tf.data service at `service` (same process as the workers)."""
    import tensorflow as tf

    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=_policy(processing_mode), service=service, job_name=job_name))


def register(dataset, service: str, dataset_id: str = DEFAULT_DATASET_ID) -> str:
    """Register `dataset` with the dispatcher under a fixed id, for readers in other processes."""
    import tensorflow as tf

    return tf.data.experimental.service.register_dataset(service, dataset, dataset_id=dataset_id)


def read_service(service: str, config: PackConfig, *, dataset_id: str = DEFAULT_DATASET_ID,
                 processing_mode: str = "dynamic", meta_fields: Sequence[str] = (), job_name: Optional[str] = None,
                 watch: bool = True):
    """What a trainer calls: the packed records of a registered dataset, from the workers.

    watch (default): when the dispatcher has navit-pack's health registry (pipelines.service_health),
    the records pass through a Python generator that asks it once a second which workers were lost, and
    fails the reader with ServiceWorkerLost, naming the lost workers' addresses, instead of waiting for
    them for good (tf.data carries no Python exception types: iterating the dataset raises
    tf.errors.UnknownError whose message holds "ServiceWorkerLost: ... lost: HOST:PORT ..."). watch=False: the plain tf.data service
    dataset (no Python in the path; a lost worker stalls it)."""
    import tensorflow as tf

    spec = element_spec(config, meta_fields)
    dataset = tf.data.experimental.service.from_dataset_id(
        processing_mode=_policy(processing_mode), service=service, dataset_id=dataset_id,
        element_spec=spec, job_name=job_name)
    where = service_health.registry_address(service) if watch else None
    if where is None:
        return dataset
    return tf.data.Dataset.from_generator(lambda: _watched(dataset, where, service), output_signature=spec)


def _watched(dataset, where: tuple, service: str, poll_s: float = 1.0) -> Iterator:
    """`dataset`'s elements, read by a helper thread, while the registry at `where` lists no lost worker;
    else ServiceWorkerLost naming them. The check runs every poll_s, whether or not elements come."""
    items: queue.Queue = queue.Queue(maxsize=4)
    done = object()
    stop = threading.Event()

    def pull() -> None:
        try:
            for element in dataset:
                while not stop.is_set():
                    try:
                        items.put(element, timeout=poll_s)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            items.put(e)

    threading.Thread(target=pull, name="navit-pack-service-read", daemon=True).start()
    checked = 0.0
    try:
        while True:
            if time.monotonic() - checked >= poll_s:
                lost = service_health.lost(where)
                if lost:
                    names = ", ".join(f"{n} ({s:.0f} s ago)" for n, s in sorted(lost.items()))
                    raise ServiceWorkerLost(
                        f"tf.data service worker(s) of {service} lost: {names}; the units they were "
                        "packing are not re-sent, and the job would wait for them for good (restart the dispatcher and its "
                        "workers to serve again)")
                checked = time.monotonic()
            try:
                element = items.get(timeout=poll_s)
            except queue.Empty:
                continue
            if element is done:
                return
            if isinstance(element, BaseException):
                raise element
            yield element
    finally:
        stop.set()


class ServiceWorkerLost(RuntimeError):
    """A tf.data service worker of the reader's job was lost: its share of the epoch will not come."""


class OptionsMismatch(ValueError):
    """The dispatcher already serves this dataset id with other input or packing options."""


def options_fingerprint(source: Any, config: PackConfig, *, epochs: int, group_units: int,
                        meta_fields: Sequence[str] = ()) -> int:
    """A positive 62-bit number for what every process serving one dataset id must agree on: the packing
    config, epochs, group size, meta fields, and the input's number of units and class names (not its
    paths: hosts may mount the same data at different paths)."""
    src = resolve_source(source, tuple(meta_fields))
    text = json.dumps({"config": config.to_json(), "epochs": epochs, "group_units": group_units,
                       "meta_fields": list(meta_fields), "units": len(src.units()),
                       "class_names": list(src.class_names or ())}, sort_keys=True)
    return packer.stable_hash(text, "serve-options") >> 2


def claim_options(service: str, dataset_id: str, fingerprint: int) -> None:
    """Register the options' fingerprint with the dispatcher at `service` under `{dataset_id}.options`, as
    the cardinality of a marker dataset that is never read: the first process sets it, and one with
    other options gets OptionsMismatch (the dispatcher refuses an id whose cardinality differs)."""
    import tensorflow as tf

    try:
        tf.data.experimental.service.register_dataset(service, tf.data.Dataset.range(fingerprint),
                                                      dataset_id=f"{dataset_id}.options")
    except tf.errors.InvalidArgumentError:
        raise OptionsMismatch(f"the dispatcher {service} already serves dataset id {dataset_id!r} with other input "
                              "or packing options: start every worker process with the same options, or use "
                              "another --dataset-id") from None


def _policy(mode: str):
    import tensorflow as tf

    if mode not in SHARDING_MODES:
        raise ValueError(f"processing_mode must be one of {', '.join(SHARDING_MODES)}, got {mode!r}")
    policy = tf.data.experimental.service.ShardingPolicy
    return policy.DYNAMIC if mode == "dynamic" else policy.OFF


class LocalService:
    """A dispatcher and `num_workers` workers in this process; stop() ends them.

    dispatcher: "HOST:PORT" of a dispatcher started elsewhere (`navit-pack serve --workers 0`) that the
    workers join instead of starting one here; num_workers=0 starts a dispatcher alone. `host` is the
    name the workers give the dispatcher, and through it the trainers, to reach them.
    The servers bind every interface and have no authentication (see docs/streaming.md).

    stop() can block for good: TensorFlow's worker stop waits for its running tasks while holding the
    GIL, and a task running the packing generator (Python) needs the GIL to finish. It is safe once
    every job read from the workers has ended (as in the tests); a process that must end promptly with
    readers still attached exits instead (`navit-pack serve` does), which closes the servers' sockets."""

    def __init__(self, num_workers: int = 2, port: int = 0, host: str = "127.0.0.1",
                 dispatcher: Optional[str] = None, lost_after: float = service_health.DEFAULT_LOST_AFTER):
        import tensorflow as tf

        svc = tf.data.experimental.service
        if num_workers < 0 or (dispatcher and num_workers < 1):
            raise ValueError(f"num_workers must be >= 0 (>= 1 with a dispatcher elsewhere), got {num_workers}")
        self.registry = None
        if dispatcher:
            self.dispatcher = None
        else:
            self.registry = service_health.Registry(lost_after)
            self.dispatcher = svc.DispatchServer(svc.DispatcherConfig(port=port))
        self.dispatcher_address = dispatcher or f"{host}:{self.dispatcher.target.rsplit(':', 1)[1]}"
        self.target = f"grpc://{self.dispatcher_address}"
        if self.registry is not None:
            self.registry.publish(self.target)
        self.workers = [svc.WorkerServer(svc.WorkerConfig(dispatcher_address=self.dispatcher_address,
                                                          worker_address=f"{host}:%port%"))
                        for _ in range(num_workers)]
        self.worker_addresses = [f"{host}:{w._server.bound_port()}" for w in self.workers]  # noqa: SLF001
        # False when the dispatcher elsewhere has no health registry (not started by navit-pack).
        self.reporting = bool(self.workers) and service_health.report(self.target, self.worker_addresses)

    def stop(self) -> None:
        """Stop the workers, then the dispatcher (see the class docstring for when this can block)."""
        for w in self.workers:
            w._stop()  # noqa: SLF001 - the only way TF offers to stop an in-process server
        if self.dispatcher is not None:
            self.dispatcher._stop()  # noqa: SLF001
        if self.registry is not None:
            self.registry.close()

    def __enter__(self) -> "LocalService":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
