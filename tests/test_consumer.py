"""Consumer contract: the reference NaViT (examples/navit_tf.py) sees each packed image exactly as it
would see it alone, one image never influences another, padding is inert, and a model trained from
packed records on disk learns; the PyTorch and JAX reader examples run where those frameworks exist."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import packer
import schemas

pytest.importorskip("tensorflow")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


navit_tf = _load("navit_tf")
shapes = _load("shapes")

PACK = packer.PackConfig(seq_len=96, patch_size=8, max_images_per_seq=6, token_drop="const:0.25", seed=3)


def _model(position: str = "absolute", seed: int = 0) -> "navit_tf.NaViT":
    keras.utils.set_random_seed(seed)
    return navit_tf.NaViT(navit_tf.NaViTConfig(patch_size=8, max_images_per_seq=6, num_classes=4, position=position))


def _batch(records: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.stack([r[name] for r in records]) for name in navit_tf.MODEL_FIELDS}


def _run(model, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    out = model(_batch(records))
    return out["embeddings"].numpy(), out["logits"].numpy()


@pytest.fixture(scope="module")
def records():
    recs = shapes.packed_shapes(40, PACK, seed=1, min_side=12, max_side=56)
    assert max(int(r["num_images"]) for r in recs) >= 3
    assert any(int((r["segment_ids"] == 0).sum()) > 0 for r in recs)
    return recs


@pytest.mark.parametrize("position", navit_tf.POSITIONS)
def test_packed_output_equals_image_alone(records, position):
    model = _model(position)
    emb, logits = _run(model, records)
    checked = 0
    for r, record in enumerate(records):
        images = packer.unpack(record)
        alone_emb, alone_logits = _run(model, [packer.build_record([im], PACK) for im in images])
        k = len(images)
        np.testing.assert_allclose(emb[r, :k], alone_emb[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[r, :k], alone_logits[:, 0], rtol=1e-4, atol=1e-5)
        # Empty slots are zeros, in the packed and in the single-image sequences.
        assert not emb[r, k:].any() and not logits[r, k:].any() and not alone_emb[:, 1:].any()
        checked += k
    assert checked == sum(int(r["num_images"]) for r in records)
    assert np.abs(emb[0, 0] - emb[0, 1]).max() > 1e-3  # distinct images give distinct outputs


def _busiest(records) -> dict:
    return max(records, key=lambda r: int(r["num_images"]))


@pytest.mark.parametrize("position", ["absolute", "fractional"])
def test_changing_one_image_changes_no_other(records, position):
    model = _model(position)
    record = _busiest(records)
    k = int(record["num_images"])
    base, _ = _run(model, [record])
    rng = np.random.default_rng(0)
    for target in range(1, k + 1):
        changed = dict(record)
        changed["patches"] = record["patches"].copy()
        sel = record["segment_ids"] == target
        changed["patches"][sel] = rng.integers(0, 256, changed["patches"][sel].shape, dtype=np.uint8)
        out, _ = _run(model, [changed])
        others = [i for i in range(k) if i != target - 1]
        np.testing.assert_allclose(out[0, others], base[0, others], rtol=1e-5, atol=1e-6)
        assert np.abs(out[0, target - 1] - base[0, target - 1]).max() > 1e-3


def test_merged_segments_are_detected(records):
    """Control: if two images shared a segment id, the first one's output would change. The equality
    tests above therefore fail on any cross-image leak, not only on gross errors."""
    model = _model()
    record = _busiest(records)
    base, _ = _run(model, [record])
    leaked = dict(record)
    leaked["segment_ids"] = np.where(record["segment_ids"] == 2, 1, record["segment_ids"]).astype(np.int32)
    out, _ = _run(model, [leaked])
    assert np.abs(out[0, 0] - base[0, 0]).max() > 1e-3


@pytest.mark.parametrize("position", navit_tf.POSITIONS)
def test_padding_changes_nothing(records, position):
    model = _model(position)
    padded = [r for r in records if (r["segment_ids"] == 0).any()]
    base, base_logits = _run(model, padded)
    rng = np.random.default_rng(1)
    noisy = []
    for r in padded:
        r = dict(r, patches=r["patches"].copy(), pos_y=r["pos_y"].copy(), pos_x=r["pos_x"].copy())
        pad = r["segment_ids"] == 0
        r["patches"][pad] = rng.integers(0, 256, r["patches"][pad].shape, dtype=np.uint8)
        r["pos_y"][pad] = rng.integers(0, 12, int(pad.sum()))
        r["pos_x"][pad] = rng.integers(0, 12, int(pad.sum()))
        noisy.append(r)
    out, logits = _run(model, noisy)
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-6)


def test_all_padding_sequence_is_finite_and_empty(records):
    """A batch row with no image at all (e.g. batch padding) yields zeros, never NaN."""
    model = _model("fractional")
    empty = {name: np.zeros_like(value) for name, value in records[0].items() if name in navit_tf.MODEL_FIELDS}
    empty["labels"] = np.full_like(records[0]["labels"], -1)
    emb, logits = _run(model, [records[0], empty])
    assert np.isfinite(emb).all() and np.isfinite(logits).all()
    assert not emb[1].any() and not logits[1].any()
    assert float(navit_tf.masked_loss(logits[1:], empty["labels"][None])) == 0.0


def test_config_is_validated():
    with pytest.raises(ValueError, match="position"):
        navit_tf.NaViTConfig(position="sinusoidal")
    with pytest.raises(ValueError, match="heads"):
        navit_tf.NaViTConfig(width=60, heads=8)
    model = navit_tf.NaViT(navit_tf.NaViTConfig(patch_size=8, max_images_per_seq=6, max_grid=4))
    wide = packer.build_record([packer.PatchedImage("k", np.zeros((6, 192), np.uint8), np.zeros(6, np.int32),
                                                    np.arange(6, dtype=np.int32), 1, 6, 8, 48, 0.0)], PACK)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_grid"):
        model(_batch([wide]))
    with pytest.raises(ValueError, match="expects 768"):
        navit_tf.NaViT(navit_tf.NaViTConfig(patch_size=16))(_batch([wide]))


def _accuracy(model, records) -> float:
    logits = model(_batch(records))["logits"].numpy()
    labels = np.stack([r["labels"] for r in records])
    valid = labels >= 0
    return float((logits.argmax(-1) == labels)[valid].mean())


def test_training_from_disk_learns(tmp_path):
    """Packed records written to disk and read back through schemas.tf_dataset train the reference model:
    the loss falls below half its initial value, and held-out images (packed differently) are classified
    well above chance (0.25), so labels reach the model aligned with their images."""
    config = packer.PackConfig(seq_len=128, patch_size=8, max_images_per_seq=8, token_drop="const:0.1")
    train = shapes.packed_shapes(320, config, seed=10, min_side=16, max_side=48)
    held_out = shapes.packed_shapes(80, config, seed=11, min_side=16, max_side=48)
    schemas.write_dataset(tmp_path / "train", train, config=config, fmt="tfrecord", num_shards=2, rejects=[],
                          num_images_in=320, meta_fields=(), overwrite=False)
    ds = schemas.tf_dataset(tmp_path / "train").map(navit_tf.model_inputs)
    ds = ds.cache().repeat().shuffle(64, seed=0).batch(16, drop_remainder=True)

    keras.utils.set_random_seed(0)
    model = navit_tf.NaViT(navit_tf.NaViTConfig(patch_size=8, max_images_per_seq=8, num_classes=len(shapes.COLOURS),
                                                position="fractional"))
    step = navit_tf.make_train_step(model, keras.optimizers.Adam(1e-3))
    before = _accuracy(model, held_out)
    losses = [float(step(batch)) for batch in ds.take(200)]
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    assert np.isfinite(losses).all()
    assert last < 0.5 * first, (first, last)
    after = _accuracy(model, held_out)
    assert after > 0.8 and after > before + 0.3, (before, after)


def _run_reader(name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--work-dir", str(tmp_path), "--steps", "10"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name, framework", [("torch_reader", "torch"), ("jax_reader", "jax")])
def test_reader_example_runs(name, framework, tmp_path):
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed (optional: the example is for {framework} users)")
    proc = _run_reader(name, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leak check: ok" in proc.stdout, proc.stdout[-3000:]


def test_torch_flex_attention_equals_dense_mask(records):
    """examples/torch_reader.py: the flex_attention block mask built from segment_ids gives the dense
    boolean-mask outputs (run unfused on CPU), and changing one image changes no other under it."""
    torch = pytest.importorskip("torch")
    reader = _load("torch_reader")
    if reader.flex_attention is None:
        pytest.skip("this torch has no flex_attention")
    torch.manual_seed(0)
    model = reader.TinyNaViT(PACK.token_dim, PACK.max_images_per_seq, 16, 4, attention="dense")
    batch = reader.to_torch(records[:6])
    with torch.no_grad():
        dense = model(batch)
        model.attention = "flex"
        flex = model(batch)
        torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)
        reader.leak_check(model, records[:3], PACK)  # packed == alone, on the flex path
    assert reader.resolve_attention("auto", torch.device("cpu")) == "dense"
    with pytest.raises(ValueError, match="attention"):
        reader.resolve_attention("sparse", torch.device("cpu"))


def test_jax_fused_attention_equals_einsum(records):
    """examples/jax_reader.py: jax.nn.dot_product_attention with the segment mask gives the written-out
    masked softmax's outputs (the packed-equals-alone check on the fused path runs in the example itself,
    test_reader_example_runs)."""
    jax = pytest.importorskip("jax")
    reader = _load("jax_reader")
    if not hasattr(jax.nn, "dot_product_attention"):
        pytest.skip("this jax has no jax.nn.dot_product_attention")
    params = reader.init_params(jax.random.PRNGKey(0), PACK.token_dim, 16, 4)
    batch = reader.to_batch(records[:6], PACK.max_images_per_seq)
    forward = jax.jit(reader.forward, static_argnames=("heads", "attention"))
    fused = np.asarray(forward(params, batch, attention="fused"))
    einsum = np.asarray(forward(params, batch, attention="einsum"))
    np.testing.assert_allclose(fused, einsum, rtol=1e-4, atol=1e-5)
    assert np.isfinite(fused).all() and np.abs(fused).max() > 1e-3
