"""Exact-fill packing (fill="exact"): every sequence but the stream's last is exactly full; re-planned
images keep their aspect ratio (within the planner's rounding) and the policy's ranges; unpacking is
still exact; fill="none" output is unchanged."""
import hashlib
import io
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

import packer
from packer._image import OpenedImage

IMAGENET_DEV = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-dev"


def imagenet_like_sizes(n, seed=0):
    """Synthetic (h, w) with ImageNet's shape mix: mostly 4:3 landscape, some portrait, square, 3:2."""
    rng = np.random.default_rng(seed)
    aspect = rng.choice([4 / 3, 3 / 4, 1.0, 3 / 2, 2 / 3], n, p=[.5, .15, .1, .15, .1]) * np.exp(rng.normal(0, .05, n))
    long = rng.uniform(150, 500, n)
    h = np.where(aspect >= 1, long / aspect, long).astype(int)
    w = np.where(aspect >= 1, long, long * aspect).astype(int)
    return [(int(a), int(b)) for a, b in zip(h, w)]


def grid_reachable(h, w, gh, gw, patch, smin, smax):
    """Whether grid_for_scale's rounding gives (gh, gw) for some scale in [smin, smax] (exact interval test)."""
    lo, hi = smin, smax
    for side, g in ((h, gh), (w, gw)):
        lo = max(lo, 0.0 if g == 1 else (g - 0.5) * patch / side)
        hi = min(hi, (g + 0.5) * patch / side)
    return lo <= hi


def run_lengths(config, sizes):
    grids = [packer._plan.plan_image(h, w, f"img{i}", config) for i, (h, w) in enumerate(sizes)]
    lengths = [gh * gw for gh, gw in grids]

    def feasible(item, length, target):
        h, w = sizes[item]
        plan = packer._fill.plan_fill(h, w, *grids[item], lengths[item], 0.0, target, config)
        return None if plan is None else plan.cost

    bins, final, unfilled = packer._algorithms.fill_lengths(lengths, config.packer, config.seq_len, config.max_images_per_seq,
                                                config.window, feasible)
    return grids, lengths, bins, final, unfilled


@pytest.mark.parametrize("seq_len", [64, 256, 1024])
def test_every_sequence_but_the_last_is_exactly_full(seq_len):
    config = packer.PackConfig(seq_len=seq_len, resolution="uniform:64:256", fill="exact", window=256)
    sizes = imagenet_like_sizes(3000, seed=seq_len)
    grids, lengths, bins, final, unfilled = run_lengths(config, sizes)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    totals = [sum(final[i] for i in b) for b in bins]
    assert unfilled == 0
    assert all(t == seq_len for t in totals[:-1]), [t for t in totals[:-1] if t != seq_len][:5]
    assert totals[-1] <= seq_len
    assert all(len(b) <= config.max_images_per_seq for b in bins)
    # the same stream without exact fill does leave padding, so the test can fail
    plain = packer.pack_lengths(lengths, "window-bfd", seq_len, config.max_images_per_seq, config.window)
    assert sum(sum(lengths[i] for i in b) < seq_len for b in plain) > 1


@pytest.mark.parametrize("seq_len,resolution,drop", [(256, "uniform:64:256", "none"), (64, "uniform:64:256", "none"),
                                                     (256, "tnormal:64:384:-0.5:1:side", "beta:0.2:0.5"),
                                                     (256, "fixed:160", "none"), (256, "native", "const:0.1")])
def test_replanned_grids_keep_aspect_and_policy_range(seq_len, resolution, drop):
    config = packer.PackConfig(seq_len=seq_len, resolution=resolution, token_drop=drop, fill="exact", window=128)
    sizes = imagenet_like_sizes(800, seed=7)
    grids = [packer._plan.plan_image(h, w, f"img{i}", config) for i, (h, w) in enumerate(sizes)]
    limit = packer._fill.max_fill_drop(config)
    checked = 0
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(sizes):
        gh, gw = grids[i]
        n = gh * gw
        for target in rng.integers(1, seq_len + 1, 4):
            plan = packer._fill.plan_fill(h, w, gh, gw, n, 0.0, int(target), config)
            if plan is None:
                continue
            checked += 1
            area = plan.grid_h * plan.grid_w
            assert area >= plan.tokens == target <= config.max_tokens_per_image
            assert plan.drop_rate == pytest.approx(1 - target / area) and plan.drop_rate <= limit + 1e-12
            if (plan.grid_h, plan.grid_w) != (gh, gw):
                smin, smax = packer._fill.scale_range(h, w, config)
                assert grid_reachable(h, w, plan.grid_h, plan.grid_w, config.patch_size, smin, smax)
                # the planner's rounding bound on aspect distortion
                assert abs(math.log(plan.grid_h / plan.grid_w / (h / w))) <= 1 / plan.grid_h + 1 / plan.grid_w + 1e-9
    assert checked > 200


