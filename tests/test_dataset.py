"""Random access and split reading: schemas.PackedDataset (Arrow, ArrayRecord) equals schemas.read record
for record, checks shards on open, pickles without its readers and feeds DataLoader workers, samplers of
two ranks and Grain; read / tf_dataset with shard_index / shard_count split the records disjointly and
completely (contiguous ranges), opening only the files that hold the reader's share."""
from __future__ import annotations

import os
import pickle
import shutil
import sys

import numpy as np
import pytest

import schemas
from schemas._split import file_ranges

sys.path.insert(0, os.path.dirname(__file__))
from test_readers import small_records  # noqa: E402

RANDOM_ACCESS = ["arrow", "array_record"]
NUM_SHARDS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(records in read order, {format: dataset dir}): 21 sequences in 4 shards (5, 5, 5, 6) of every format."""
    config, records = small_records(n_images=60, seq_len=40)
    dirs = {}
    for fmt in schemas.FORMATS:
        d = tmp_path_factory.mktemp(fmt)
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=NUM_SHARDS, meta_fields=("id",))
        dirs[fmt] = str(d)
    assert len(records) % 2 == 1, "an odd count, so that DistributedSampler pads"
    return list(schemas.read(dirs["arrow"])), dirs


def assert_same_record(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert type(g) is type(w) and g.dtype == w.dtype and g.shape == w.shape, (k, type(g), g.dtype, g.shape)
        assert np.array_equal(g, w), k


def key(record: dict) -> tuple:
    """A record's identity: the keys of its images (each image is packed once)."""
    return tuple(record["image_keys"][: int(record["num_images"])])


def flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


# PackedDataset


@pytest.mark.parametrize("fmt", RANDOM_ACCESS)
def test_every_index_equals_read(data, fmt):
    records, dirs = data
    ds = schemas.PackedDataset(dirs[fmt])
    want = list(schemas.read(dirs[fmt]))
    assert len(ds) == len(want) == len(records)
    for i in np.random.default_rng(0).permutation(len(ds)):
        assert_same_record(ds[i], want[i])
        assert_same_record(ds[int(i) - len(ds)], want[i])  # negative indices, as a list
    for bad in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds["0"]
    got = ds[3:11:2]
    assert len(got) == 4 and all(np.array_equal(g["patches"], want[i]["patches"]) for g, i in zip(got, range(3, 11, 2)))


@pytest.mark.parametrize("fmt", ["tfrecord", "parquet"])
def test_formats_without_random_access_are_refused(data, fmt):
    with pytest.raises(schemas.NoRandomAccess) as e:
        schemas.PackedDataset(data[1][fmt])
    message = str(e.value)
    assert isinstance(e.value, schemas.SchemaError) and isinstance(e.value, ValueError)
    assert "\n" not in message and fmt in message and "arrow" in message and "array_record" in message


