"""Fill pools (packer._pool): worker processes fill and assemble decisions in shared memory, in decision order; a dead
worker is replaced and only the image it held is lost (rejected `worker_crashed`); nothing leaks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import packer
from test_core_engine import CONFIGS, make_images, run_core

CONFIG = CONFIGS["uniform-beta"]


@pytest.fixture(scope="module")
def decided():
    images = make_images(80, seed=11)
    images[7] = (images[7][0], images[7][1][:len(images[7][1]) // 2], images[7][2])  # plans, fails to fill
    _, decisions, data = run_core(CONFIG, images)
    return decisions, data


def reference(decisions, data, crashed=None):
    """Records and failed keys filled in this process (the crashed key failing as worker_crashed)."""
    out = []
    for d in decisions:
        filled = []
        for p in d.plans:
            if p.key == crashed:
                filled.append(packer.ImageRejected("worker_crashed", ""))
                continue
            try:
                filled.append(packer.fill_image(data[p.key], p, CONFIG))
            except packer.ImageRejected as e:
                filled.append(e)
        record, rejects = packer._assemble.assemble(d, filled, CONFIG)
        out.append((record, [(r.key, r.reason) for r in rejects]))
    return out


def run_pool(pool, decisions, data):
    """Submit everything (as room allows), return [(record numeric fields, [(key, reason)])] in order."""
    got, queue = [], list(decisions)
    while queue or pool.pending:
        while queue and pool.can_submit(queue[0]):
            d = queue.pop(0)
            pool.submit(d)
        if not queue:
            pool.seal()
        result = pool.get(timeout=60)
        for i, d in enumerate(result.decisions):
            got.append(({k: v[i].copy() for k, v in result.arrays.items()}, [(r.key, r.reason) for r in result.rejects[i]]))
        pool.release()
    return got


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (a, ra), (b, rb) in zip(got, expected):
        assert ra == rb
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("workers,rows", [(0, 1), (1, 1), (3, 1), (2, 5)])
def test_pool_output_is_in_order_and_independent_of_workers(decided, workers, rows):
    decisions, data = decided
    expected = reference(decisions, data)
    assert any(r for _, r in expected)  # the truncated image fails its fill
    with packer.fill_pool(CONFIG, workers, rows_per_slot=rows) as pool:
        assert_same(run_pool(pool, decisions, data), expected)


def test_window_is_bounded(decided):
    decisions, data = decided
    with packer._pool.FillPool(CONFIG, 2, prefetch=1, num_slots=3) as pool:
        n = 0
        while pool.can_submit(decisions[n]):
            pool.submit(decisions[n])
            n += 1
        assert n == 3
        with pytest.raises(packer.WorkerError, match="no room"):
            pool.submit(decisions[n])
        assert pool.get(timeout=60).decisions == [decisions[0]]
        pool.release()
        assert pool.can_submit(decisions[n])


def test_small_ring_wraps_and_large_images_go_inline(decided):
    decisions, data = decided
    biggest = max(len(b) for b in data.values())
    with packer._pool.FillPool(CONFIG, 2, ring_bytes=3 * biggest) as pool:
        assert_same(run_pool(pool, decisions, data), reference(decisions, data))


def test_dead_worker_is_replaced_and_only_its_image_is_lost(decided, monkeypatch):
    decisions, data = decided
    victim = decisions[len(decisions) // 2].plans[0].key
    monkeypatch.setenv(packer._worker.CRASH_KEY_ENV, victim)
    with packer._pool.FillPool(CONFIG, 2) as pool:
        before = set(pool.worker_pids)
        got = run_pool(pool, decisions, data)
        assert pool.crashes == 1
        assert len(set(pool.worker_pids) - before) == 1  # one replaced, the other unchanged
    expected = reference(decisions, data, crashed=victim)
    assert_same(got, expected)
    assert sum(r == [(victim, "worker_crashed")] or (victim, "worker_crashed") in r for _, r in got) == 1


def test_workers_encode_each_row_in_its_on_disk_form(decided):
    """With an encoder the workers hand back each row's shard bytes (what the writer would have encoded);
    a row too large for its room comes back unencoded, for the writer."""
    import schemas

    decisions, data = decided
    encoder = schemas.record_encoder("tfrecord", CONFIG)
    expected = [encoder(packer._assemble.row_record(
        [p for i, p in enumerate(d.plans) if all(r[0] != p.key for r in rejects)], record, CONFIG))
        for d, (record, rejects) in zip(decisions, reference(decisions, data))]
    for rows in (1, 3):
        got = []
        with packer._pool.FillPool(CONFIG, 2, rows_per_slot=rows, encoder=encoder) as pool:
            queue = list(decisions)
            while queue or pool.pending:
                while queue and pool.can_submit(queue[0]):
                    pool.submit(queue.pop(0))
                if not queue:
                    pool.seal()
                result = pool.get(timeout=60)
                got += [bytes(e) for e in result.encoded]
                pool.release()
        assert got == expected

    images = [("k" * 4000 + key, blob, label) for key, blob, label in make_images(3, seed=5)]  # keys past the room
    _, long_keys, long_data = run_core(CONFIG, images)
    with packer._pool.FillPool(CONFIG, 1, encoder=encoder) as pool:
        pool.submit(long_keys[0])
        pool.seal()
        assert pool.get(timeout=60).encoded == [None]
        pool.release()


def kill_slot(pool, slot):
    """SIGKILL worker slot `slot`'s process while it holds no image, and pump until the pool notices."""
    pid = pool._procs[slot].pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pool._procs[slot] is not None and pool._procs[slot].pid == pid:
        assert time.monotonic() < deadline, "the pool never noticed its dead worker"
        pool.wait(0.05)


