"""PackedStream: exact resume, per-epoch reshuffle, rejects and their budget, tf.data shapes."""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

import packer
from pipelines import stream as stream_mod
from pipelines.stream import PackedStream, RejectBudgetExceeded, StreamError


@dataclasses.dataclass
class Rec:
    key: str
    data: bytes
    label: "int | None" = None
    meta: dict = dataclasses.field(default_factory=dict)


class ListSource:
    """A tiny in-test Source: units of a few records each (so offsets inside units matter)."""

    def __init__(self, records, per_unit=3):
        self._units = {f"unit-{i:03d}": records[i * per_unit:(i + 1) * per_unit]
                       for i in range((len(records) + per_unit - 1) // per_unit)}
        self.reads = 0

    def units(self):
        return list(self._units)

    def read(self, unit):
        self.reads += 1
        yield from self._units[unit]

    def __iter__(self):
        for u in self.units():
            yield from self.read(u)


def jpeg(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_records(n=30, bad=()):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        h, w = int(rng.integers(16, 90)), int(rng.integers(16, 90))
        data = b"not an image" if i in bad else jpeg(h, w, i)
        out.append(Rec(f"img{i:03d}.jpg", data, label=i % 5, meta={"caption": f"c{i}"}))
    return out


CONFIG = packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:16:64", token_drop="beta:0.3:0.6",
                           max_images_per_seq=6, window=8, seed=3)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("k", [0, 1, 6, 8, 17])  # 6, 8: images pending in the packer
@pytest.mark.parametrize("num_parallel", [0, 3])
def test_resume_at_k_matches_uninterrupted(k, num_parallel):
    recs = make_records(20, bad={5})
    kwargs = dict(epochs=None, meta_fields=("caption",), shuffle_block=7)
    full = PackedStream(ListSource(recs), CONFIG, num_parallel=num_parallel, **kwargs)
    expected = take(full, k + 8)
    first = PackedStream(ListSource(recs), CONFIG, num_parallel=num_parallel, **kwargs)
    take(first, k)
    saved = json.loads(json.dumps(first.state()))  # must survive JSON
    first.close()
    # Every object rebuilt fresh: new records, new source, new config object.
    config = packer.PackConfig(**json.loads(json.dumps(CONFIG.to_json())))
    resumed = PackedStream(ListSource(make_records(20, bad={5})), config, num_parallel=num_parallel, state=saved, **kwargs)
    got = take(resumed, 8)
    for a, b in zip(got, expected[k:]):
        assert_same(a, b)
    assert resumed.stats["sequences"] == k + 8
    assert resumed.rejects == full.rejects  # both have seen epoch 0's bad image by now


def test_resume_spans_epoch_boundaries_and_finite_end():
    recs = make_records(12)
    full = list(PackedStream(ListSource(recs), CONFIG, epochs=3, num_parallel=0))
    seen = collections.Counter(str(k) for r in full for k in r["image_keys"][: int(r["num_images"])])
    assert set(seen.values()) == {3} and len(seen) == 12  # each image exactly once per epoch, end flushed
    for k in range(len(full) + 1):
        s = PackedStream(ListSource(recs), CONFIG, epochs=3, num_parallel=0)
        take(s, k)
        resumed = PackedStream(ListSource(recs), CONFIG, epochs=3, num_parallel=2, state=s.state())
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            assert_same(a, b)


def test_parallelism_does_not_change_output():
    recs = make_records(25, bad={3, 11})
    a = list(PackedStream(ListSource(recs), CONFIG, epochs=2, num_parallel=0))
    b = list(PackedStream(ListSource(recs), CONFIG, epochs=2, num_parallel=4))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_same(x, y)


def epoch_orders(recs, epochs, seed=3):
    """Image keys in the order the stream reads them, per epoch (one image per sequence, in order)."""
    config = dataclasses.replace(CONFIG, seed=seed, max_images_per_seq=1, packer="next-fit")
    keys = [str(r["image_keys"][0]) for r in PackedStream(ListSource(recs), config, epochs=epochs, num_parallel=0,
                                                         shuffle_block=5)]
    n = len(recs)
    return [keys[i * n:(i + 1) * n] for i in range(epochs)]


def test_epochs_reshuffle_deterministically():
    recs = make_records(15)
    orders = epoch_orders(recs, 3)
    assert all(sorted(o) == sorted(r.key for r in recs) for o in orders)  # a permutation each epoch
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders == epoch_orders(recs, 3)  # a pure function of the seed
    assert epoch_orders(recs, 1, seed=4)[0] != orders[0]


def test_resolution_and_drop_are_per_epoch_and_schedule_advances():
    recs = make_records(10)
    config = dataclasses.replace(CONFIG, token_drop="const:0.5@sigmoid:0.1:0.7:15:-2", max_images_per_seq=1,
                                 packer="next-fit", resolution="uniform:32:64")
    out = list(PackedStream(ListSource(recs), config, epochs=3, num_parallel=0))
    by_key = collections.defaultdict(list)
    for r in out:
        by_key[str(r["image_keys"][0])].append((int(r["grid_h"][0]), int(r["grid_w"][0]), float(r["drop_rates"][0])))
    assert any(len(set(g[:2] for g in v)) > 1 for v in by_key.values())  # resolution redrawn per epoch
    rates = [float(r["drop_rates"][0]) for r in out]
    assert np.mean(rates[:10]) > np.mean(rates[-10:]) + 0.2  # decreasing schedule over images seen
    data = {r.key: r for r in recs}
    for i, r in enumerate(out):  # sequence i holds the i-th image read: images_seen = i, epoch = i // 10
        im = packer.unpack(r)[0]
        src = data[im.key]
        ref = packer.prepare_image(src.data, src.key, config, epoch=i // 10, images_seen=i, label=src.label)
        np.testing.assert_array_equal(im.patches, ref.patches)
        assert im.drop_rate == pytest.approx(ref.drop_rate)


def test_rejects_are_skipped_and_counted():
    recs = make_records(20, bad={2, 9})
    recs[14] = Rec("empty.jpg", b"")
    s = PackedStream(ListSource(recs), CONFIG, epochs=2, num_parallel=2)
    out = list(s)
    keys = collections.Counter(str(k) for r in out for k in r["image_keys"][: int(r["num_images"])])
    assert len(keys) == 17 and set(keys.values()) == {2}
    assert s.rejects == {"undecodable": 4, "empty": 2}
    assert s.stats["images_rejected"] == 6 and s.stats["images_seen"] == 40
    assert {e["key"] for e in s.reject_examples} == {"img002.jpg", "img009.jpg", "empty.jpg"}


def test_reject_budget_raises_typed_error():
    recs = make_records(20, bad={2, 9, 13})
    with pytest.raises(RejectBudgetExceeded, match="3 of .* rejected.*max_rejects=2") as e:
        list(PackedStream(ListSource(recs), CONFIG, epochs=1, max_rejects=2, num_parallel=0))
    assert e.value.counts == {"undecodable": 3}
    assert len(list(PackedStream(ListSource(recs), CONFIG, epochs=1, max_rejects=3, num_parallel=0))) > 0
    with pytest.raises(RejectBudgetExceeded):  # 3/20 = 15% > 10%, checked at the epoch end
        list(PackedStream(ListSource(recs), CONFIG, epochs=1, max_rejects=0.1, num_parallel=0))
    assert list(PackedStream(ListSource(recs), CONFIG, epochs=1, max_rejects=0.2, num_parallel=0))


def test_all_rejected_or_empty_source_fails_instead_of_spinning():
    with pytest.raises(StreamError, match="rejected"):
        next(PackedStream(ListSource([Rec("a", b"x"), Rec("b", b"")]), CONFIG, num_parallel=0))
    with pytest.raises(StreamError, match="no records"):
        next(PackedStream(ListSource([]), CONFIG, num_parallel=0))


def test_state_from_other_config_is_refused():
    s = PackedStream(ListSource(make_records(6)), CONFIG, num_parallel=0)
    next(s)
    with pytest.raises(StreamError, match="seed") as err:
        PackedStream(ListSource(make_records(6)), dataclasses.replace(CONFIG, seed=9), num_parallel=0, state=s.state())
    assert str(err.value) == f"state was saved with another config: seed={CONFIG.seed!r} (this stream: 9)"  # only what differs


def test_tf_dataset_static_shapes_and_same_records():
    tf = pytest.importorskip("tensorflow")
    recs = make_records(12)
    ds = stream_mod.as_tf_dataset(ListSource(recs), CONFIG, epochs=1, meta_fields=("caption",), num_parallel=2)
    L, D, E = CONFIG.seq_len, CONFIG.token_dim, CONFIG.max_images_per_seq
    spec = ds.element_spec
    assert spec["patches"].shape == (L, D) and spec["patches"].dtype == tf.uint8
    assert spec["segment_ids"].shape == (L,) and spec["num_images"].shape == ()
    assert spec["image_keys"].shape == (E,) and spec["image_keys"].dtype == tf.string
    assert spec["meta_caption"].shape == (E,)
    batched = ds.batch(2, drop_remainder=True)
    assert batched.element_spec["patches"].shape == (2, L, D)
    expected = list(PackedStream(ListSource(recs), CONFIG, epochs=1, meta_fields=("caption",), num_parallel=0))
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g["patches"], e["patches"])
        assert [k.decode() for k in g["image_keys"]] == list(e["image_keys"])
        assert [k.decode() for k in g["meta_caption"]] == list(e["meta_caption"])


def test_state_stays_small_on_a_large_folder(tmp_path):
    """The state names units and images by index, never by content or file lists."""
    from pipelines.sources import open_source

    sizes = [(h, w) for h in (48, 120, 300, 500) for w in (64, 200, 375, 512)]
    blobs = [jpeg(h, w, i) if i < 4 else None for i, (h, w) in enumerate(sizes)]
    solid = {}
    for i, (h, w) in enumerate(sizes):  # cheap to decode: flat colour
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (i * 10, 80, 160)).save(buf, "JPEG")
        solid[i] = buf.getvalue()
    for i in range(10_000):
        folder = tmp_path / f"n{i % 10:08d}"
        folder.mkdir(exist_ok=True)
        (folder / f"n{i % 10:08d}_{i:06d}_a_long_file_name.JPEG").write_bytes(blobs[i % 16] or solid[i % 16])
    config = packer.PackConfig(resolution="uniform:64:256")  # default window (1024), L=256
    assert config.window == 1024
    spec = str(tmp_path)
    stream = PackedStream(open_source(spec), config, num_parallel=0)
    first = take(stream, 3)
    state = stream.state()
    size = len(json.dumps(state))
    stats = stream.stats
    assert stats["images_pending"] > 500  # a full window is waiting, so the bound is tested
    assert size < 64_000, size
    assert stats["sequences"] == 3 and stats["sequences_pending"] >= 1
    assert stats["images_seen"] == stats["images_packed"] + stats["images_rejected"] + stats["images_pending"]
    expected = take(stream, 4)
    resumed = PackedStream(open_source(spec), config, num_parallel=0, state=json.loads(json.dumps(state)))
    for a, b in zip(take(resumed, 4), expected):
        assert_same(a, b)
    assert first


@pytest.mark.parametrize("num_parallel", [0, 2])
def test_batches_are_the_records_stacked_and_resume(num_parallel):
    recs = make_records(30, bad={4})
    kwargs = dict(epochs=2, meta_fields=("caption",), shuffle_block=7)
    records = list(PackedStream(ListSource(recs), CONFIG, num_parallel=0, **kwargs))
    stream = PackedStream(ListSource(recs), CONFIG, num_parallel=num_parallel, **kwargs)
    batches = stream.batches(4)
    got = [next(batches) for _ in range(3)]
    saved = json.loads(json.dumps(stream.state()))
    got += list(batches)
    stream.close()
    assert [len(b["num_images"]) for b in got[:-1]] == [4] * (len(got) - 1) and 1 <= len(got[-1]["num_images"]) <= 4
    stacked = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    assert len(stacked["num_images"]) == len(records)
    for i, r in enumerate(records):
        assert_same({k: stacked[k][i] for k in r}, {k: np.asarray(v) for k, v in r.items()})
    with PackedStream(ListSource(recs), CONFIG, num_parallel=num_parallel, state=saved, **kwargs) as resumed:
        # copy=False: views valid until the next batch is requested, so copy them here
        rest = [{k: v.copy() for k, v in b.items()} for b in resumed.batches(4, copy=False, drop_remainder=True)]
    assert len(rest) == (len(records) - 12) // 4
    for b, expected in zip(rest, got[3:]):
        assert_same(b, expected)
    with pytest.raises(StreamError, match="mixed"):
        s = PackedStream(ListSource(recs), CONFIG, num_parallel=0, **kwargs)
        next(s.batches(2))
        next(s)


def test_resume_with_exact_fill_and_decided_sequences_in_flight():
    recs = make_records(40)
    config = dataclasses.replace(CONFIG, fill="exact", window=12)
    full = list(PackedStream(ListSource(recs), config, epochs=1, num_parallel=0))
    assert all(int((r["segment_ids"] > 0).sum()) == config.seq_len for r in full[:-1])
    for k in (1, 4):
        s = PackedStream(ListSource(recs), config, epochs=1, num_parallel=0)
        take(s, k)
        state = json.loads(json.dumps(s.state()))
        assert any(len(entry) > 4 for group in state["queued"] for entry in group)  # a re-planned image waits
        rest = list(PackedStream(ListSource(recs), config, epochs=1, num_parallel=2, state=state))
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            assert_same(a, b)


def test_crashed_worker_loses_only_its_image(monkeypatch):
    recs = make_records(20)
    expected = list(PackedStream(ListSource(recs), CONFIG, epochs=1, num_parallel=0))
    monkeypatch.setenv(packer._worker.CRASH_KEY_ENV, "img006.jpg")
    s = PackedStream(ListSource(recs), CONFIG, epochs=1, num_parallel=2)
    got = list(s)
    s.close()
    assert s.rejects == {"worker_crashed": 1}
    assert [e["key"] for e in s.reject_examples] == ["img006.jpg"]
    assert s.stats["images_packed"] == 19 and s.stats["images_rejected"] == 1
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        keys = [str(k) for k in b["image_keys"][: int(b["num_images"])]]
        if "img006.jpg" in keys:
            b = packer.build_record([im for im in packer.unpack(b) if im.key != "img006.jpg"], CONFIG)
            a = {k: a[k] for k in b}
        assert_same(a, b)


def test_batches_larger_than_the_input_ring_do_not_stall(monkeypatch):
    """A batch slot whose images' bytes exceed the workers' input ring: the ring is freed as rows are
    filled, so the stream waits instead of failing ("no room") or deadlocking on its own open slot."""
    recs = make_records(60)
    ring = sum(len(r.data) for r in recs) // 6  # far less than one batch of 16 sequences needs
    monkeypatch.setattr(packer, "fill_pool", functools.partial(packer._pool.fill_pool, ring_bytes=ring))
    expected = list(PackedStream(ListSource(recs), CONFIG, epochs=1, num_parallel=0))
    with PackedStream(ListSource(recs), CONFIG, epochs=1, num_parallel=2) as stream:
        got = list(stream.batches(16))
    stacked = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    assert len(stacked["num_images"]) == len(expected)
    for i, r in enumerate(expected):
        assert_same({k: stacked[k][i] for k in r}, {k: np.asarray(v) for k, v in r.items()})


def _batches(stream, n=None):
    return [{k: np.array(v) for k, v in b.items()} for b in itertools.islice(stream.batches(2), n)]


def test_a_folder_is_planned_in_a_child_process_with_the_same_output(tmp_path):
    """With fill workers, a folder's headers are read and planned in a child process a chunk ahead
    (_Planner): the same batches and stats as planning in this process; killed midway, the stream plans
    here from where it was, nothing lost or repeated; its errors are raised here."""
    from conftest import image_folder

    spec = image_folder(tmp_path / "imgs", 40, classes=["a", "b", "c"], seed=4)
    config = packer.PackConfig(seq_len=128, resolution="uniform:32:96", token_drop="beta:0.25:0.5", window=8)
    epochs = 3 * stream_mod._PLANNER_CHUNK // 40  # three chunks: the last is asked for long after the kill
    with PackedStream(spec, config, epochs=epochs, shuffle_block=16, num_parallel=0) as here:
        expected, stats = _batches(here), here.stats
    with PackedStream(spec, config, epochs=epochs, shuffle_block=16, num_parallel=1) as child:
        got = _batches(child, 5)
        assert isinstance(child._reader, stream_mod._Planner)
        child._reader._proc.kill()  # a chunk or more is planned ahead and lost with it
        got += _batches(child)
        assert not isinstance(child._reader, stream_mod._Planner) and child.stats == stats
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for k in (1, 7):  # resumed from a state saved mid-stream, planning in a child again: the same batches
        with PackedStream(spec, config, epochs=epochs, shuffle_block=16, num_parallel=1) as first:
            head = _batches(first, k)
            state = json.loads(json.dumps(first.state()))
        with PackedStream(spec, config, epochs=epochs, shuffle_block=16, num_parallel=1, state=state) as resumed:
            rest = _batches(resumed, 6)
            assert isinstance(resumed._reader, stream_mod._Planner)
        for a, b in zip(head + rest, expected):
            assert all(np.array_equal(a[f], b[f]) for f in a)
    class NoProcess(stream_mod._Planner):
        def __init__(self, args):
            raise OSError(11, "Resource temporarily unavailable")

    with pytest.MonkeyPatch.context() as mp:  # no process to be had: planned here, the same batches
        mp.setattr(stream_mod, "_Planner", NoProcess)
        with PackedStream(spec, config, epochs=epochs, shuffle_block=16, num_parallel=1) as here_too:
            again = _batches(here_too, 9)
    assert all(np.array_equal(a[f], b[f]) for a, b in zip(again, expected) for f in a)
    broken = stream_mod._Planner(("not a source",) + (None,) * 9)
    with pytest.raises(Exception) as raised:
        next(broken)
    assert not isinstance(raised.value, stream_mod._PlannerLost) and broken._proc.poll() is not None
