import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packer
from packer import PackConfig

STREAMING = ["next-fit", "first-fit", "window-bfd"]


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=0, max_size=300), cap=st.integers(64, 128),
       max_images_per_seq=st.integers(1, 9), name=st.sampled_from(STREAMING + ["bfd"]), window=st.integers(1, 50))
def test_every_item_packed_once_within_capacity_and_item_limit(lengths, cap, max_images_per_seq, name, window):
    bins = packer.pack_lengths(lengths, name, cap, max_images_per_seq, window)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert 1 <= len(b) <= max_images_per_seq
        assert sum(lengths[i] for i in b) <= cap


def test_next_fit_and_first_fit_follow_their_definitions():
    lengths = [60, 50, 30, 70, 10]
    assert packer.pack_lengths(lengths, "next-fit", 100, 10) == [[0], [1, 2], [3, 4]]
    # first-fit: 30 and 10 go back to bin 0, which fills up and closes first; flush closes the others
    assert packer.pack_lengths(lengths, "first-fit", 100, 10) == [[0, 2, 4], [1], [3]]


def test_first_fit_puts_each_item_in_the_first_bin_with_room():
    # bins after 60, 50: [60], [50]; 30 -> bin 0 (90); 45 -> bin 1 (95); 10 -> bin 0 (100, full)
    bins = packer.pack_lengths([60, 50, 30, 45, 10], "first-fit", 100, 10)
    assert sorted(map(sorted, bins)) == [[0, 2, 4], [1, 3]]


def test_window_bfd_beats_next_fit_and_matches_offline_bfd_on_a_realistic_mix():
    rng = np.random.default_rng(0)
    sides = rng.uniform(64, 256, 20000) / 16
    aspect = rng.choice([0.75, 1.0, 1.333, 0.666, 1.5], 20000)
    lengths = [max(1, min(256, int(round(s * np.sqrt(a))) * int(round(s / np.sqrt(a))))) for s, a in zip(sides, aspect)]
    total = sum(lengths)
    eff = {n: total / (256 * len(packer.pack_lengths(lengths, n, 256, 16))) for n in ["next-fit", "window-bfd", "bfd"]}
    assert eff["next-fit"] < 0.85 < eff["window-bfd"]
    assert eff["window-bfd"] >= eff["bfd"] - 0.004


def make_images(jpeg_bytes, n, cfg, **kw):
    return [packer.prepare_image(jpeg_bytes(60 + 13 * (i % 9), 80 + 29 * (i % 7), seed=i), f"img{i:03d}", cfg, label=i % 5,
                                 meta={"caption": f"picture {i}", "tags": [i, i + 1]}, **kw) for i in range(n)]


@pytest.mark.parametrize("name", STREAMING + ["bfd"])
def test_records_have_the_contract_and_unpack_is_exact(jpeg_bytes, name):
    cfg = PackConfig(seq_len=64, patch_size=8, resolution="uniform:32:72", token_drop="beta:0.2:0.6",
                     max_images_per_seq=4, packer=name, window=8)
    images = make_images(jpeg_bytes, 30, cfg)
    records = list(packer.pack_patched(images, cfg, ("caption", "tags")))
    L, D, E = 64, 8 * 8 * 3, 4
    for r in records:
        assert r["patches"].shape == (L, D) and r["patches"].dtype == np.uint8
        for f in ("segment_ids", "pos_y", "pos_x"):
            assert r[f].shape == (L,) and r[f].dtype == np.int32
        k = int(r["num_images"])
        seg = r["segment_ids"]
        n_real = int((seg > 0).sum())
        assert np.all(seg[:n_real] > 0) and np.all(seg[n_real:] == 0)  # real tokens first, then padding
        assert sorted(set(seg[:n_real].tolist())) == list(range(1, k + 1))
        assert np.all(r["patches"][n_real:] == 0) and np.all(r["pos_y"][n_real:] == 0)
        for f in ("labels", "grid_h", "grid_w", "orig_h", "orig_w", "num_tokens", "drop_rates", "image_keys", "meta_caption"):
            assert r[f].shape == (E,)
        assert r["num_tokens"][:k].sum() == n_real and np.all(r["labels"][k:] == -1) and list(r["image_keys"][k:]) == [""] * (E - k)
    back = {im.key: im for r in records for im in packer.unpack(r)}
    assert sorted(back) == sorted(im.key for im in images)
    for im in images:
        b = back[im.key]
        assert np.array_equal(b.patches, im.patches) and np.array_equal(b.pos_y, im.pos_y) and np.array_equal(b.pos_x, im.pos_x)
        assert (b.grid_h, b.grid_w, b.orig_h, b.orig_w, b.label) == (im.grid_h, im.grid_w, im.orig_h, im.orig_w, im.label)
        assert abs(b.drop_rate - im.drop_rate) < 1e-6
        assert b.meta == {"caption": im.meta["caption"], "tags": json.dumps(im.meta["tags"])}
    assert sum(int(r["num_images"]) for r in records) == 30
    assert sum(int(r["num_tokens"].sum()) for r in records) == sum(im.num_tokens for im in images)


def test_per_image_results_are_identical_in_another_process(jpeg_bytes, tmp_path):
    data = jpeg_bytes(200, 300)
    (tmp_path / "img.jpg").write_bytes(data)
    code = ("import sys, hashlib, packer; cfg = packer.PackConfig(resolution='uniform:64:256', token_drop='beta:0.3:0.9', seed=5);"
            "im = packer.prepare_image(open(sys.argv[1], 'rb').read(), 'a/b.jpg', cfg, epoch=3);"
            "print(hashlib.sha256(im.patches.tobytes() + im.pos_x.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "img.jpg")], capture_output=True, text=True, check=True)
    cfg = PackConfig(resolution="uniform:64:256", token_drop="beta:0.3:0.9", seed=5)
    im = packer.prepare_image(data, "a/b.jpg", cfg, epoch=3)
    import hashlib
    assert out.stdout.strip() == hashlib.sha256(im.patches.tobytes() + im.pos_x.tobytes()).hexdigest()


def test_window_packer_memory_is_bounded_by_its_window():
    algo = packer._algorithms.make_algorithm("window-bfd", 256, 16, window=100)
    rng = np.random.default_rng(1)
    most = 0
    for i, n in enumerate(rng.integers(14, 257, 20000)):
        algo.push(i, int(n))
        most = max(most, len(algo.state()["items"]) if i % 97 == 0 else most)
    assert most <= 100


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), max_size=400), window=st.integers(1, 40), max_images_per_seq=st.integers(1, 6))
def test_batched_window_decisions_equal_item_by_item_pushes(lengths, window, max_images_per_seq):
    algo = packer._algorithms.make_algorithm("window-bfd", 100, max_images_per_seq, window)
    one_by_one = [b for i, n in enumerate(lengths) for b in algo.push(i, n)] + algo.flush()
    assert packer.pack_lengths(lengths, "window-bfd", 100, max_images_per_seq, window) == one_by_one
