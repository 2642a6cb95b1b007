"""verify() and `navit-pack verify`: a flipped byte or a truncation anywhere in a shard, a missing shard
or a manifest that disagrees is reported naming the shard; readers raise instead of returning bad data."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import packer
import schemas
from pipelines import cli
from test_readers import small_records

FORMATS = ["tfrecord", "arrow", "parquet", "array_record"]
RUN = "t0"  # the run id the clean datasets are written under
BAD = f"packed-{RUN}-00001-of-00002"
CLEAN: dict[str, str] = {}  # format -> the undamaged dataset (set by the `clean` fixture)


@pytest.fixture(scope="module")
def packed():
    return small_records(24, seed=1)


@pytest.fixture(scope="module")
def clean(packed, tmp_path_factory):
    config, records = packed
    dirs = {}
    for fmt in FORMATS:
        d = str(tmp_path_factory.mktemp(f"clean-{fmt}"))
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=2, meta_fields=("id",), run_id=RUN)
        dirs[fmt] = d
    CLEAN.update(dirs)
    return dirs


def copy_of(clean, fmt, tmp_path):
    d = str(tmp_path / fmt)
    shutil.copytree(clean[fmt], d)
    return d, os.path.join(d, f"{BAD}.{fmt}")


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def offsets(path):
    size = os.path.getsize(path)
    return [0, 7, size // 3, size // 2, size - 9, size - 1]


def check_detected(d, fmt):
    """Every reader path with its defaults refuses the damaged shard: verify, schemas.read, tf_dataset."""
    import tensorflow as tf

    with pytest.raises(schemas.VerificationError) as e:
        schemas.verify(d)
    assert e.value.shards == [f"{BAD}.{fmt}"] and BAD in str(e.value)
    with pytest.raises(schemas.CorruptShard, match=BAD) as e:
        list(schemas.read(d))
    assert e.value.shard == f"{BAD}.{fmt}"
    try:
        got = list(schemas.tf_dataset(d))
    except (schemas.CorruptShard, tf.errors.OpError):  # TF wraps errors raised inside its pipeline
        return
    # Not raised: only possible for a format whose reader checks every byte it decodes (the damage was
    # in ArrayRecord block padding); the records must then be exactly the clean ones.
    assert fmt == "array_record", f"tf_dataset read a damaged {fmt} shard without an error"
    want = list(schemas.tf_dataset(CLEAN[fmt]))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in b), "damage came back as wrong data"


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_output_verifies(packed, clean, fmt):
    _, records = packed
    report = schemas.verify(clean[fmt])
    assert (report.format, report.num_shards, report.num_sequences) == (fmt, 2, len(records))
    assert report.num_images == 24 and report.warnings == ()
    assert report.tokens_real == sum(int((r["segment_ids"] > 0).sum()) for r in records)


@pytest.mark.parametrize("damage", [flip, truncate], ids=["flipped byte", "truncation"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_damage_detected_at_any_offset(clean, tmp_path, fmt, damage):
    for i, off in enumerate(offsets(os.path.join(clean[fmt], f"{BAD}.{fmt}"))):
        d, path = copy_of(clean, fmt, tmp_path / str(i))
        damage(path, off)
        check_detected(d, fmt)


def rehash(d, path):
    """Make the manifest agree with a damaged shard, so only the format's own checks can catch it."""
    m = schemas.read_manifest(d)
    for s in m["shards"]:
        if s["file"] == os.path.basename(path):
            s["sha256"] = schemas._io.sha256_file(path)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tfrecord_crcs_catch_damage_without_the_sha256(clean, tmp_path, damage):
    import tensorflow as tf

    for i, off in enumerate(offsets(os.path.join(clean["tfrecord"], f"{BAD}.tfrecord"))[1:]):
        d, path = copy_of(clean, "tfrecord", tmp_path / str(i))
        flip(path, off) if damage == "flip" else truncate(path, off)
        rehash(d, path)
        check_detected(d, "tfrecord")
        with pytest.raises(schemas.CorruptShard, match=BAD):
            list(schemas.read(d, check_sha256=False))
        with pytest.raises((tf.errors.DataLossError, tf.errors.InvalidArgumentError), match="corrupt|truncated"):
            list(schemas.tf_dataset(d))


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_arrow_truncation_caught_without_the_sha256(clean, tmp_path, fmt):
    size = os.path.getsize(os.path.join(clean[fmt], f"{BAD}.{fmt}"))
    for i, off in enumerate([size // 2, size - 9]):
        d, path = copy_of(clean, fmt, tmp_path / str(i))
        truncate(path, off)
        rehash(d, path)
        check_detected(d, fmt)


def test_array_record_damage_caught_without_the_sha256(clean, tmp_path):
    """Riegeli chunk hashes catch a flipped byte in data or index, and a truncated file loses its footer, so
    even with check_sha256=False a read either raises CorruptShard or returns exactly the clean records
    (flips in never-decoded block padding are harmless; only the sha256 sees them)."""
    import tensorflow as tf

    src = os.path.join(clean["array_record"], f"{BAD}.array_record")
    want = list(schemas.read(clean["array_record"]))
    data = np.frombuffer(open(src, "rb").read(), np.uint8)
    used = np.flatnonzero(data)  # chunk headers, records, index; the rest is zero block padding
    must = [int(used[len(used) * q // 8]) for q in (1, 3, 5)]  # inside record chunks
    spread = [int(o) for o in np.linspace(0, data.size - 1, 40)] + [int(o) for o in used[:: max(1, used.size // 40)]]
    for i, off in enumerate(must + spread):
        d, path = copy_of(clean, "array_record", tmp_path / f"flip{i}")
        flip(path, off)
        rehash(d, path)
        try:
            got = list(schemas.read(d, check_sha256=False))
        except schemas.CorruptShard as e:
            assert e.shard == f"{BAD}.array_record"
            continue
        assert off not in must, f"flip at {off} not detected"
        for a, b in zip(got, want, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in b), f"flip at {off} changed a record silently"
    for i, off in enumerate(offsets(src)):
        d, path = copy_of(clean, "array_record", tmp_path / f"cut{i}")
        truncate(path, off)
        rehash(d, path)
        check_detected(d, "array_record")
        with pytest.raises(schemas.CorruptShard, match=BAD):
            list(schemas.read(d, check_sha256=False))
        with pytest.raises(tf.errors.OpError, match=BAD):
            list(schemas.tf_dataset(d))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_shard_and_wrong_counts(clean, tmp_path, fmt):
    d, path = copy_of(clean, fmt, tmp_path / "missing")
    os.remove(path)
    check_detected(d, fmt)
    d, path = copy_of(clean, fmt, tmp_path / "count")
    m = schemas.read_manifest(d)
    m["shards"][1]["num_sequences"] += 1
    m["num_sequences"] += 1
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(m, f)
    check_detected(d, fmt)
    import tensorflow as tf

    with pytest.raises(tf.errors.OpError, match=BAD):
        list(schemas.tf_dataset(d))


def test_inconsistent_record_is_reported(packed, tmp_path):
    config, records = packed
    bad = {k: np.array(v, copy=True) for k, v in records[0].items()}
    bad["num_tokens"][0] += 1
    d = str(tmp_path)
    shards = [schemas.write_shard(d, i, 2, "arrow", recs, seq_len=48, token_dim=48, max_images_per_seq=4,
                                  meta_fields=("id",), run_id=RUN)
              for i, recs in enumerate([records[1:], [bad]])]
    schemas.write_manifest(d, fmt="arrow", config=config, num_images_in=0, num_images_packed=0, num_rejected=0,
                           num_sequences=len(records), tokens_real=0, tokens_padding=0, shards=shards)
    with pytest.raises(schemas.VerificationError, match="num_tokens disagrees") as e:
        schemas.verify(d)
    assert e.value.shards == [f"{BAD}.arrow"]


def test_leftover_temporary_file_is_a_warning(clean, tmp_path):
    d, _ = copy_of(clean, "arrow", tmp_path)
    open(os.path.join(d, f".packed-{RUN}-00000-of-00002.arrow.abc.tmp"), "w").close()
    assert any("temporary" in w for w in schemas.verify(d).warnings)


def test_cli_exit_codes(clean, tmp_path, capsys):
    assert cli.main(["verify", clean["parquet"]]) == 0
    assert "OK" in capsys.readouterr().out
    d, path = copy_of(clean, "parquet", tmp_path / "bad")
    flip(path, os.path.getsize(path) // 2)
    assert cli.main(["verify", d]) == 1
    assert f"{BAD}.parquet" in capsys.readouterr().err
    assert cli.main(["verify", "--quick", d]) == 1
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify", str(empty)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("navit-pack: error: ") and "manifest" in err


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """One shard per format of several MiB (12 sequences of 1024 tokens x 768 bytes of patches, random
    pixels: nothing compresses), so damage can sit past the first MiB."""
    rng = np.random.default_rng(5)
    config = packer.PackConfig(seq_len=1024, patch_size=16, max_images_per_seq=8, resolution="native")
    images = []
    for i in range(48):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
        images.append(packer.prepare_image(buf.getvalue(), f"{i}.png", config, label=i))
    records = list(packer.pack_patched(images, config, ()))
    dirs = {}
    for fmt in FORMATS:
        d = str(tmp_path_factory.mktemp(f"big-{fmt}"))
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=1, run_id=RUN)
        dirs[fmt] = d
    return dirs


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_deep_inside_a_multi_mib_shard_fails_read_and_verify(big_shards, tmp_path, fmt):
    name = f"packed-{RUN}-00000-of-00001.{fmt}"
    size = os.path.getsize(os.path.join(big_shards[fmt], name))
    assert size > 8 << 20, size
    schemas.verify(big_shards[fmt])  # clean, it reads
    for i, off in enumerate([(1 << 20) + 4097, size // 2 + 13, size - (1 << 20) - 5]):  # all past the first MiB
        d = str(tmp_path / str(i))
        shutil.copytree(big_shards[fmt], d)
        flip(os.path.join(d, name), off)
        with pytest.raises(schemas.VerificationError) as e:
            schemas.verify(d)
        assert e.value.shards == [name], off
        with pytest.raises(schemas.CorruptShard, match=name):
            list(schemas.read(d))
        if fmt == "tfrecord":  # without the sha256 the CRCs see it too
            with pytest.raises(schemas.CorruptShard, match="CRC32C"):
                list(schemas.read(d, check_sha256=False))
