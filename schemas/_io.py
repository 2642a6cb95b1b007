"""Output directory: sharded writers (atomic), rejects.jsonl, manifest.json (written last), and the
numpy reader. Layout: packed-00000-of-000NN.<ext>, rejects.jsonl, manifest.json."""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import _formats
from ._formats import BATCH
from ._owner import LOCK, OutputClaim, check_owner, take_lock
from ._schema import META_PREFIX, SCHEMA_VERSION, Schema, SchemaError
from ._split import check_split, file_ranges

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
_OUR_FILE = re.compile(r"^(packed-\d{5}-of-\d{5}\.\w+|rejects\.jsonl|manifest\.json|"
                       r"\.(packed-.*|rejects\.jsonl\..*|manifest\.json\..*|write-check\..*)\.tmp)$")
_REQUIRED = ("schema_version", "format", "config", "num_sequences", "shards", "seq_len", "token_dim", "max_images")


class OutputDirError(SchemaError):
    """The output directory is not empty (and overwrite was not asked for) or is not a directory."""


class OutputWriteError(SchemaError, OSError):
    """Writing the output failed (disk full, file too large, I/O error): one line naming the output and
    the OS error. What was being written is removed; no manifest is written, so readers refuse the folder."""


class ManifestMissing(SchemaError, FileNotFoundError):
    """The directory has no manifest.json: not a packed dataset, or its writing did not finish."""


class ManifestError(SchemaError):
    """manifest.json is unreadable or lacks required keys."""


class CorruptShard(SchemaError):
    """A shard is missing, truncated or corrupt (checksum, CRC, structure or count mismatch)."""

    def __init__(self, shard: str, detail: str):
        super().__init__(f"corrupt shard {shard}: {detail}")
        self.shard = shard
        self.detail = detail


def shard_name(index: int, num_shards: int, fmt: str) -> str:
    extension = _formats.get(fmt).extension
    if not 0 <= index < num_shards:
        raise SchemaError(f"shard index {index} outside [0, {num_shards})")
    return f"packed-{index:05d}-of-{num_shards:05d}.{extension}"


def _make_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None


def claim_output(path: str, overwrite: bool = False, *, command: str | None = None) -> OutputClaim:
    """Take ownership of output folder `path` before touching its contents (schemas._owner: OutputLocked
    names a live owner, even with overwrite), then prepare it (prepare_output_dir). The caller passes
    `owner=claim.token` to write_manifest and calls claim.release() at the end, success or failure."""
    _make_dir(path)
    try:
        claim = take_lock(path, command=command)
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None
    try:
        prepare_output_dir(path, overwrite)
    except BaseException:
        claim.release()
        raise
    return claim


def prepare_output_dir(path: str, overwrite: bool = False) -> None:
    """Create `path`; if it holds files, refuse (OutputDirError) unless overwrite, in which case remove
    this tool's outputs (manifest first, so a half-cleaned directory never looks complete). The owner's
    lock (claim_output) is not counted as content."""
    _make_dir(path)
    try:
        os.remove(_atomic_path(path, "write-check"))
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None
    entries = [e for e in os.listdir(path) if not e.startswith(LOCK)]
    if not entries:
        return
    if not overwrite:
        raise OutputDirError(f"output directory {path} is not empty ({len(entries)} entries); pass overwrite "
                             "(--overwrite) to replace its contents")
    ours = sorted((e for e in entries if _OUR_FILE.match(e)), key=lambda e: e != MANIFEST)
    for e in ours:
        os.remove(os.path.join(path, e))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_path(directory: str, name: str) -> str:
    """Create an empty `.{name}.<random>.tmp` with the mode the umask gives a normally created file
    (mkstemp's 0600 would make the dataset unreadable to other accounts); returns its path."""
    path = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


def _write_failed(directory: str, e: OSError) -> OutputWriteError:
    return OutputWriteError(f"cannot write the output {directory}: {e.strerror or e}"
                            + (f" ({os.path.basename(e.filename)})" if getattr(e, "filename", None) else ""))


def _batches(records: Iterable[Mapping[str, np.ndarray]], schema: Schema) -> Iterator[list]:
    batch = []
    for r in records:
        schema.validate(r)
        batch.append(r)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_records(path: str, fmt: str, records: Iterable[Any], schema: Schema) -> int:
    """Records (dicts), or for formats stored record by record also their encoded bytes (RecordEncoder's
    output, e.g. from fill workers), written in order."""
    form = _formats.get(fmt)
    if form.write_encoded is None:
        return form.write(path, _batches(records, schema), schema)
    encode = _formats.RecordEncoder(fmt, schema)
    return form.write_encoded(path, (r if isinstance(r, (bytes, memoryview)) else encode(r) for r in records))


