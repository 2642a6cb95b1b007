"""A small health channel for tf.data service workers, so that a lost worker fails its trainers
instead of stalling them.

Why: with tf.data service a reader waits for every worker of its job; when one dies (kill -9, an OOM
kill, a host gone) the reader waits for it for good, and the splits (source units) it was packing are
lost (dynamic sharding is at most once). tf.data tells the reader nothing, so navit-pack adds this:

- `Registry`, in the dispatcher's process: a TCP listener (any free port, every interface, like the
  tf.data servers). Its port is published as the cardinality of a marker dataset registered with the
  dispatcher under HEALTH_ID, so workers and readers find it from the dispatcher's address alone.
- `report(dispatcher, names)`, in each worker process: one connection to the registry that names the
  process's tf.data worker addresses and sends a heartbeat byte every HEARTBEAT_S seconds. The
  registry marks the names lost when the connection closes (the process died: at once) or stays silent
  for `lost_after` seconds (frozen, or its host unreachable), and remembers them while it lives: the
  dispatcher keeps giving new jobs tasks on a dead worker (seen for 75 s and more with
  worker_timeout_ms=5000), so a later reader would stall too. A worker process that comes back on the
  same address clears its names.
- `lost(dispatcher)`, in readers: the names the registry lists as lost (pipelines.service.read_service
  asks once a second and fails the reader with ServiceWorkerLost).

Protocol: a worker sends "worker NAME[,NAME...]\\n" then one "\\n" per heartbeat; a reader sends
"lost\\n" and reads one JSON line {name: seconds since lost}. Anyone who can reach the port can list
names or mark fake ones lost (which fails readers); the tf.data ports it sits next to give far more
(see docs/streaming.md).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Optional

HEALTH_ID = "navit-pack.health"  # marker dataset id; its cardinality is the registry's port
HEARTBEAT_S = 1.0
DEFAULT_LOST_AFTER = 30.0  # seconds of silence after which a worker is lost


class Registry:
    """Which worker processes are connected, and which were lost (and when); see the module doc."""

    def __init__(self, lost_after: float = DEFAULT_LOST_AFTER):
        if lost_after < 2 * HEARTBEAT_S:
            raise ValueError(f"lost_after must be >= {2 * HEARTBEAT_S:g} s, got {lost_after!r}")
        self.lost_after = lost_after
        self._lost: dict[str, float] = {}  # name -> monotonic time it was lost
        self._lock = threading.Lock()
        self._sock = socket.create_server(("", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, name="navit-pack-health", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.lost_after)
            reader = conn.makefile("rb")
            try:
                first = reader.readline(4096).decode("utf-8", "replace").strip()
            except OSError:
                return
            if first == "lost":
                with conn.makefile("wb") as out:
                    out.write((json.dumps(self.lost()) + "\n").encode())
                return
            if not first.startswith("worker "):
                return
            names = [n for n in first[len("worker "):].split(",") if n]
            with self._lock:
                for n in names:
                    self._lost.pop(n, None)  # back again (a restarted process on the same address)
            try:
                while reader.readline(16):  # a heartbeat; b"" when the connection closes
                    pass
            except OSError:  # silent for lost_after seconds (socket.timeout), or reset
                pass
            with self._lock:
                for n in names:
                    self._lost[n] = time.monotonic()

    def lost(self) -> dict[str, float]:
        """{name: seconds since it was lost}."""
        now = time.monotonic()
        with self._lock:
            return {n: round(now - t, 1) for n, t in self._lost.items()}

    def publish(self, service: str) -> None:
        """Register the marker dataset that names this registry's port with the dispatcher at `service`."""
        import tensorflow as tf

        tf.data.experimental.service.register_dataset(service, tf.data.Dataset.range(self.port), dataset_id=HEALTH_ID)

    def close(self) -> None:
        self._sock.close()


def registry_address(dispatcher: str) -> Optional[tuple[str, int]]:
    """(host, port) of the registry of the dispatcher at "HOST:PORT" (or grpc://HOST:PORT), or None when
    that dispatcher has none (not started by navit-pack)."""
    from tensorflow.python.data.experimental.service import _pywrap_server_lib  # the metadata call from_dataset_id makes

    address = dispatcher.split("://", 1)[-1]
    try:
        metadata = _pywrap_server_lib.TF_DATA_GetDataServiceMetadataByID(HEALTH_ID, address, "grpc")
    except RuntimeError:  # no such dataset id
        return None
    return address.rsplit(":", 1)[0], int(metadata.cardinality)


def report(dispatcher: str, names: list[str]) -> bool:
    """Connect this process's worker `names` to the registry of `dispatcher` and heartbeat from a daemon
    thread until the process ends; False when the dispatcher has no registry."""
    where = registry_address(dispatcher)
    if where is None:
        return False
    conn = socket.create_connection(where, timeout=10)
    conn.sendall(("worker " + ",".join(names) + "\n").encode())

    def beat() -> None:
        try:
            while True:
                time.sleep(HEARTBEAT_S)
                conn.sendall(b"\n")
        except OSError:  # the registry is gone: its dispatcher is too
            pass

    threading.Thread(target=beat, name="navit-pack-heartbeat", daemon=True).start()
    return True


def lost(where: tuple[str, int], timeout: float = 5.0) -> dict[str, float]:
    """{worker name: seconds since lost} from the registry at `where`."""
    with socket.create_connection(where, timeout=timeout) as conn:
        conn.sendall(b"lost\n")
        return json.loads(conn.makefile("rb").readline())
