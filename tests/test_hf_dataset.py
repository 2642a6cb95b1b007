"""schemas.hf_dataset: a packed dataset as a Hugging Face `datasets.Dataset` whose numpy and torch formats
give the records of schemas.read (patches uint8 [L, D], ids int32, floats float32, strings str)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import schemas

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed")
pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")

from test_readers import every_format  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return every_format(tmp_path_factory, 3, 40, 4)


def as_numpy(value):
    if hasattr(value, "numpy"):  # torch
        return value.numpy()
    if isinstance(value, list):  # torch leaves strings as lists
        return np.array(value, dtype=object)
    return np.asarray(value)


@pytest.mark.parametrize("fmt", sorted(schemas.FORMATS))
def test_numpy_format_gives_the_records_of_read(outputs, fmt):
    records, dirs = outputs
    ds = schemas.hf_dataset(dirs[fmt])
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == len(records)
    assert ds.features["patches"] == datasets.List(datasets.List(datasets.Value("uint8"), length=48), length=48)
    want = list(schemas.read(dirs[fmt]))
    rows = list(ds.with_format("numpy", dtype=None))
    assert len(rows) == len(want)
    for got, ref in zip(rows, want):
        assert sorted(got) == sorted(ref)
        for k, v in ref.items():
            g = as_numpy(got[k])
            assert g.dtype == v.dtype and g.shape == v.shape and np.array_equal(g, v), (k, g.dtype, v.dtype)
    batch = schemas.hf_dataset(dirs[fmt], format="numpy")[:5]
    assert batch["patches"].dtype == np.uint8 and batch["patches"].shape == (5, 48, 48)
    assert batch["segment_ids"].dtype == np.int32 and batch["drop_rates"].dtype == np.float32
    assert np.array_equal(batch["patches"], np.stack([r["patches"] for r in want[:5]]))


def test_plain_numpy_format_widens_integers_as_datasets_does(outputs):
    """datasets' own default (every integer column as int64): same values, so a caller who forgets
    dtype=None gets correct, only wider, arrays."""
    records, dirs = outputs
    row = schemas.hf_dataset(dirs["arrow"]).with_format("numpy")[0]
    assert row["patches"].shape == (48, 48) and np.issubdtype(row["patches"].dtype, np.integer)
    assert np.array_equal(row["patches"], records[0]["patches"])
    assert np.array_equal(row["segment_ids"], records[0]["segment_ids"])


@pytest.mark.parametrize("fmt", ["arrow", "tfrecord"])
def test_torch_format_gives_the_records_of_read(outputs, fmt):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    records, dirs = outputs
    ds = schemas.hf_dataset(dirs[fmt], format="torch")
    row = ds[3]
    assert row["patches"].dtype == torch.uint8 and tuple(row["patches"].shape) == (48, 48)
    assert row["segment_ids"].dtype == torch.int32 and row["drop_rates"].dtype == torch.float32
    for got, ref in zip(ds, schemas.read(dirs[fmt])):
        for k, v in ref.items():
            g = as_numpy(got[k])
            assert g.dtype == v.dtype and np.array_equal(g, v), k
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["patches"].dtype == torch.uint8 and tuple(batch["patches"].shape) == (4, 48, 48)
    shuffled = ds.shuffle(seed=0)  # the format (and its dtype=None) survives datasets' own transforms
    assert shuffled[0]["patches"].dtype == torch.uint8


def test_arrow_shards_are_memory_mapped_not_copied(outputs):
    """For Arrow IPC the Dataset holds the memory-mapped shards retyped in place: building it allocates
    nothing near the size of the patches from pyarrow's memory pool."""
    records, dirs = outputs
    patches = sum(r["patches"].nbytes for r in records)
    before = pa.total_allocated_bytes()
    ds = schemas.hf_dataset(dirs["arrow"])
    assert pa.total_allocated_bytes() - before < patches // 10
    assert ds.with_format("numpy", dtype=None)[len(records) - 1]["patches"].dtype == np.uint8
    before = pa.total_allocated_bytes()
    kept = schemas.hf_dataset(dirs["parquet"])  # decoded: the pool holds the patches
    assert pa.total_allocated_bytes() - before >= patches
    del kept


def test_fingerprint_follows_the_shards(outputs, tmp_path):
    _, dirs = outputs
    assert schemas.hf_dataset(dirs["arrow"])._fingerprint == schemas.hf_dataset(dirs["arrow"])._fingerprint
    assert schemas.hf_dataset(dirs["arrow"])._fingerprint != schemas.hf_dataset(dirs["parquet"])._fingerprint


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "tfrecord"])
def test_damaged_or_missing_shards_raise_corrupt_shard(outputs, tmp_path, fmt):
    _, dirs = outputs
    d = tmp_path / fmt
    shutil.copytree(dirs[fmt], d)
    shard = sorted(p for p in os.listdir(d) if p.startswith("packed-"))[1]
    size = os.path.getsize(d / shard)
    os.truncate(d / shard, size // 2)
    with pytest.raises(schemas.CorruptShard, match=shard):
        schemas.hf_dataset(str(d))
    with pytest.raises(schemas.CorruptShard, match=shard):  # the format's own checks, without the sha256
        schemas.hf_dataset(str(d), check_sha256=False)
    os.remove(d / shard)
    with pytest.raises(schemas.CorruptShard, match=f"{shard}: file is missing"):
        schemas.hf_dataset(str(d), check_sha256=False)


def test_no_manifest_is_refused(tmp_path):
    with pytest.raises(schemas.ManifestMissing):
        schemas.hf_dataset(str(tmp_path))


def test_the_retype_keeps_slices_and_chunks(outputs):
    """patches_as_uint8 on a sliced, multi-chunk table (offsets inside the chunks) gives the same bytes."""
    from schemas import _arrow

    records, dirs = outputs
    m = schemas.read_manifest(dirs["arrow"])
    schema = schemas.Schema.from_manifest(m)
    tables = [pa.ipc.open_file(pa.memory_map(p)).read_all() for p in schemas.shard_paths(dirs["arrow"], m)]
    table = pa.concat_tables(tables).slice(2, len(records) - 5)
    assert table.column("patches").num_chunks > 1 and table.column("patches").chunks[0].offset == 2
    got = _arrow.patches_as_uint8(table, schema).column("patches").to_numpy()
    assert len(got) == len(records) - 5
    for g, r in zip(got, records[2:]):
        assert np.array_equal(np.stack(list(g)), r["patches"])
