"""Output bytes pinned: the batch job (every format, 1 and 2 workers, several groups and epochs, exact fill,
meta fields, folder / wds / synthetic inputs), the stream (records and batches, in-process and worker
processes) and the service generator write exactly the bytes recorded in golden_bytes.json.

Output bytes are a pure function of (config, inputs, environment): the pixels come from Pillow,
simplejpeg, OpenCV and numpy, whose versions and kernels matter; the kernels dispatch on the CPU, and
an AVX-512 machine's resize bytes differ from an AVX2 machine's. So the file holds digests per
environment (_environment: the versions and whether AVX-512 runs), and a case is compared where its
environment is recorded (skipped, naming the environments, where none is; the equalities across worker
counts and stream settings are checked everywhere). To record this machine's environment beside the
others (same code, a new kind of machine):
    NAVIT_PACK_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_bytes.py
After a deliberate change of output, delete the file first (every environment's bytes are stale),
regenerate on each kind of machine at hand, and say why in the commit. The cases name their packer (window-bfd, the default when the bytes were first
pinned), so a new default changes only the `default_packer` cases."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

import packer
import schemas
from conftest import encode, make_pixels
from pipelines import batch
from pipelines.stream import PackedStream

GOLDEN = Path(__file__).with_name("golden_bytes.json")
REGENERATE = bool(os.environ.get("NAVIT_PACK_REGENERATE_GOLDEN"))
CONFIG = dict(seq_len=96, resolution="uniform:24:128", token_drop="beta:0.2:0.5", packer="window-bfd")
_found: dict[str, str] = {}


def _environment() -> dict:
    """What the pixel bytes depend on beyond the code: the pixel libraries' versions, and whether the CPU
    runs AVX-512 (numpy's and OpenCV's kernels dispatch on it)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return {**packer.library_versions(), "avx512": bool(__cpu_features__.get("AVX512_SKX"))}


def _golden() -> list[dict]:
    """The recorded environments: [{"environment": ..., "digests": {case: digest}}]."""
    return json.loads(GOLDEN.read_text())["environments"] if GOLDEN.exists() else []


def check(name: str, digest: str) -> None:
    """Compare `digest` with the one recorded for this environment (or record it when regenerating)."""
    here = _environment()
    recorded = _golden()
    entry = next((e for e in recorded if e["environment"] == here), None)
    if REGENERATE:
        if entry is None:
            entry = {"environment": here, "digests": {}}
            recorded.append(entry)
        entry["digests"][name] = digest
        GOLDEN.write_text(json.dumps({"environments": recorded}, indent=1, sort_keys=True) + "\n")
        return
    if entry is None:
        pytest.skip(f"no bytes recorded for this environment {here}; recorded: {[e['environment'] for e in recorded]}")
    assert entry["digests"][name] == digest, f"{name}: output bytes changed"