def test_grid_ladder_is_every_reachable_grid():
    for h, w in [(375, 500), (500, 333), (64, 900), (17, 19), (1000, 1000)]:
        smin, smax = 64 / math.sqrt(h * w), 256 / math.sqrt(h * w)
        areas, grids = packer._fill.grid_ladder(h, w, 16, smin, smax, 10**6)
        sampled = {packer._plan.grid_for_scale(h, w, 16, s, 10**6) for s in np.linspace(smin, smax, 20001)}
        assert sampled <= set(grids)
        assert all(grid_reachable(h, w, gh, gw, 16, smin, smax) for gh, gw in grids)
        assert list(areas) == sorted(areas)


def png_images(n, seed=0, low=24, high=360):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(low, high)), int(rng.integers(low, high))
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(yy * 255 // h), (xx * 255 // w), np.full_like(yy, i % 256)], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append((f"img{i:03d}", buf.getvalue(), i % 5))
    return out


def pack(config, images, epoch=0, can_rerender=lambda provenance: True):
    """(records, the core's stats) of (key, bytes, label) images, on the pipelines' path in this process."""
    core = packer.PackingCore(config, can_rerender=can_rerender)
    driver = packer.Driver(packer.fill_pool(config, 0), on_failed=core.fill_failed)
    records = []
    for k, d, lab in images:
        driver.put(core.add(packer.plan_header(d, k, config, epoch=epoch, label=lab), payload=d))
        records += driver.records(driver.make_room())
    driver.put(core.flush())
    records += driver.records(driver.drain())
    return records, core.stats


def records_hash(records):
    h = hashlib.sha256()
    for rec in records:
        for name in sorted(rec):
            a = np.asarray(rec[name])
            h.update(name.encode())
            h.update(a.astype(str).tobytes() if a.dtype == object else a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("seq_len", [64, 256])
def test_sequence_packer_exact_fill_end_to_end(seq_len):
    config = packer.PackConfig(seq_len=seq_len, resolution="uniform:64:256", fill="exact", window=24)
    images = png_images(90, seed=seq_len)
    data = {k: d for k, d, _ in images}
    records, stats = pack(config, images)
    assert all((r["segment_ids"] > 0).all() for r in records[:-1])
    assert stats["tokens_padding"] == seq_len - int((records[-1]["segment_ids"] > 0).sum())
    assert stats["sequences_unfilled"] == 0 and stats["images_refit"] > 0
    keys = [str(k) for r in records for k in r["image_keys"][: int(r["num_images"])]]
    assert sorted(keys) == sorted(data)
    refit = 0
    for r in records:
        unpacked = packer.unpack(r)
        rebuilt = packer.build_record(unpacked, config)
        assert records_hash([rebuilt]) == records_hash([{k: r[k] for k in rebuilt}])  # unpack is still exact
        for im in unpacked:
            planned = packer._plan.plan_image(im.orig_h, im.orig_w, im.key, config)
            if (im.grid_h, im.grid_w) == planned and im.drop_rate == 0:
                continue
            refit += 1
            if (im.grid_h, im.grid_w) != planned:  # else: the same grid, fewer tokens
                smin, smax = packer._fill.scale_range(im.orig_h, im.orig_w, config)
                assert grid_reachable(im.orig_h, im.orig_w, im.grid_h, im.grid_w, 16, smin, smax)
            assert im.drop_rate <= packer._fill.max_fill_drop(config) + 1e-6  # records store float32
            # kept patches are the image re-rendered at the new grid, at their own positions
            full = OpenedImage(data[im.key], config.max_pixels).decode_resized(im.grid_h * 16, im.grid_w * 16)
            patches, _, _ = packer._patch.patchify(full, 16)
            assert np.array_equal(im.patches, patches[im.pos_y * im.grid_w + im.pos_x])
    assert refit == stats["images_refit"]
    again, _ = pack(config, images)
    assert records_hash(again) == records_hash(records)  # a pure function of (seed, key, epoch) and order
    other_epoch, _ = pack(config, images, epoch=1)
    assert records_hash(other_epoch) != records_hash(records)


def test_fill_none_is_unchanged():
    """fill="none" records equal those built directly from the length-level decisions of the plain
    algorithm (the path fill never touches), for every packer; the fill option does not change images."""
    images = png_images(60, seed=5)
    for packer_name in packer.PACKERS:
        config = packer.PackConfig(seq_len=256, resolution="uniform:48:200", token_drop="beta:0.2:0.5",
                                   packer=packer_name, window=16)
        records, stats = pack(config, images)
        prepared = [packer.prepare_image(d, k, config, label=lab) for k, d, lab in images]
        bins = packer.pack_lengths([im.num_tokens for im in prepared], packer_name, 256, config.max_images_per_seq, 16)
        reference = [packer.build_record([prepared[i] for i in b], config) for b in bins]
        assert records_hash(records) == records_hash(reference)
        assert set(stats) == {"images", "sequences", "tokens_real", "tokens_padding", "fill_failed"}  # no refit counters
    exact = packer.PackConfig(seq_len=256, resolution="uniform:48:200", fill="exact")
    none = packer.PackConfig(seq_len=256, resolution="uniform:48:200")
    for key, d, _ in images[:10]:
        a, b = packer.prepare_image(d, key, exact), packer.prepare_image(d, key, none)
        assert np.array_equal(a.patches, b.patches) and (a.grid_h, a.grid_w) == (b.grid_h, b.grid_w)


def test_exact_fill_needs_a_windowed_packer():
    with pytest.raises(packer.ConfigError):
        packer.PackConfig(fill="exact", packer="next-fit")
    with pytest.raises(ValueError):
        packer.pack_lengths([3, 4], "first-fit", 8, 4, feasible=lambda i, n, t: 0.0)


class _Images:
    """A source of (key, bytes, label) images, three to a unit."""

    def __init__(self, images):
        self.images = images

    def units(self):
        return [str(i) for i in range(0, len(self.images), 3)]

    def read(self, unit):
        from pipelines.sources import SourceRecord

        return iter([SourceRecord(k, d, lab) for k, d, lab in self.images[int(unit):int(unit) + 3]])


def test_resume_with_exact_fill_matches_an_uninterrupted_run():
    from pipelines.stream import PackedStream

    config = packer.PackConfig(seq_len=128, resolution="uniform:48:160", fill="exact", window=12)
    source = _Images(png_images(50, seed=9))
    full = list(PackedStream(source, config, epochs=1, num_parallel=0))
    first = PackedStream(source, config, epochs=1, num_parallel=0)
    out = [next(first) for _ in range(9)]
    state = json.loads(json.dumps(first.state()))
    out += list(PackedStream(source, config, epochs=1, num_parallel=2, state=state))
    assert records_hash(out) == records_hash(full)


def test_exact_fill_without_rerendering_only_drops_tokens():
    """An image the caller cannot re-render (can_rerender False) may only have tokens dropped at the grid it
    was drawn at, and what it keeps are some of its own patches."""
    config = packer.PackConfig(seq_len=128, resolution="uniform:48:160", fill="exact", window=12)
    images = png_images(40, seed=5)
    drawn = {k: packer.prepare_image(d, k, config, label=lab) for k, d, lab in images}
    records, stats = pack(config, images, can_rerender=lambda provenance: False)
    assert stats["images"] == len(images) and stats["images_refit"] > 0
    for im in (im for r in records for im in packer.unpack(r)):
        original = drawn[im.key]
        assert (im.grid_h, im.grid_w) == (original.grid_h, original.grid_w)
        kept = {(y, x) for y, x in zip(original.pos_y, original.pos_x)}
        assert {(y, x) for y, x in zip(im.pos_y, im.pos_x)} <= kept and im.num_tokens <= original.num_tokens
    rerendered, _ = pack(config, images)
    assert any((im.grid_h, im.grid_w) != (drawn[im.key].grid_h, drawn[im.key].grid_w)
               for r in rerendered for im in packer.unpack(r))  # when it may re-render, some grids do change


@pytest.mark.skipif(not IMAGENET_DEV.is_dir(), reason="imagenet-dev not present")
def test_imagenet_dev_exact_fill():
    files = sorted(IMAGENET_DEV.iterdir())[:120]
    config = packer.PackConfig(seq_len=256, resolution="uniform:64:256", fill="exact", window=64)
    records, stats = pack(config, [(f.name, f.read_bytes(), -1) for f in files])
    assert all((r["segment_ids"] > 0).all() for r in records[:-1])
    assert stats["images"] == len(files) and stats["sequences_unfilled"] == 0
