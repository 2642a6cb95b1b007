import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packer
from packer import PackConfig

# (image h, w), patch, resolution, seq_len -> expected grid (h, w), derived by hand from the stated rule.
GOLDEN = [
    ((224, 224), 16, "native", 256, (14, 14)),
    ((375, 500), 16, "native", 256, (14, 18)),      # 23x31 = 713 > 256: the budget grid for the cap
    ((300, 600), 16, "fixed:224", 256, (10, 20)),   # 9.90 x 19.80 rounded
    ((256, 256), 16, "budget:256", 256, (16, 16)),
    # 14x18 = 252 (error 0.036 <= 0.064); 15x17, 16x16, 13x19 and 12x21 have more patches but break the bound.
    ((375, 500), 16, "budget:256", 256, (14, 18)),
    ((300, 600), 16, "budget:256", 256, (11, 23)),  # 253 patches, error 0.045 <= (1/11 + 1/23)/2
    ((1, 10000), 16, "budget:196", 256, (1, 196)),  # thinner than a patch: one row, budget-limited
    ((10000, 1), 16, "budget:256", 256, (256, 1)),
    ((1, 10000), 16, "native", 256, (1, 256)),
    ((64, 64), 16, "fixed:64", 256, (4, 4)),
    ((8, 8), 16, "native", 256, (1, 1)),
    ((480, 640), 14, "fixed:224", 256, (14, 18)),    # 13.86 x 18.48 rounded
    ((1080, 1920), 32, "budget:64", 64, (6, 10)),    # 7x9, 5x12, 4x16 break the bound; 6x10 = 60
    ((375, 500), 16, "naflex:256", 256, (14, 18)),
]

# naflex:T reproduces Hugging Face transformers' SigLIP2 image processor,
# transformers/models/siglip2/image_processing_siglip2.py, get_image_size_for_max_num_patches
# (bisection of the scale over [1e-6, 100] until the interval is narrower than 1e-5; each side
# ceil(side * scale / P), at least 1; the grid of the last scale that fitted). This table was computed
# with that published function (transformers 5.24.0), then divided by P: (h, w), P, T -> grid.
NAFLEX_GOLDEN = [
    ((375, 500), 16, 256, (14, 18)),
    ((500, 375), 16, 256, (18, 14)),
    ((224, 224), 16, 256, (16, 16)),
    ((1, 1), 16, 256, (7, 7)),          # upscaling stops at the search's top scale, 100
    ((8, 8), 16, 256, (16, 16)),
    ((3, 7), 16, 256, (10, 24)),
    ((1, 10000), 16, 256, (1, 256)),
    ((10000, 1), 16, 256, (256, 1)),
    ((1, 100000000), 16, 64, (1, 44)),  # the bisection's lowest-scale region: one patch thick
    ((10000, 10000), 16, 256, (16, 16)),
    ((40000, 2500), 16, 1024, (128, 8)),
    ((1080, 1920), 14, 729, (20, 36)),
    ((333, 10001), 16, 1, (1, 1)),
    ((17, 4000), 32, 64, (1, 64)),
    ((480, 640), 16, 4096, (55, 74)),
    ((2, 3), 16, 2, (1, 2)),
]


@pytest.mark.parametrize("size,patch,tokens,expected", NAFLEX_GOLDEN)
def test_naflex_golden_grids(size, patch, tokens, expected):
    assert packer._plan.grid_for_naflex(*size, patch, tokens) == expected
    cfg = PackConfig(patch_size=patch, resolution=f"naflex:{tokens}", seq_len=max(tokens, 16))
    assert packer._plan.plan_grid(*size, cfg, None) == expected