def write_shard(directory: str, index: int, num_shards: int, fmt: str, records: Iterable[Mapping[str, np.ndarray]], *,
                seq_len: int, token_dim: int, max_images_per_seq: int, meta_fields: Sequence[str] = ()) -> dict:
    """Write one shard atomically (temporary name, then rename); returns {file, num_sequences, sha256}.
    Every record is validated against the schema first (RecordError names the bad field). For TFRecord
    and ArrayRecord an item may also be a record already encoded (schemas.record_encoder's bytes)."""
    schema = Schema(seq_len, token_dim, max_images_per_seq, tuple(meta_fields))
    name = shard_name(index, num_shards, fmt)
    tmp = _atomic_path(directory, name)
    try:
        n = _write_records(tmp, fmt, records, schema)
        digest = sha256_file(tmp)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, SchemaError):
            raise _write_failed(directory, e) from e
        raise
    return {"file": name, "num_sequences": n, "sha256": digest}


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_text_atomic(directory: str, name: str, text: str, owner: str | None = None) -> None:
    """Write `name` under a temporary name, then rename; with `owner`, check the folder is still owned
    by that token just before the rename (schemas._owner.OwnershipLost otherwise)."""
    try:
        tmp = _atomic_path(directory, name)
    except OSError as e:
        raise _write_failed(directory, e) from e
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if owner is not None:
            check_owner(directory, owner)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, SchemaError):
            raise _write_failed(directory, e) from e
        raise


def write_rejects(directory: str, rejects: Iterable[Mapping[str, Any]]) -> int:
    """rejects.jsonl: one JSON object per rejected input, each with at least `key` and `reason`."""
    lines = []
    for r in rejects:
        if "key" not in r or "reason" not in r:
            raise SchemaError(f"a reject needs 'key' and 'reason', got {dict(r)!r}")
        lines.append(json.dumps(dict(r), sort_keys=True, default=str))
    _write_text_atomic(directory, REJECTS, "".join(line + "\n" for line in lines))
    return len(lines)


def _sniff_meta_fields(directory: str, fmt: str, shard: str) -> tuple[str, ...]:
    """Meta field names as stored in a shard (for writers that did not pass them to write_manifest)."""
    names = _formats.get(fmt).field_names(os.path.join(directory, shard))
    return tuple(sorted(n[len(META_PREFIX):] for n in names if n.startswith(META_PREFIX)))


def write_manifest(directory: str, *, fmt: str, config: Any, num_images_in: int, num_images_packed: int,
                   num_rejected: int, num_sequences: int, tokens_real: int, tokens_padding: int, shards: list,
                   meta_fields: Sequence[str] | None = None, extra: Mapping[str, Any] | None = None,
                   owner: str | None = None) -> dict:
    """Write manifest.json (last: its presence marks the dataset complete). `config` is a PackConfig or its
    to_json() dict; meta_fields default to those stored in the first shard; with `owner` (a claim's
    token, claim_output) it is written only if the folder is still that run's. Returns the manifest."""
    _formats.get(fmt)
    config_json = config.to_json() if hasattr(config, "to_json") else dict(config)
    shards = sorted((dict(s) for s in shards), key=lambda s: s["file"])
    if sum(s["num_sequences"] for s in shards) != num_sequences:
        raise SchemaError(f"shards hold {sum(s['num_sequences'] for s in shards)} sequences, expected {num_sequences}")
    if meta_fields is None:
        meta_fields = _sniff_meta_fields(directory, fmt, shards[0]["file"]) if shards else ()
    schema = Schema.from_config(config_json, meta_fields)
    total = tokens_real + tokens_padding
    manifest = {
        "schema_version": SCHEMA_VERSION, "format": fmt, "config": config_json,
        "num_images_in": int(num_images_in), "num_images_packed": int(num_images_packed),
        "num_rejected": int(num_rejected), "num_sequences": int(num_sequences),
        "tokens_real": int(tokens_real), "tokens_padding": int(tokens_padding),
        "efficiency": tokens_real / total if total else 0.0,
        "shards": shards,
        **schema.to_json(),
        **dict(extra or {}),
    }
    _write_text_atomic(directory, MANIFEST, json.dumps(manifest, indent=2) + "\n", owner)
    return manifest


