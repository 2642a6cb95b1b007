import numpy as np
import pytest

import packer
from packer import PackConfig


def test_patch_layout_is_row_col_channel_in_row_major_order():
    P, gh, gw = 2, 2, 3
    img = np.arange(gh * P * gw * P * 3, dtype=np.uint32).reshape(gh * P, gw * P, 3).astype(np.uint8)
    patches, pos_y, pos_x = packer._patch.patchify(img, P)
    assert patches.shape == (6, P * P * 3) and patches.dtype == np.uint8
    assert pos_y.tolist() == [0, 0, 0, 1, 1, 1] and pos_x.tolist() == [0, 1, 2, 0, 1, 2]
    for t in range(6):
        y, x = pos_y[t], pos_x[t]
        assert np.array_equal(patches[t], img[y * P:(y + 1) * P, x * P:(x + 1) * P].reshape(-1))  # (row, col, ch)


@pytest.mark.parametrize("gh,gw,P", [(1, 1, 16), (3, 5, 16), (7, 2, 14), (1, 40, 8)])
def test_unpatchify_is_exact_inverse(gh, gw, P):
    img = np.random.default_rng(0).integers(0, 256, (gh * P, gw * P, 3), dtype=np.uint8)
    patches, pos_y, pos_x = packer._patch.patchify(img, P)
    assert np.array_equal(packer.unpatchify(patches, gh, gw, P), img)
    keep = np.arange(0, gh * gw, 2)
    partial = packer.unpatchify(patches[keep], gh, gw, P, pos_y[keep], pos_x[keep], fill=7)
    assert np.array_equal(packer._patch.patchify(partial, P)[0][keep], patches[keep])


def rates(spec, n=3000, tokens=100, seen=0.0, cap=256):
    policy = packer.parse_drop(spec)
    return np.array([packer._drop.sample_drop_rate(policy, packer.image_rng(0, str(i), 0, "drop"), tokens, cap, seen)
                     for i in range(n)])


def test_const_and_none():
    assert set(rates("none", 50)) == {0.0}
    assert set(rates("const:0.25", 50)) == {0.25}


def test_beta_mean_and_variance_follow_paper():
    d = rates("beta:0.3:0.9", 6000)
    assert d.min() >= 0 and d.max() <= 0.9
    u = d / 0.9
    m = 0.3 / 0.9
    assert abs(u.mean() - m) < 0.015
    assert abs(u.var() - 0.3 * m * (1 - m)) < 0.01


def test_resdep_mean_linear_in_tokens_and_truncated_at_two_sigma():
    lo = rates("resdep:0.1:0.5:16:256", 2000, tokens=16)
    hi = rates("resdep:0.1:0.5:16:256", 2000, tokens=256)
    mid = rates("resdep:0.1:0.5:16:256", 2000, tokens=136)
    assert abs(lo.mean() - 0.1) < 0.005 and abs(hi.mean() - 0.5) < 0.005 and abs(mid.mean() - 0.3) < 0.005
    assert np.abs(mid - 0.3).max() <= 0.04 + 1e-12 and mid.std() > 0.01


def test_sigmoid_schedule_drives_the_rate():
    sched = packer._config.SigmoidSchedule(0.2, 0.8, mu=1000, tau=-100)  # decreasing: high early, low late
    assert abs(sched.rate(-10**6) - 0.8) < 1e-6 and abs(sched.rate(10**6) - 0.2) < 1e-6
    assert abs(sched.rate(1000) - 0.5) < 1e-9
    early = rates("const:0.5@sigmoid:0.2:0.8:1000:-100", 5, seen=0)
    late = rates("const:0.5@sigmoid:0.2:0.8:1000:-100", 5, seen=5000)
    assert early[0] > 0.79 and late[0] < 0.21
    beta_late = rates("beta:0.4:0.9@sigmoid:0.2:0.8:1000:-100", 3000, seen=5000)
    assert abs(beta_late.mean() - 0.2) < 0.02


def test_kept_tokens_keep_positions_order_and_at_least_one(jpeg_bytes):
    data = jpeg_bytes(160, 160)
    full = packer.prepare_image(data, "img", PackConfig(resolution="native"))
    dropped = packer.prepare_image(data, "img", PackConfig(resolution="native", token_drop="const:0.6"))
    assert full.num_tokens == 100 and dropped.num_tokens == 40
    flat = dropped.pos_y * full.grid_w + dropped.pos_x
    assert np.all(np.diff(flat) > 0)  # order kept
    assert np.array_equal(dropped.patches, full.patches[flat])  # each kept patch at its own position
    assert abs(dropped.drop_rate - 0.6) < 1e-9
    assert packer._drop.kept_count(5, 0.999) == 1 and packer._drop.kept_count(1, 0.9) == 1


def test_every_draw_is_a_pure_function_of_seed_key_epoch(jpeg_bytes):
    cfg = PackConfig(resolution="uniform:64:256", token_drop="beta:0.3:0.9", seed=11)
    datas = {f"k{i}": jpeg_bytes(100 + 7 * i, 150, seed=i) for i in range(6)}
    forward = {k: packer.prepare_image(d, k, cfg, epoch=2) for k, d in datas.items()}
    backward = {k: packer.prepare_image(datas[k], k, cfg, epoch=2) for k in reversed(list(datas))}
    for k in datas:
        a, b = forward[k], backward[k]
        assert (a.grid_h, a.grid_w, a.drop_rate) == (b.grid_h, b.grid_w, b.drop_rate)
        assert np.array_equal(a.patches, b.patches) and np.array_equal(a.pos_x, b.pos_x)
    other_epoch = [packer.prepare_image(d, k, cfg, epoch=3) for k, d in datas.items()]
    assert any((a.grid_h, a.num_tokens) != (forward[a.key].grid_h, forward[a.key].num_tokens) for a in other_epoch)


def test_bad_labels_rejected():
    for bad in [float("nan"), 1.5, -2, 2**31, "cat", float("inf")]:
        with pytest.raises(packer.ImageRejected) as err:
            packer._process.check_label(bad)
        assert err.value.reason == "bad_label"
    assert packer._process.check_label(None) == -1 and packer._process.check_label(3.0) == 3 and packer._process.check_label(np.int64(7)) == 7
    assert packer._process.check_label(2**31 - 1) == 2**31 - 1 and packer._process.check_label(-1) == -1
