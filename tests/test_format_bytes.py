"""Output bytes are pinned: a fixed small dataset written with schemas.write_dataset in each format gives
shards with the sha256 recorded here (recorded from the code before the format registry replaced the
per-format if-chains). A change to any writer, the Arrow schema or the Example encoding fails here.

Records are built from a seeded generator, not by the packer, so a packer change cannot move them.
TFRecord bytes depend on this package alone. Arrow, Parquet and ArrayRecord bytes also carry their
library (Parquet's footer names the pyarrow version; Riegeli's compression is zstd's): those are
checked where the library version is the one the constants were recorded with, and skipped otherwise.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

import conftest

import schemas
from schemas._schema import Schema

CONFIG = {"seq_len": 24, "patch_size": 2, "max_images_per_seq": 3}
META = ("caption",)
WORDS = ["", "a", "nº ✓", "日本", "x" * 40]

# format -> (library and version the bytes were recorded with, sha256 of shards 0 and 1)
PINNED = {
    "tfrecord": (None, ["435d8e897f7fdf815c304d3f8752aebfb40c76e08a5b04574fe130b7a9b3f80a",
                        "cc0fd62941929ac7b73f91d4af0a4f8ca3a3ed96359c90307171b8ac94e65478"]),
    "arrow": (("pyarrow", "25.0.1"), ["ff60d01c4bd2a26bee8108173312dbe5d493eddd1f45e07fb31bdc3d12d422c5",
                                      "01a68916ecddb2db9eb057b73953e638cb9b0ca2476d893eeca1934e5ec78148"]),
    "parquet": (("pyarrow", "25.0.1"), ["1d3a8ca55690de069ec9c3b66620b5403f7b3af2a4ccf08fc6ebe4e2879612ab",
                                        "412451ec85390adecf758bac8ef55d453d0c4b0466359222bc775e8ef7fa4399"]),
    "array_record": (("array_record", "0.8.6"), ["eeea71506f839a3f619c1b946662649fb690b7dcb424f02d16efa91b0c1884d4",
                                                 "48305b5373df43753cc8d0e16bd80b8c73e059e72091e5a761117c22492341e4"]),
}


def fixed_records(n: int = 7) -> list[dict]:
    """Records that fit the schema's dtypes and shapes, with values covering negative ints, multi-byte
    varints, NaN and -0.0 floats, empty and non-ASCII strings (cross-field consistency is not needed to
    write them)."""
    schema = Schema.from_config(CONFIG, META)
    rng = np.random.default_rng(2024)
    return [conftest.random_record(schema, rng, specials=(np.nan, -0.0), words=WORDS, int_bound=2 ** (i * 4))
            for i in range(n)]


def library_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def shard_digests(directory: str) -> list[str]:
    m = schemas.read_manifest(directory)
    digests = []
    for s in m["shards"]:
        with open(os.path.join(directory, s["file"]), "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    assert digests == [s["sha256"] for s in m["shards"]]
    return digests


@pytest.mark.parametrize("fmt", sorted(PINNED))
def test_shard_bytes_are_unchanged(tmp_path, fmt):
    library, want = PINNED[fmt]
    if library is not None:
        name, pinned_version = library
        pytest.importorskip(name)
        have = library_version(name.replace("_", "-"))
        if pinned_version is not None and have != pinned_version:
            pytest.skip(f"{fmt} bytes were recorded with {name} {pinned_version}; {have} is installed")
    d = tmp_path / fmt
    schemas.write_dataset(d, fixed_records(), config=CONFIG, fmt=fmt, num_shards=2, meta_fields=META)
    assert shard_digests(str(d)) == want


@pytest.mark.parametrize("fmt", sorted(PINNED))
def test_the_fixed_records_read_back(tmp_path, fmt):
    """The fixture is a real dataset: every format reads it back as written (so a pinned digest is of
    records the readers accept, not of bytes nobody can read)."""
    if fmt != "tfrecord":
        pytest.importorskip(PINNED[fmt][0][0])
    d = tmp_path / fmt
    want = fixed_records()
    schemas.write_dataset(d, want, config=CONFIG, fmt=fmt, num_shards=2, meta_fields=META)
    got = list(schemas.read(str(d)))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for k, v in b.items():
            assert a[k].dtype == v.dtype and a[k].shape == v.shape, k
            assert np.array_equal(a[k], v, equal_nan=v.dtype.kind == "f"), k


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_records_encoded_in_place_equal_their_bytes(fmt):
    """RecordEncoder.into (what fill workers run, into their shared slot) writes the encoder's own bytes
    for each fixed record, and touches nothing past them; with one byte too few room it writes nothing
    and says -1."""
    encoder = schemas.record_encoder(fmt, CONFIG, META)
    for record in fixed_records():
        want = encoder(record)
        out = np.full(len(want) + 8, 0xAB, np.uint8)
        assert encoder.into(record, out) == len(want)
        assert out[:len(want)].tobytes() == want and (out[len(want):] == 0xAB).all()
        short = np.full(len(want) - 1, 0xAB, np.uint8)
        assert encoder.into(record, short) == -1 and (short == 0xAB).all()


@pytest.mark.parametrize("size", [0, 3, 64, 65, 300])
def test_packed_varints_equal_protobufs_rule_at_every_size(size):
    """The packed int64 varints of an int32 field, against protobuf's rule written out (7 bits a byte,
    negatives as their 64-bit two's complement): the per-image path (<= 64 values) and the array path,
    for values of one byte, around 127 / 128 / 255, and multi-byte or negative ones."""
    from schemas._tfrecord import _varints

    def rule(n: int) -> bytes:
        n &= (1 << 64) - 1
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    rng = np.random.default_rng(size)
    for values in (rng.integers(0, 128, size), rng.integers(120, 256, size), rng.integers(-3, 200, size),
                   rng.integers(-2 ** 31, 2 ** 31, size), np.full(size, 127), np.full(size, 128)):
        arr = values.astype(np.int32)
        assert _varints(arr) == b"".join(rule(int(v)) for v in arr), values[:8]