def write_dataset(directory: str, records: Iterable[Mapping[str, np.ndarray]], *, config: Any, fmt: str = "tfrecord",
                  num_shards: int = 1, rejects: Iterable[Mapping[str, Any]] = (), num_images_in: int | None = None,
                  meta_fields: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Single-process convenience: records split into `num_shards` contiguous shards (order kept),
    rejects, then the manifest. Returns the manifest."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise SchemaError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    config_json = config.to_json() if hasattr(config, "to_json") else dict(config)
    schema = Schema.from_config(config_json, meta_fields)
    with claim_output(directory, overwrite) as claim:
        return _write_dataset(directory, list(records), list(rejects), config_json, schema, fmt, num_shards,
                              num_images_in, claim.token)


def _write_dataset(directory: str, records: list, rejects: list, config_json: dict, schema: Schema, fmt: str,
                   num_shards: int, num_images_in: int | None, owner: str) -> dict:
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    shards = [write_shard(directory, i, num_shards, fmt, records[bounds[i]:bounds[i + 1]], seq_len=schema.seq_len,
                          token_dim=schema.token_dim, max_images_per_seq=schema.max_images_per_seq, meta_fields=schema.meta_fields)
              for i in range(num_shards)]
    num_rejected = write_rejects(directory, rejects)
    packed = sum(int(r["num_images"]) for r in records)
    real = sum(int(np.count_nonzero(r["segment_ids"])) for r in records)
    return write_manifest(directory, fmt=fmt, config=config_json,
                          num_images_in=packed + num_rejected if num_images_in is None else num_images_in,
                          num_images_packed=packed, num_rejected=num_rejected, num_sequences=len(records),
                          tokens_real=real, tokens_padding=len(records) * schema.seq_len - real, shards=shards,
                          meta_fields=schema.meta_fields, owner=owner)


def read_manifest(directory: str) -> dict:
    """The parsed manifest; ManifestMissing if absent, ManifestError if unreadable or incomplete."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestMissing(f"{directory} has no {MANIFEST}: not a navit-pack output, or its writing did not finish")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable: {e}") from e
    missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks keys {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema_version {manifest['schema_version']}; this reader reads {SCHEMA_VERSION}")
    if not isinstance(manifest["format"], str) or manifest["format"] not in _formats.REGISTRY:
        raise ManifestError(f"{path} has unknown format {manifest['format']!r}")
    return manifest


def _check_sha(directory: str, shard: Mapping[str, Any]) -> str:
    path = os.path.join(directory, shard["file"])
    if not os.path.isfile(path):
        raise CorruptShard(shard["file"], "file is missing")
    got = sha256_file(path)
    if got != shard["sha256"]:
        raise CorruptShard(shard["file"], f"sha256 {got} differs from the manifest's {shard['sha256']} "
                                          "(truncated, modified or corrupt)")
    return path


def iter_shard(path: str, fmt: str, schema: Schema, *, full_validation: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Records of one shard file, in batches; any decode failure is raised as CorruptShard(file)."""
    name = os.path.basename(path)
    reader = _formats.get(fmt).read
    try:
        yield from reader(path, schema, full_validation)
    except CorruptShard:
        raise
    except GeneratorExit:
        raise
    except Exception as e:  # noqa: BLE001 - every library error on a shard means a bad shard
        raise CorruptShard(name, f"{type(e).__name__}: {e}") from e


def shard_paths(directory: str, manifest: Mapping[str, Any]) -> list[str]:
    return [os.path.join(directory, s["file"]) for s in manifest["shards"]]


def read(directory: str, *, shard_index: int = 0, shard_count: int = 1,
         check_sha256: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Every record of a packed dataset as numpy dicts (packer dtypes; image_keys/meta as str object
    arrays), shards in manifest order. Each shard's sha256 is checked before its records are returned,
    and its record count after, so a corrupt or truncated shard raises CorruptShard naming it.

    With shard_count > 1, only reader `shard_index`'s contiguous share of the records (schemas._split:
    global records [k·N // C, (k+1)·N // C)); files holding none of it are neither opened nor hashed, and
    a file left before its end has its count checked only by its sha256."""
    shard_index, shard_count = check_split(shard_index, shard_count)
    manifest = read_manifest(directory)
    schema = Schema.from_manifest(manifest)
    fmt = manifest["format"]
    shards = manifest["shards"]

    def records() -> Iterator[dict[str, np.ndarray]]:
        for i, first, end in file_ranges([int(s["num_sequences"]) for s in shards], shard_index, shard_count):
            shard = shards[i]
            path = _check_sha(directory, shard) if check_sha256 else os.path.join(directory, shard["file"])
            n = 0
            for r in iter_shard(path, fmt, schema):
                if n >= first:
                    yield r
                n += 1
                if n == end < shard["num_sequences"]:
                    break
            if n != end:
                raise CorruptShard(shard["file"], f"holds {n} records, the manifest says {shard['num_sequences']}")

    return records()
