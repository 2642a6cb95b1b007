"""The plan / decide / fill / assemble core (packer._transform, _core, _assemble, _driver): plans predict the
filled token count exactly, the pipelines' path packs what the in-memory reference packs, decisions are
deterministic and resumable, and a failed fill leaves its slot as padding and is counted."""
from __future__ import annotations

import dataclasses
import io
import os
import json

import numpy as np
import pytest
from PIL import Image

import packer

CONFIGS = {
    "uniform-beta": packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:16:64", token_drop="beta:0.3:0.6",
                                      max_images_per_seq=6, window=8, seed=3),
    "native-resdep": packer.PackConfig(seq_len=128, patch_size=8, resolution="native", token_drop="resdep:0.1:0.5",
                                       max_tokens_per_image=100, window=16),
    "schedule": packer.PackConfig(seq_len=64, patch_size=8, resolution="tnormal:16:64:0:0.5:area",
                                  token_drop="const:0.5@sigmoid:0.1:0.7:15:-2", window=8, seed=1),
    "budget-none": packer.PackConfig(seq_len=64, patch_size=8, resolution="budget:40", packer="next-fit"),
    "exact": packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:16:64", token_drop="beta:0.3:0.6",
                               fill="exact", window=8, seed=5),
    "exact-none": packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:16:64", fill="exact", window=8),
    "exact-bfd": packer.PackConfig(seq_len=96, patch_size=8, resolution="budget:48", token_drop="const:0.2",
                                   fill="exact", packer="bfd"),
}