def dir_digest(directory: Path) -> str:
    """Every output file's bytes; the manifest without `input` (the folder's path differs per run) and
    without what names the run (`run_id`, `rejects`), the run id taken out of every file name (so the
    digests pinned before run ids existed still hold: shard bytes never carry the run id)."""
    run_id = json.loads((directory / schemas.MANIFEST).read_text())["run_id"]

    def unrun(name: str) -> str:
        return name.replace(f"packed-{run_id}-", "packed-").replace(f"rejects-{run_id}.jsonl", schemas.REJECTS)

    h = hashlib.sha256()
    for path in sorted(directory.iterdir(), key=lambda p: unrun(p.name)):
        data = path.read_bytes()
        if path.name == schemas.MANIFEST:
            manifest = json.loads(data)
            for key in ("input", "run_id", "rejects"):
                manifest.pop(key)
            manifest["shards"] = [dict(s, file=unrun(s["file"])) for s in manifest["shards"]]
            data = json.dumps(manifest, sort_keys=True).encode()
        h.update(unrun(path.name).encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def records_digest(records) -> str:
    h = hashlib.sha256()
    n = 0
    for r in records:
        n += 1
        for name in sorted(r):
            v = np.asarray(r[name])
            data = "\x1f".join(map(str, v.reshape(-1))).encode() if v.dtype == object else v.tobytes()
            h.update(f"{name}:{v.dtype.str}:{v.shape}:".encode() + data)
    return f"{n}:{h.hexdigest()}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A folder (3 classes of JPEGs and PNGs of varied sizes, an undecodable file and a cut JPEG) and a
    WebDataset tar of the same images with .cls labels and .json metadata."""
    root = tmp_path_factory.mktemp("golden")
    rng = np.random.default_rng(11)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(60):
            h, w = (int(v) for v in rng.integers(16, 220, 2))
            fmt, ext = ("PNG", "png") if i % 5 == 0 else ("JPEG", "jpg")
            data = encode(make_pixels(h, w, seed=i), fmt, **({"quality": 85} if fmt == "JPEG" else {}))
            path = root / "photos" / f"class{i % 3}" / f"img{i:02d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            for name, payload in ((f"s{i:03d}.{ext}", data), (f"s{i:03d}.cls", str(i % 3).encode()),
                                  (f"s{i:03d}.json", json.dumps({"caption": f"image {i}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "photos" / "class0" / "broken.jpg").write_bytes(b"not an image")
    (root / "photos" / "class1" / "cut.jpg").write_bytes(encode(make_pixels(120, 90, seed=99), "JPEG")[:1200])
    (root / "shards.tar").write_bytes(buf.getvalue())
    return {"folder": str(root / "photos"), "wds": f"wds:{root / 'shards.tar'}", "synthetic": "synthetic:40"}


BATCH = {  # name -> (input, PackConfig overrides, PackJob fields)
    "tfrecord": ("folder", {}, dict(fmt="tfrecord")),
    "arrow": ("folder", {}, dict(fmt="arrow")),
    "parquet": ("folder", {}, dict(fmt="parquet")),
    "array_record": ("folder", {}, dict(fmt="array_record")),
    "exact_fill": ("folder", dict(fill="exact", token_drop="resdep:0.1:0.4:1:96"), dict(fmt="tfrecord")),
    "meta": ("folder", dict(packer="first-fit"), dict(fmt="parquet", meta_fields=("class_name",))),
    "wds": ("wds", dict(token_drop="const:0.3@sigmoid:0.1:0.6:60:20"), dict(fmt="arrow", meta_fields=("caption",))),
    "synthetic": ("synthetic", {}, dict(fmt="tfrecord", group_size=4096, num_shards=None, epochs=1)),
    "default_packer": ("folder", dict(packer=packer.PACKERS[0]), dict(fmt="tfrecord")),
}


@pytest.mark.parametrize("name", sorted(BATCH))
def test_batch_job_bytes(inputs, tmp_path, name):
    source, overrides, fields = BATCH[name]
    config = packer.PackConfig(**{**(CONFIG if source != "synthetic" else {"packer": "window-bfd"}), **overrides})
    job = dict(dict(num_shards=4, group_size=20, epochs=2), **fields)
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        batch.run_pack(batch.PackJob(input=inputs[source], output=str(out), config=config, **job),
                               workers=workers)
        digests.append(dir_digest(out))
    assert digests[0] == digests[1], "the worker count changed the output"
    check(f"batch/{name}", digests[0])


STREAMS = {  # name -> (input, PackConfig overrides, PackedStream arguments)
    "records": ("folder", dict(token_drop="const:0.3@sigmoid:0.1:0.6:60:20"), dict(epochs=2)),
    "exact_fill": ("folder", dict(fill="exact"), dict(epochs=1)),
    "wds_meta": ("wds", {}, dict(epochs=1, meta_fields=("caption",), shuffle_block=16)),
    "default_packer": ("folder", dict(packer=packer.PACKERS[0]), dict(epochs=1)),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_bytes(inputs, name):
    source, overrides, kwargs = STREAMS[name]
    config = packer.PackConfig(**{**CONFIG, **overrides})
    digests = {}
    for num_parallel in (0, 2):
        with PackedStream(inputs[source], config, num_parallel=num_parallel, **kwargs) as stream:
            digests[f"records/{num_parallel}"] = records_digest(stream)
        with PackedStream(inputs[source], config, num_parallel=num_parallel, **kwargs) as stream:
            rows = []
            for batch in stream.batches(4, copy=False):
                rows += [{k: v[i].copy() for k, v in batch.items()}  # views: valid until the next batch
                         for i in range(len(batch["segment_ids"]))]
            digests[f"batches/{num_parallel}"] = records_digest(rows)
    assert len(set(digests.values())) == 1, digests
    check(f"stream/{name}", digests["records/0"])


def test_service_generator_bytes(inputs):
    tf = pytest.importorskip("tensorflow")
    from pipelines import service

    config = packer.PackConfig(**CONFIG)
    digests = []
    for num_parallel in (0, 2):
        ds = service.service_dataset(inputs["folder"], config, epochs=2, group_units=1, num_parallel=num_parallel)
        records = [{k: (v.numpy().astype(str).astype(object) if v.dtype == tf.string else v.numpy())
                    for k, v in element.items()} for element in ds]
        digests.append(records_digest(records))
    assert digests[0] == digests[1]
    check("service/folder", digests[0])