def test_naflex_matches_transformers_processor_rule():
    """Where transformers is installed (it is not a dependency), compare with its own function."""
    siglip2 = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(300)] + [s for s, *_ in NAFLEX_GOLDEN]
    for (h, w), patch, tokens in zip(sizes, rng.choice([14, 16, 32], len(sizes)), rng.integers(1, 2048, len(sizes))):
        th, tw = siglip2.get_image_size_for_max_num_patches(h, w, int(patch), int(tokens))
        assert packer._plan.grid_for_naflex(h, w, int(patch), int(tokens)) == (th // patch, tw // patch), (h, w, patch, tokens)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 100_000), w=st.integers(1, 100_000), patch=st.sampled_from([14, 16]), tokens=st.integers(1, 2048))
def test_naflex_plan_never_exceeds_tokens(h, w, patch, tokens):
    cfg = PackConfig(patch_size=patch, resolution=f"naflex:{tokens}", seq_len=2048)
    gh, gw = packer._plan.plan_grid(h, w, cfg, None)
    assert 1 <= gh * gw <= tokens


@pytest.mark.parametrize("size,patch,resolution,seq_len,expected", GOLDEN)
def test_golden_grids(size, patch, resolution, seq_len, expected):
    cfg = PackConfig(patch_size=patch, resolution=resolution, seq_len=seq_len)
    assert packer._plan.plan_grid(*size, cfg, None) == expected


def _aspect_error(h, w, gh, gw):
    return abs(math.log((gw / gh) / (w / h)))


sizes = st.integers(min_value=1, max_value=6000)


@settings(max_examples=400, deadline=None)
@given(h=sizes, w=sizes, patch=st.sampled_from([8, 14, 16, 32]), r=st.floats(8, 1024), cap=st.integers(1, 2048))
def test_scaled_grid_properties(h, w, patch, r, cap):
    scale = r / math.sqrt(h * w)
    gh, gw = packer._plan.grid_for_scale(h, w, patch, scale, cap)
    assert gh >= 1 and gw >= 1 and gh * gw <= cap
    ideal_sides_ok = min(h, w) * scale / patch >= 1 and math.sqrt(cap * min(h, w) / max(h, w)) >= 1
    if ideal_sides_ok:
        assert _aspect_error(h, w, gh, gw) <= 1 / gh + 1 / gw + 1e-12


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, cap=st.integers(1, 2048), extra=st.integers(0, 512))
def test_budget_respected_monotone_and_aspect_bounded(h, w, cap, extra):
    gh, gw = packer._plan.grid_for_budget(h, w, cap)
    gh2, gw2 = packer._plan.grid_for_budget(h, w, cap + extra)
    assert 1 <= gh * gw <= cap
    assert gh * gw <= gh2 * gw2  # monotone in the budget
    if math.sqrt(cap * min(h, w) / max(h, w)) >= 1:
        assert _aspect_error(h, w, gh, gw) <= 1 / gh + 1 / gw + 1e-12