def encode(h, w, seed, fmt="JPEG", mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_images(n, seed=0):
    """(key, bytes, label): varied sizes, aspect ratios, formats and modes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(8, 120)), int(rng.integers(8, 120))
        fmt, mode = [("JPEG", "RGB"), ("PNG", "RGBA"), ("JPEG", "L"), ("PNG", "P")][i % 4]
        out.append((f"img{i:03d}", encode(h, w, seed * 1000 + i, fmt, mode), i % 7))
    return out


def run_core(config, images, epoch=0, core=None):
    """Plan every image, decide; returns (core, decisions)."""
    core = core or packer.PackingCore(config)
    data = {k: d for k, d, _ in images}
    decisions = []
    for key, d, label in images:
        plan = packer.plan_header(d, key, config, epoch=epoch, images_seen=core.images_seen, label=label)
        decisions += core.add(plan, provenance=key, payload=d)
    decisions += core.flush()
    return core, decisions, data


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_token_count_equals_filled_token_count(name):
    config = CONFIGS[name]
    images = make_images(60, seed=len(name))
    core, decisions, data = run_core(config, images, epoch=1)
    assert sorted(k for d in decisions for k in d.provenances) == sorted(k for k, _, _ in images)
    for d in decisions:
        filled = [packer.fill_image(data[p.key], p, config) for p in d.plans]
        assert [im.num_tokens for im in filled] == [p.final_tokens for p in d.plans]
        assert [(im.grid_h, im.grid_w) for im in filled] == [p.final_grid for p in d.plans]
        record, rejects = packer._assemble.assemble(d, filled, config)
        assert not rejects
        assert int((record["segment_ids"] > 0).sum()) == d.tokens <= config.seq_len
    if config.fill == "exact":
        assert core.stats["images_refit"] > 0
        assert all(d.tokens == config.seq_len for d in decisions[:-1])


@pytest.mark.parametrize("name", ["uniform-beta", "schedule"])
def test_pipelines_path_packs_what_the_in_memory_reference_packs(name):
    """pack_images (plan_header, the core's decisions, the driver filling from the bytes, assemble: the
    pipelines' path) gives the records of prepare_image + the core + build_record (the reference)."""
    config = CONFIGS[name]
    images = make_images(50, seed=3)
    got = list(packer.pack_images(images, config, epoch=2))
    prepared = [packer.prepare_image(d, key, config, epoch=2, images_seen=i, label=label)
                for i, (key, d, label) in enumerate(images)]
    expected = list(packer.pack_patched(prepared, config))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k


@pytest.mark.parametrize("name", ["exact", "exact-bfd"])
def test_pack_images_in_workers_and_in_process_agree(name):
    """Exact fill re-renders from the bytes: the same records in this process and in worker processes."""
    config = CONFIGS[name]
    images = make_images(50, seed=3)
    a = list(packer.pack_images(images, config, epoch=2))
    b = list(packer.pack_images(images, config, epoch=2, workers=2))
    assert len(a) == len(b) and all(len(r["segment_ids"]) == config.seq_len for r in a)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_prepare_image_is_plan_then_fill():
    config = CONFIGS["schedule"]
    for key, d, label in make_images(12, seed=9):
        plan = packer.plan_header(d, key, config, epoch=3, images_seen=40, label=label, meta={"m": 1})
        a = packer.fill_image(d, plan, config)
        b = packer.prepare_image(d, key, config, epoch=3, images_seen=40, label=label, meta={"m": 1})
        np.testing.assert_array_equal(a.patches, b.patches)
        np.testing.assert_array_equal(a.pos_y, b.pos_y)
        assert (a.grid_h, a.grid_w, a.drop_rate, a.label, a.meta) == (b.grid_h, b.grid_w, b.drop_rate, b.label, b.meta)


def test_plan_reads_the_header_only_and_rejects_bad_input():
    config = CONFIGS["uniform-beta"]
    d = encode(40, 30, 1)
    truncated = d[:len(d) // 2]  # header intact, half the pixels missing
    plan = packer.plan_header(truncated, "t", config)
    assert (plan.orig_h, plan.orig_w) == (40, 30)
    with pytest.raises(packer.ImageRejected) as e:
        packer.fill_image(truncated, plan, config)
    assert e.value.reason == "undecodable"
    for data, label, reason in ((b"", -1, "empty"), (b"junk", -1, "undecodable"), (d, 1.5, "bad_label")):
        with pytest.raises(packer.ImageRejected) as e:
            packer.plan_header(data, "x", config, label=label)
        assert e.value.reason == reason
    with pytest.raises(packer.ImageRejected) as e:
        packer.plan_header(d, "x", dataclasses.replace(config, max_pixels=100))
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(packer.ImageRejected) as e:
        packer.fill_image(encode(41, 30, 1), plan, config)
    assert e.value.reason == "changed"


def test_decisions_are_deterministic_and_resume_exactly():
    config = CONFIGS["exact"]
    images = make_images(70, seed=4)
    _, full, data = run_core(config, images)
    assert [d.items for d in full] == [d.items for d in run_core(config, images)[1]]
    for cut in (5, 33, 50):
        core = packer.PackingCore(config)
        got = []
        for key, d, label in images[:cut]:
            got += core.add(packer.plan_header(d, key, config, images_seen=core.images_seen, label=label), provenance=key)
        state = json.loads(json.dumps(core.state()))
        by_key = {k: (d, lab) for k, d, lab in images}
        replans = []
        for key in packer.PackingCore.pending_provenance(state):  # re-plan from the provenance (the key here)
            index = next(i for i, im in enumerate(images) if im[0] == key)
            replans.append(packer.plan_header(by_key[key][0], key, config, images_seen=index, label=by_key[key][1]))
        resumed = packer.PackingCore(config)
        resumed.restore(state, replans)
        for key, d, label in images[cut:]:
            got += resumed.add(packer.plan_header(d, key, config, images_seen=resumed.images_seen, label=label), provenance=key)
        got += resumed.flush()
        assert [d.items for d in got] == [d.items for d in full]
        assert [d.seq for d in got] == list(range(len(full)))


def test_failed_fill_slot_becomes_padding_and_is_counted():
    config = CONFIGS["uniform-beta"]
    core, decisions, data = run_core(config, make_images(40, seed=2))
    d = next(d for d in decisions if len(d.items) >= 3)
    before = dict(core.stats)
    filled = [packer.fill_image(data[p.key], p, config) for p in d.plans]
    failed = packer.ImageRejected("worker_crashed", "the worker process died")
    filled[1] = failed
    record, rejects = packer._assemble.assemble(d, filled, config)
    assert [(r.slot, r.key, r.reason) for r in rejects] == [(1, d.plans[1].key, "worker_crashed")]
    rest = [im for i, im in enumerate(filled) if i != 1]
    expected = packer.build_record(rest, config)  # the remaining images, in order, renumbered 1..k
    for k in expected:
        np.testing.assert_array_equal(record[k], expected[k], err_msg=k)
    assert int(record["num_images"]) == len(d.items) - 1
    assert int((record["segment_ids"] == 0).sum()) == config.seq_len - d.tokens + d.plans[1].final_tokens
    core.fill_failed(rejects)
    assert core.reject_counts == {"worker_crashed": 1}
    assert core.stats["images"] == before["images"] - 1 and core.stats["fill_failed"] == 1
    assert core.stats["tokens_padding"] == before["tokens_padding"] + d.plans[1].final_tokens
    assert core.images_seen == 40  # already counted when planned
    every = packer._assemble.assemble(d, [failed] * len(d.items), config)[0]  # all failed: all padding
    assert int(every["num_images"]) == 0 and not every["segment_ids"].any() and not every["patches"].any()


def test_reject_budget_and_duplicates():
    config = CONFIGS["uniform-beta"]
    core = packer.PackingCore(config, max_rejects=1, unique_keys=True)
    plan = packer.plan_header(encode(20, 20, 0), "a", config)
    core.add(plan, "p0")
    core.add(plan, "p1")  # duplicate key
    assert core.reject_counts == {"duplicate_key": 1} and core.images_seen == 2
    with pytest.raises(packer.RejectBudgetExceeded, match="2 of 3 images rejected") as e:
        core.reject("b", "undecodable", "broken")
    assert e.value.counts == {"duplicate_key": 1, "undecodable": 1}
    frac = packer.PackingCore(config, max_rejects=0.1)
    for _ in range(5):
        frac.reject("x", "empty")  # under FRACTION_MIN_IMAGES images: only checked when final
    with pytest.raises(packer.RejectBudgetExceeded):
        frac.check_budget(final=True)
    with pytest.raises(ValueError):
        packer.PackingCore(config, max_rejects=1.5)


def test_assemble_refuses_a_fill_that_does_not_match_its_plan():
    config = CONFIGS["uniform-beta"]
    _, decisions, data = run_core(config, make_images(20))
    d = decisions[0]
    filled = [packer.fill_image(data[p.key], p, config) for p in d.plans]
    filled[0] = dataclasses.replace(filled[0], patches=filled[0].patches[:-1], pos_y=filled[0].pos_y[:-1],
                                    pos_x=filled[0].pos_x[:-1]) if filled[0].num_tokens > 1 else \
        dataclasses.replace(filled[0], patches=np.concatenate([filled[0].patches] * 2))
    with pytest.raises(ValueError, match="plan has"):
        packer._assemble.assemble(d, filled, config)


def jpeg_variants():
    """JPEGs a fast header reader could get wrong: orientations, progressive, grey, CMYK, XMP, 2 EXIF blocks."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(30, 50), (64, 17), (9, 9)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for orientation in range(0, 10):
            exif = Image.Exif()
            if orientation:
                exif[0x0112] = orientation
            for kw in ({}, {"progressive": True}):
                buf = io.BytesIO()
                img.save(buf, "JPEG", exif=exif.tobytes(), **kw)
                out.append((f"o{orientation}-{i}-{len(kw)}", buf.getvalue()))
        for mode in ("L", "CMYK"):
            buf = io.BytesIO()
            img.convert(mode).save(buf, "JPEG")
            out.append((f"{mode}-{i}", buf.getvalue()))
        plain = out[-2][1]
        for name, xmp in xmp_variants():
            for o in (0, 3, 9):  # without an EXIF orientation, with one, with an out-of-range one
                exif = Image.Exif()
                if o:
                    exif[0x0112] = o
                buf = io.BytesIO()
                img.save(buf, "JPEG", xmp=xmp, exif=exif.tobytes())
                out.append((f"xmp-{name}-o{o}-{i}", buf.getvalue()))
        xmp = b"http://ns.adobe.com/xap/1.0/\x00" + b'<a tiff:Orientation="6"/>'
        segment = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
        big = out[-3][1]  # "big" without an EXIF orientation: its block, the last, counts
        out.append((f"two-xmp-{i}", big[:2] + segment + big[2:]))
        exif6 = Image.Exif()
        exif6[0x0112] = 6
        app1 = b"Exif\x00\x00" + exif6.tobytes()[6:] if exif6.tobytes().startswith(b"Exif") else b"Exif\x00\x00" + exif6.tobytes()
        segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
        out.append((f"two-exif-{i}", plain[:2] + segment + segment + plain[2:]))
        out.append((f"after-sof-{i}", plain[:-2] + b"\xff\xd9"))
    return out


def xmp_variants() -> list[tuple[str, bytes]]:
    """XMP packets: Pillow takes the orientation from the first tiff:Orientation="d" or >d< of the last block."""
    return [("attr6", b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
            ("elem8", b"<x:xmpmeta><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>"),
            ("attr0", b'<x:xmpmeta tiff:Orientation="0"/>'), ("attr9", b'<x:xmpmeta tiff:Orientation="9"/>'),
            ("two", b'<a tiff:Orientation="5"/><b tiff:Orientation="2"/>'), ("none", b"<x:xmpmeta><a b='c'/></x:xmpmeta>"),
            ("spaced", b'<a tiff:Orientation = "6"/>'), ("big", b"<x:xmpmeta>" + b" " * 9000 + b'<a tiff:Orientation="7"/>')]


def test_fast_jpeg_header_agrees_with_pillow(monkeypatch, tmp_path):
    from packer import _image
    from packer._image import _orientation, jpeg_header

    monkeypatch.setattr(_image, "_FILE_CHUNK", 64)  # a file's header read in pieces (EXIF, XMP past the first read)

    fast = 0
    config = CONFIGS["uniform-beta"]
    for key, data in jpeg_variants():
        with Image.open(io.BytesIO(data)) as img:  # Pillow alone, as ImageOps.exif_transpose turns it
            orientation = _orientation(img)
            w, h = img.size
        height, width = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
        head = jpeg_header(data)
        if head is not None:
            fast += 1
            assert (head.height, head.width, head.orientation) == (height, width, orientation), key
        elif key.startswith("xmp"):
            pytest.fail(f"{key}: XMP is read by the fast path")
        from_file, _ = _image.read_header_file(io.BytesIO(data), len(data), 10**9)
        assert (from_file.height, from_file.width, from_file.orientation) == (height, width, orientation), key
        (tmp_path / "x.jpg").write_bytes(data)
        fd = os.open(tmp_path / "x.jpg", os.O_RDONLY)
        try:  # a file descriptor, read with pread
            from_fd, whole = _image.read_header_file(fd, len(data), 10**9)
        finally:
            os.close(fd)
        assert (from_fd.height, from_fd.width, from_fd.orientation) == (height, width, orientation), key
        assert whole is None if head is not None else whole == data
        plan = packer.plan_header(data, key, config)
        assert (plan.orig_h, plan.orig_w) == (height, width), key
        assert packer.fill_image(data, plan, config).num_tokens == plan.num_tokens
    assert fast >= 130  # most take the fast path
    for bad in (b"\xff\xd8", b"\xff\xd8\xff\xc0\x00\x11" + b"\x00" * 4, b"GIF89a", b"\xff\xd8\xff\xe1\xff\xff"):
        assert jpeg_header(bad) is None