def test_deaths_count_per_worker_and_the_job_goes_on(decided):
    """Deaths spread over the pool's workers (an OOM killer's sweep) fail nothing; a slot whose processes die
    again and again without filling is retired, named, and the other slot packs everything."""
    decisions, data = decided
    with packer._pool.FillPool(CONFIG, 2) as pool:
        for slot in (0, 1, 0, 1):  # four deaths in a row across the pool, two per slot
            kill_slot(pool, slot)
        assert pool.retired == []
        assert_same(run_pool(pool, decisions, data), reference(decisions, data))  # both slots fill: counts reset
        for _ in range(4):
            kill_slot(pool, 0)
        assert len(pool.retired) == 1 and pool.retired[0].startswith("fill worker 0 ") and len(pool.worker_pids) == 1
        assert_same(run_pool(pool, decisions, data), reference(decisions, data))
        with pytest.raises(packer.WorkerError, match=r"fill worker 0 .*; fill worker 1 "):
            for _ in range(4):
                kill_slot(pool, 1)


def open_fds():
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone once reaped
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def test_close_detaches_workers_for_reuse_and_frees_everything(decided):
    decisions, data = decided
    packer._worker.stop_idle_workers()
    fds = open_fds()
    pool = packer._pool.FillPool(CONFIG, 2)
    pids = pool.worker_pids
    pool.submit(decisions[0])  # closed with a task in flight
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(packer.WorkerError, match="closed"):
        pool.submit(decisions[1])
    other = CONFIGS["exact"]  # another config, another slot layout: the idle workers serve it
    images = make_images(30, seed=5)
    _, other_decisions, other_data = run_core(other, images)
    with packer._pool.FillPool(other, 2, rows_per_slot=3) as again:
        assert sorted(again.worker_pids) == sorted(pids)
        got = run_pool(again, other_decisions, other_data)
    expected = [packer._assemble.assemble(d, [packer.fill_image(other_data[p.key], p, other) for p in d.plans], other)[0]
                for d in other_decisions]
    for (a, _), b in zip(got, expected):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    packer._worker.stop_idle_workers()
    assert all(gone(p) for p in pids)
    assert open_fds() <= fds


PARENT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {paths!r}
    import packer
    from test_core_engine import CONFIGS, make_images, run_core
    config = CONFIGS["uniform-beta"]
    _, decisions, data = run_core(config, make_images(30))
    with packer._pool.FillPool(config, 2) as pool:
        print(*pool.worker_pids, flush=True)
        while True:  # keep the workers busy until interrupted
            for d in decisions[:2]:
                pool.submit(d)
                pool.get(timeout=60)
                pool.release()
""")


@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_workers_end_when_the_parent_is_interrupted_or_killed(how):
    here = os.path.dirname(os.path.abspath(__file__))
    code = PARENT.format(paths=[os.path.dirname(here), here])
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT if how == "interrupt" else signal.SIGKILL)
        proc.wait(30)
        if how == "interrupt":
            assert "KeyboardInterrupt" in proc.stderr.read()
        assert all(gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_pool_collected_in_a_reference_cycle_leaves_the_next_pools_working(decided):
    """A pool garbage-collected unclosed (in a cycle) must not hand its finalized sockets to later pools."""
    import gc

    decisions, data = decided
    for _ in range(2):
        with packer._pool.FillPool(CONFIG, 2):  # idle workers to reuse
            pass
        pool = packer._pool.FillPool(CONFIG, 2)
        pool.submit(decisions[0])
        pool.cycle = pool
        pids = pool.worker_pids
        shared = [pool._ring_fd, pool._out_fd, pool._hb_fd, pool._enc_fd]
        del pool
        gc.collect()
        for fd in shared:  # its shared memory's descriptors are closed
            with pytest.raises(OSError):
                os.fstat(fd)
        assert all(gone(p) for p in pids)  # its workers saw their sockets close and exited
        # The idle workers' sockets are still open. (A comprehension: a loop variable would keep the last
        # idle worker's socket open after the loop, and the next round's collected pool may have taken it.)
        [os.fstat(conn.fileno()) for _, _, conn in packer._worker._IDLE]
        with packer._pool.FillPool(CONFIG, 2) as fresh:
            assert_same(run_pool(fresh, decisions[:6], data), reference(decisions[:6], data))
