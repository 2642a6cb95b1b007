"""Write and read throughput of each output format (TFRecord, Arrow IPC, Parquet, ArrayRecord).

The same packed records (real packer output from random-pixel images, so nothing compresses) are
written as one dataset per format with schemas.write_dataset, then read back with schemas.read (numpy,
sha256 checked) and with schemas.tf_dataset (tf.data, batched). MB/s counts the records' in-memory
payload (every field's array bytes), so formats compare on the same numerator; the file size on disk
is reported beside it. Ratios are to TFRecord measured in the same run.

    python -m benchmarks.formats [--sequences 256] [--seq-len 256] [--patch-size 16] [--json PATH]
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

import packer
import schemas
from benchmarks import record_args
from . import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "formats.json")


def make_records(sequences: int, seq_len: int, patch_size: int, seed: int = 0) -> tuple[packer.PackConfig, list]:
    """`sequences` packed records from synthetic PatchedImages (random pixels and token counts)."""
    config = packer.PackConfig(seq_len=seq_len, patch_size=patch_size)
    rng = np.random.default_rng(seed)

    def images():
        for i in itertools.count():
            gh, gw = (int(v) for v in rng.integers(2, max(3, int(seq_len ** 0.5)), 2))
            n = gh * gw
            pos = np.arange(n, dtype=np.int32)
            yield packer.PatchedImage(key=f"synthetic/{i:07d}.jpg", patches=rng.integers(0, 256, (n, config.token_dim), np.uint8),
                                      pos_y=pos // gw, pos_x=pos % gw, grid_h=gh, grid_w=gw, orig_h=gh * 37, orig_w=gw * 41,
                                      drop_rate=0.0, label=i % 1000, meta={"caption": f"a synthetic image number {i}"})

    return config, list(itertools.islice(packer.pack_patched(images(), config, ("caption",)), sequences))


def _timed(fn) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(sequences: int = 256, seq_len: int = 256, patch_size: int = 16, num_shards: int = 4,
        formats: tuple[str, ...] = tuple(schemas.FORMATS)) -> dict:
    config, records = make_records(sequences, seq_len, patch_size)
    payload = sum(sum(np.asarray(v).nbytes if np.asarray(v).dtype != object else sum(len(s.encode()) for s in v)
                      for v in r.values()) for r in records)
    import tensorflow as tf  # imported before timing so no format pays for it

    tf.constant(0)
    rows = []
    root = tempfile.mkdtemp(prefix="navit-formats-")
    try:
        for fmt in formats:
            d = os.path.join(root, fmt)
            w, _ = _timed(lambda: schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=num_shards,
                                                        meta_fields=("caption",)))
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("packed-"))
            r, n = _timed(lambda: sum(1 for _ in schemas.read(d)))
            assert n == sequences
            t, n = _timed(lambda: sum(int(b["num_images"].shape[0]) for b in schemas.tf_dataset(d).batch(32)))
            assert n == sequences
            v, _ = _timed(lambda: schemas.verify(d))
            rows.append({"format": fmt, "file_mb": size / 1e6, "write_s": w, "read_s": r, "tf_read_s": t, "verify_s": v,
                         "write_mb_s": payload / 1e6 / w, "write_seq_s": sequences / w,
                         "read_mb_s": payload / 1e6 / r, "read_seq_s": sequences / r,
                         "tf_read_mb_s": payload / 1e6 / t, "tf_read_seq_s": sequences / t})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = next((row for row in rows if row["format"] == "tfrecord"), rows[0])
    for row in rows:
        for k in ("write_mb_s", "read_mb_s", "tf_read_mb_s"):
            row[k.replace("_mb_s", "_vs_tfrecord")] = row[k] / base[k]
    return {"sequences": sequences, "seq_len": seq_len, "patch_size": patch_size, "num_shards": num_shards,
            "payload_mb": payload / 1e6, "rows": rows}


def table(result: dict) -> str:
    head = (f"{result['sequences']} sequences, L={result['seq_len']}, P={result['patch_size']}, "
            f"{result['num_shards']} shards, payload {result['payload_mb']:.1f} MB\n\n"
            "| format | file MB | write MB/s | write seq/s | read MB/s | read seq/s | tf.data MB/s | tf.data seq/s "
            "| verify s | write / read / tf.data vs TFRecord |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['format']} | {r['file_mb']:.1f} | {r['write_mb_s']:.0f} | {r['write_seq_s']:.0f} | {r['read_mb_s']:.0f} | "
             f"{r['read_seq_s']:.0f} | {r['tf_read_mb_s']:.0f} | {r['tf_read_seq_s']:.0f} | {r['verify_s']:.2f} | "
             f"{r['write_vs_tfrecord']:.2f}x / {r['read_vs_tfrecord']:.2f}x / {r['tf_read_vs_tfrecord']:.2f}x |"
             for r in result["rows"]]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = record_args(__doc__.split("\n\n")[0], DEFAULT_JSON, "python -m benchmarks.formats")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--formats", nargs="+", default=list(schemas.FORMATS), choices=list(schemas.FORMATS))
    args = parser.parse_args(argv)
    result = run(args.sequences, args.seq_len, args.patch_size, args.num_shards, tuple(args.formats))
    print(table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