@pytest.mark.parametrize("fmt", RANDOM_ACCESS)
def test_a_flipped_byte_is_refused_on_open(data, fmt, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(data[1][fmt], d)
    victim = schemas.read_manifest(d)["shards"][2]["file"]
    flip(os.path.join(d, victim))
    with pytest.raises(schemas.CorruptShard, match=victim.replace(".", r"\.") + ".*sha256"):
        schemas.PackedDataset(d)


@pytest.mark.parametrize("fmt", RANDOM_ACCESS)
def test_pickles_without_readers_and_notices_a_shard_changed_since_the_check(data, fmt, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(data[1][fmt], d)
    ds = schemas.PackedDataset(d)
    blob = pickle.dumps(ds)
    assert len(blob) < 2048, len(blob)  # names and counts, no mapped or decoded data
    again = pickle.loads(blob)
    assert len(again) == len(ds)
    assert_same_record(again[-1], ds[-1])
    shard = os.path.join(d, schemas.read_manifest(d)["shards"][0]["file"])
    fresh = pickle.loads(blob)  # as a worker process would receive it, before it opens anything
    shutil.copyfile(shard, shard + ".new")
    os.replace(shard + ".new", shard)  # same bytes, another file: not the one that was hashed
    with pytest.raises(schemas.CorruptShard, match="replaced or modified"):
        fresh[0]


def test_a_forked_worker_reopens_the_shards_and_checks_them(data, tmp_path):
    """A forked DataLoader worker inherits the parent's open readers; it must open its own (and so notice a
    shard replaced since the parent opened it) rather than keep reading the old file through them."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    d = str(tmp_path / "copy")
    shutil.copytree(data[1]["arrow"], d)
    ds = schemas.PackedDataset(d)  # opens every shard in this process
    shard = os.path.join(d, schemas.read_manifest(d)["shards"][0]["file"])
    shutil.copyfile(shard, shard + ".new")
    os.replace(shard + ".new", shard)
    assert_same_record(ds[0], data[0][0])  # this process still reads the file it opened and checked
    with pytest.raises(Exception, match="replaced or modified"):
        list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list, multiprocessing_context="fork"))


def test_records_across_many_batches_of_a_shard(tmp_path):
    """Arrow shards hold batches of 64 records: indices on and around the batch edges."""
    config, records = small_records(n_images=60, seq_len=40)
    many = []
    for i in range(150):
        r = {k: v.copy() for k, v in records[i % len(records)].items()}
        r["patches"][0, :2] = (i // 256, i % 256)  # every record distinct
        many.append(r)
    for fmt in RANDOM_ACCESS:
        d = tmp_path / fmt
        schemas.write_dataset(d, many, config=config, fmt=fmt, num_shards=2, meta_fields=("id",))
        ds = schemas.PackedDataset(d)
        want = list(schemas.read(d))
        for i in (0, 63, 64, 65, 74, 75, 76, 127, 128, 139, 140, 149, -1):
            assert_same_record(ds[i], want[i])


@pytest.mark.parametrize("fmt", RANDOM_ACCESS)
def test_thread_pool_reads_equal_read(data, fmt):
    from concurrent.futures import ThreadPoolExecutor

    records, dirs = data
    ds = pickle.loads(pickle.dumps(schemas.PackedDataset(dirs[fmt])))  # readers opened by the threads
    order = list(np.random.default_rng(1).permutation(len(ds))) * 3
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ds.__getitem__, order))
    for i, r in zip(order, got):
        assert_same_record(r, records[i])


@pytest.mark.parametrize("fmt, start", [("arrow", "spawn"), ("array_record", "fork")])
def test_dataloader_with_two_workers(data, fmt, start):
    """spawn: the workers get the dataset pickled; fork: a copy holding the parent's readers, which it
    must not use (it reopens its own)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    records, dirs = data
    loader = DataLoader(schemas.PackedDataset(dirs[fmt]), batch_size=3, num_workers=2, collate_fn=list,
                        multiprocessing_context=start)
    got = [r for batch in loader for r in batch]
    assert len(got) == len(records)
    for g, w in zip(got, records):
        assert_same_record(g, w)
    assert torch.from_numpy(got[0]["patches"]).dtype == torch.uint8



def test_distributed_sampler_two_ranks_cover_every_record(data):
    """DistributedSampler pads with repeated indices (drop_last=False) or drops the tail (drop_last=True);
    a strided index list per rank is exact. Each rank reads through its own DataLoader."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader, DistributedSampler

    records, dirs = data
    ds = schemas.PackedDataset(dirs["arrow"])
    n = len(ds)
    want = [key(r) for r in records]

    def seen(sampler) -> list[tuple]:
        return [key(r) for batch in DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=list) for r in batch]

    padded = [seen(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False, drop_last=False)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == (n + 1) // 2
    assert set(padded[0]) | set(padded[1]) == set(want)
    assert len(padded[0] + padded[1]) - n == 1 and padded[1][-1] == want[0]  # the padding: record 0 again

    dropped = [seen(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False, drop_last=True)) for r in range(2)]
    assert not set(dropped[0]) & set(dropped[1]) and len(dropped[0] + dropped[1]) == n - 1

    exact = [seen(list(range(r, n, 2))) for r in range(2)]
    assert not set(exact[0]) & set(exact[1]) and sorted(exact[0] + exact[1]) == sorted(want)

    shuffled = [seen(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True))
                for r in range(2)]
    assert not set(shuffled[0]) & set(shuffled[1]) and shuffled[0] + shuffled[1] != dropped[0] + dropped[1]


@pytest.mark.parametrize("fmt", RANDOM_ACCESS)
def test_grain_map_dataset_source(data, fmt):
    grain = pytest.importorskip("grain", reason="grain is not installed (optional)")
    records, dirs = data
    source = grain.MapDataset.source(schemas.PackedDataset(dirs[fmt]))
    assert len(source) == len(records)
    for g, w in zip(source, records):
        assert_same_record(g, w)
    shuffled = [key(r) for r in source.shuffle(seed=0)]
    assert sorted(shuffled) == sorted(key(r) for r in records) and shuffled != [key(r) for r in records]
    ranks = [[key(r) for r in source[r::2]] for r in range(2)]  # grain's own per-process slicing
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0] + ranks[1]) == len(records)


# read / tf_dataset with shard_index / shard_count


@pytest.mark.parametrize("fmt", sorted(schemas.FORMATS))
def test_read_shares_are_contiguous_disjoint_and_complete(data, fmt):
    records, dirs = data
    whole = list(schemas.read(dirs[fmt]))
    assert [key(r) for r in whole] == [key(r) for r in records]
    for count in (1, 2, 3, 5, len(records) + 2):
        shares = [list(schemas.read(dirs[fmt], shard_index=k, shard_count=count)) for k in range(count)]
        assert [key(r) for s in shares for r in s] == [key(r) for r in whole], count
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for g, w in zip(schemas.read(dirs[fmt], shard_index=0, shard_count=1), whole):
        assert_same_record(g, w)


@pytest.mark.parametrize("fmt", ["tfrecord", "arrow"])
def test_read_opens_only_the_files_of_its_share(data, fmt, tmp_path):
    """With the first file damaged, the readers whose share lies in other files read as before; the one
    whose share touches it fails, naming it."""
    records, dirs = data
    d = str(tmp_path / "copy")
    shutil.copytree(dirs[fmt], d)
    shards = schemas.read_manifest(d)["shards"]
    flip(os.path.join(d, shards[0]["file"]))
    count = 4  # 21 records in files of 5, 5, 5, 6: reader 0 (records 0-4) touches file 0 only
    assert [f for f, _, _ in file_ranges([s["num_sequences"] for s in shards], 0, count)] == [0]
    for k in range(1, count):
        assert len(list(schemas.read(d, shard_index=k, shard_count=count))) in (5, 6)
    with pytest.raises(schemas.CorruptShard, match=shards[0]["file"].replace(".", r"\.")):
        list(schemas.read(d, shard_index=0, shard_count=count))


def test_file_ranges_give_empty_files_to_reader_zero():
    assert file_ranges([3, 0, 4], 0, 1) == [(0, 0, 3), (1, 0, 0), (2, 0, 4)]
    assert file_ranges([3, 0, 4], 0, 2) == [(0, 0, 3), (1, 0, 0)]
    assert file_ranges([3, 0, 4], 1, 2) == [(2, 0, 4)]
    assert file_ranges([3, 0, 4], 2, 5) == [(0, 2, 3), (2, 0, 1)]
    assert file_ranges([3], 0, 5) == [] and file_ranges([3], 4, 5) == [(0, 2, 3)]


BAD_ARGS = [(0, 0), (2, 2), (-1, 2), (0, 1.0), (True, 2), ("0", 2), (0, None)]


@pytest.mark.parametrize("shard_index, shard_count", BAD_ARGS)
def test_bad_shard_arguments_are_refused(data, shard_index, shard_count):
    with pytest.raises(schemas.ShardArgumentError, match="shard_(index|count)") as e:
        schemas.read(data[1]["arrow"], shard_index=shard_index, shard_count=shard_count)
    assert isinstance(e.value, ValueError)


def test_tf_dataset_shares_are_disjoint_and_complete(data):
    pytest.importorskip("tensorflow")
    records, dirs = data
    want = sorted(key(r) for r in records)

    def keys(ds) -> list[tuple]:
        return [tuple(k.decode() for k in r["image_keys"][: int(r["num_images"])]) for r in ds.as_numpy_iterator()]

    for fmt in sorted(schemas.FORMATS):
        whole = keys(schemas.tf_dataset(dirs[fmt]))
        assert keys(schemas.tf_dataset(dirs[fmt], shard_index=0, shard_count=1)) == whole
        for count in (2, 3):
            shares = [keys(schemas.tf_dataset(dirs[fmt], shard_index=k, shard_count=count)) for k in range(count)]
            assert sorted(k for s in shares for k in s) == want, (fmt, count)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            # the same contiguous share as schemas.read, whatever order the interleave gives
            assert sorted(shares[1]) == sorted(key(r) for r in schemas.read(dirs[fmt], shard_index=1, shard_count=count))
    for shard_index, shard_count in BAD_ARGS[:3]:
        with pytest.raises(schemas.ShardArgumentError):
            schemas.tf_dataset(dirs["arrow"], shard_index=shard_index, shard_count=shard_count)


@pytest.mark.parametrize("sampler", ["distributed", "exact"])
def test_ddp_reader_example_two_ranks(sampler):
    """examples/ddp_reader_torch.py with two gloo ranks: the DistributedSampler pads (equal steps, the
    padding seen twice); the exact sampler sees every record once."""
    pytest.importorskip("torch")
    from test_examples_ranks import REPO, free_port, report_of, run_ranks

    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", PYTHONPATH=str(REPO))
    script = [sys.executable, str(REPO / "examples" / "ddp_reader_torch.py"), "--sampler", sampler, "--workers", "1"]
    report = report_of(run_ranks([script] * 2, [dict(base, RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)]))
    n = report["records"]
    assert n % 2 == 1, report  # odd (17), so that the padding shows
    if sampler == "distributed":
        assert report["steps"][0] == report["steps"][1] and report["seen"] == n + 1 and report["distinct"] == n
    else:
        assert report["seen"] == report["distinct"] == n
