"""`verify(dir)`: every shard against the manifest (presence, sha256, record count) and every record's
integrity (TFRecord CRCs, ArrayRecord chunk hashes, Arrow full validation, Parquet page checksums, schema
and cross-field checks)."""
from __future__ import annotations

import dataclasses
import json
import os
import re

from ._io import MANIFEST, CorruptShard, iter_shard, open_shard, read_manifest, rejects_path
from ._schema import RecordError, Schema, SchemaError, check_consistency

_SHARD = re.compile(r"^packed-([0-9a-z]+-)?\d{5}-of-\d{5}\.\w+$")


class VerificationError(SchemaError):
    """verify() found problems; `.problems` is a list of (file, detail), `.shards` the bad shard names."""

    def __init__(self, directory: str, problems: list[tuple[str, str]]):
        self.problems = problems
        self.shards = sorted({f for f, _ in problems if _SHARD.match(f)})
        lines = "\n".join(f"  {f}: {d}" for f, d in problems)
        super().__init__(f"{directory}: {len(problems)} problem(s); bad shards: {', '.join(self.shards) or 'none'}\n{lines}")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    directory: str
    format: str
    num_shards: int
    num_sequences: int
    num_images: int
    tokens_real: int
    warnings: tuple[str, ...] = ()


def verify(directory: str, *, deep: bool = True) -> VerifyReport:
    """Check a packed dataset; returns a VerifyReport, or raises VerificationError naming every bad shard
    (ManifestMissing / ManifestError when there is no usable manifest). deep=False: sha256 only."""
    manifest = read_manifest(directory)
    schema = Schema.from_manifest(manifest)
    fmt = manifest["format"]
    problems: list[tuple[str, str]] = []
    seqs = images = real = 0
    for shard in manifest["shards"]:
        name = shard["file"]
        try:
            with open_shard(directory, shard) as opened:  # the hash and the records from one open file
                if not deep:
                    seqs += shard["num_sequences"]
                    continue
                n = 0
                for record in iter_shard(opened.path, fmt, schema, full_validation=True, name=name):
                    try:
                        schema.validate(record)
                        check_consistency(record, schema)
                    except RecordError as e:
                        raise CorruptShard(name, f"record {n}: {e}") from e
                    n += 1
                    images += int(record["num_images"])
                    real += int((record["segment_ids"] > 0).sum())
            if n != shard["num_sequences"]:
                raise CorruptShard(name, f"holds {n} records, the manifest says {shard['num_sequences']}")
            seqs += n
        except CorruptShard as e:
            problems.append((name, e.detail))
    if not problems:
        if seqs != manifest["num_sequences"]:
            problems.append((MANIFEST, f"shards hold {seqs} sequences, num_sequences is {manifest['num_sequences']}"))
        if deep:
            for key, got in (("num_images_packed", images), ("tokens_real", real)):
                if key in manifest and manifest[key] != got:
                    problems.append((MANIFEST, f"records hold {key}={got}, the manifest says {manifest[key]}"))
    rejects = rejects_path(directory, manifest)
    rejects_file = os.path.basename(rejects)
    if "rejects" in manifest and not os.path.isfile(rejects):
        problems.append((rejects_file, "missing (the manifest names it)"))
    elif os.path.isfile(rejects) and "num_rejected" in manifest:
        try:
            with open(rejects, encoding="utf-8") as f:
                entries = [json.loads(line) for line in f if line.strip()]
            if len(entries) != manifest["num_rejected"] or not all("key" in e and "reason" in e for e in entries):
                problems.append((rejects_file, f"{len(entries)} entries (each needs key and reason); num_rejected is "
                                          f"{manifest['num_rejected']}"))
        except ValueError as e:
            problems.append((rejects_file, f"not valid JSON lines: {e}"))
    if problems:
        raise VerificationError(directory, problems)
    listed = {s["file"] for s in manifest["shards"]}
    entries = os.listdir(directory)
    warnings = tuple([f"{e}: shard file not listed in the manifest" for e in sorted(entries)
                      if _SHARD.match(e) and e not in listed] +
                     [f"{e}: leftover temporary file (an interrupted writer)" for e in sorted(entries)
                      if e.startswith(".") and e.endswith(".tmp")])
    return VerifyReport(directory, fmt, len(manifest["shards"]), seqs, images, real, warnings)