def _brute_force_budget(h, w, cap):
    """Every grid with <= cap patches within the half bound: (most patches, least error); None if none."""
    fits = [(gh * gw, -_aspect_error(h, w, gh, gw), gh, gw) for gh in range(1, cap + 1) for gw in range(1, cap // gh + 1)
            if _aspect_error(h, w, gh, gw) <= packer._plan.ASPECT_SLACK * (1 / gh + 1 / gw)]
    return max(fits)[2:] if fits else None


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, cap=st.integers(1, 300))
def test_budget_grid_is_the_best_grid_within_the_bound(h, w, cap):
    """The O(sqrt(T)) search finds what trying every grid finds (same patch count and aspect error)."""
    got = packer._plan.grid_for_budget(h, w, cap)
    best = _brute_force_budget(h, w, cap)
    if best is None:  # no grid within the bound: the floored ideal grid
        assert got == packer._plan.floored_grid(h, w, cap)
    else:
        assert got[0] * got[1] == best[0] * best[1]
        assert _aspect_error(h, w, *got) == pytest.approx(_aspect_error(h, w, *best), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(h=sizes, w=sizes, r=st.floats(16, 1024), cap=st.integers(1, 1024), extra=st.integers(1, 512))
def test_token_count_monotone_in_cap_for_sampled_resolutions(h, w, r, cap, extra):
    scale = r / math.sqrt(h * w)
    a = packer._plan.grid_for_scale(h, w, 16, scale, cap)
    b = packer._plan.grid_for_scale(h, w, 16, scale, cap + extra)
    assert a[0] * a[1] <= b[0] * b[1]


def test_uniform_resolution_distribution_and_determinism():
    cfg = PackConfig(resolution="uniform:64:256", seed=7)
    rs = [packer._plan.sample_resolution(cfg.resolution, packer.image_rng(7, f"k{i}", 0, "resolution")) for i in range(4000)]
    assert 64 <= min(rs) and max(rs) <= 256
    assert abs(np.mean(rs) - 160) < 4
    assert packer._plan.plan_image(480, 640, "k1", cfg) == packer._plan.plan_image(480, 640, "k1", cfg)
    grids = {packer._plan.plan_image(480, 640, "k1", cfg, epoch=e) for e in range(20)}
    assert len(grids) > 5  # a new resolution each epoch


@pytest.mark.parametrize("mode", ["side", "area"])
def test_truncated_normal_resolution_is_biased_low_and_bounded(mode):
    policy = packer.parse_resolution(f"tnormal:64:384:-0.5:1:{mode}")
    rs = np.array([packer._plan.sample_resolution(policy, packer.image_rng(0, str(i), 0, "r")) for i in range(4000)])
    assert rs.min() >= 64 and rs.max() <= 384
    mid = 224 if mode == "side" else math.sqrt((64**2 + 384**2) / 2)
    assert np.mean(rs < mid) > 0.55  # mu = -0.5 puts more mass on the low side


def test_area_mode_rescales_area_not_side():
    # u = 0 (the middle) maps to side 224 in side mode and to sqrt((64^2+384^2)/2) ~ 275 in area mode.
    side = packer._config.TruncNormal(64, 384, 0.0, 1e-6, "side")
    area = packer._config.TruncNormal(64, 384, 0.0, 1e-6, "area")
    rng = np.random.default_rng(0)
    assert abs(packer._plan.sample_resolution(side, rng) - 224) < 0.01
    assert abs(packer._plan.sample_resolution(area, rng) - math.sqrt((64**2 + 384**2) / 2)) < 0.01


def test_keyed_hashes_are_blake2b_of_the_whole_message():
    """stable_hash and the generators' seeds hash a prefix once and copy it: the digests stay those of the
    whole message (what every earlier output was made with), for any key and salt."""
    import hashlib

    for key in ["", "n01440764/x.JPEG", "é/ü\udcff", "x" * 500, "a\x00b"]:
        for salt in ["", "0/3", "group/7/1", "\ud800"]:
            whole = hashlib.blake2b(f"{salt}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
            assert packer.stable_hash(key, salt) == int.from_bytes(whole, "little"), (key, salt)
        for seed, epoch, purpose in ((0, 0, "resolution"), (-5, 12, "drop")):
            msg = f"{seed}\x00{epoch}\x00{purpose}\x00{key}".encode("utf-8", "surrogatepass")
            assert packer._rng._digest(seed, key, epoch, purpose) == hashlib.blake2b(msg, digest_size=16).digest()


def test_image_rngs_are_image_rng_bit_for_bit():
    """image_rngs seeds many keys and purposes at once (numpy's SeedSequence and PCG64 seeding, vectorized): the same
    generators as image_rng, whatever the key (empty, non-ASCII, surrogates, long), and first_uniform is
    the first uniform draw."""
    keys = [f"n{i:08d}/img_{i}.JPEG" for i in range(300)] + ["", "é/ü\udcff", "x" * 500, "a\x00b"]
    for seed, epoch, purpose in ((0, 0, "resolution"), (2**40 + 3, 7, "drop"), (-5, 123, "fill")):
        rngs = packer._rng.image_rngs(seed, keys, epoch, ["other", purpose])[purpose]
        assert len(rngs) == len(keys)
        for i, key in enumerate(keys):
            def alone():
                return packer.image_rng(seed, key, epoch, purpose)
            assert rngs.first_uniform(i, 64.0, 256.0) == alone().uniform(64.0, 256.0), key
            assert np.array_equal(rngs.get(i).random(4), alone().random(4)), key
            assert rngs.get(i).beta(0.7, 1.3) == alone().beta(0.7, 1.3), key
    assert len(packer._rng.image_rngs(0, [], 0, ["drop"])["drop"]) == 0


@pytest.mark.parametrize("resolution", ["uniform:64:256", "tnormal:64:384:-0.5:1:side", "fixed:128", "fixed:400", "native", "budget:64"])
@pytest.mark.parametrize("drop", ["none", "const:0.25", "beta:0.25:0.5", "resdep:0.1:0.6", "beta:0.5:0.8@sigmoid:0.1:0.6:200:50"])
def test_plans_seeded_ahead_equal_plans_alone(resolution, drop):
    config = PackConfig(seq_len=256, resolution=resolution, token_drop=drop, seed=11)
    keys = [f"k{i}" for i in range(40)]
    sizes = [(50 + 7 * i, 300 - 5 * i) if i % 7 else (3000 + i, 40 + 97 * i) for i in range(len(keys))]  # some over the cap
    sizes[5] = None  # unknown to the block: planned as it comes
    block = packer.PlanBlock(config, keys, 3, sizes)
    for i, key in enumerate(keys):
        h, w = sizes[i] or (77, 91)
        alone = packer.plan_size(h, w, key, config, epoch=3, images_seen=10 * i, label=i, meta={"m": str(i)})
        ahead = packer.plan_size(h, w, key, config, epoch=3, images_seen=10 * i, label=i, meta={"m": str(i)},
                                 rngs=block.of(i))
        made = block.plan(i, h, w, images_seen=10 * i, label=i, meta={"m": str(i)})
        assert ahead == alone and made == alone, (key, ahead, made, alone)
        assert type(made) is packer.ImagePlan and made.__dict__ == alone.__dict__
        other = block.plan(i, h + 1, w, images_seen=10 * i)  # another size than the block's: planned alone
        assert other == packer.plan_size(h + 1, w, key, config, epoch=3, images_seen=10 * i)
    # The whole block in one pass: each plan as plan_size's, None where the image must be planned alone.
    labels = [(None, "x", 2.0, -2, True)[i % 5] if i % 3 == 0 else i for i in range(len(keys))]
    metas = [{"m": str(i)} if i % 2 else {} for i in range(len(keys))]
    made = block.plans([5 * i + 1 for i in range(len(keys))], labels, metas)
    one_draw = resolution.split(":")[0] in ("uniform", "fixed", "native")
    for i, key in enumerate(keys):
        try:
            alone = packer.plan_size(*(sizes[i] or (77, 91)), key, config, epoch=3, images_seen=5 * i + 1,
                                     label=labels[i], meta=metas[i])
        except packer.ImageRejected:
            alone = None  # a bad label: block.plan raises it
        if sizes[i] is None or alone is None or not one_draw:
            assert made[i] is None, (key, labels[i])
        else:
            assert type(made[i]) is packer.ImagePlan and made[i].__dict__ == alone.__dict__, (key, made[i], alone)
