"""Output directory: sharded writers (atomic), the rejects file, manifest.json (the commit point, written
last), and the numpy reader. Layout of a run with run id R: packed-R-00000-of-000NN.<ext>, rejects-R.jsonl,
manifest.json (naming R and listing those files). Without a run id (low-level write_shard callers):
packed-00000-of-000NN.<ext>, rejects.jsonl.

Commit protocol (docs/guarantees.md): a run writes only files whose names carry its own run id, never a name
the committed manifest lists; replacing manifest.json is the commit; only then are the files no manifest
lists removed (remove_unlisted). So every step is an object create, one overwrite (the manifest) or a
delete, as on gs://, and a reader of the old manifest gets the old files or a missing one, never new data."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import stat
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

import packer

from . import _formats, _sink
from ._formats import BATCH
from ._owner import LOCK, OutputClaim, check_owner, take_lock
from ._schema import META_PREFIX, SCHEMA_VERSION, Schema, SchemaError
from ._split import check_split, file_ranges

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
_RUN_ID = re.compile(r"^[0-9a-z]{1,32}$")
_OUR_FILE = re.compile(r"^(packed-([0-9a-z]+-)?\d{5}-of-\d{5}\.\w+|rejects(-[0-9a-z]+)?\.jsonl|manifest\.json|"
                       r"\.(packed-.*|rejects.*\.jsonl\..*|manifest\.json\..*|write-check\..*)\.tmp)$")
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


def new_run_id() -> str:
    """A fresh run id (random: it names a run's files and never appears inside them)."""
    return uuid.uuid4().hex[:12]


def _check_run_id(run_id: str | None) -> None:
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        raise SchemaError(f"run_id must be 1-32 lowercase letters or digits, got {run_id!r}")


def shard_name(index: int, num_shards: int, fmt: str, run_id: str | None = None) -> str:
    """packed-[RUN-]IIIII-of-NNNNN.<ext>."""
    extension = _formats.get(fmt).extension
    if not 0 <= index < num_shards:
        raise SchemaError(f"shard index {index} outside [0, {num_shards})")
    _check_run_id(run_id)
    return f"packed-{run_id + '-' if run_id else ''}{index:05d}-of-{num_shards:05d}.{extension}"


def rejects_name(run_id: str | None = None) -> str:
    """rejects-RUN.jsonl (rejects.jsonl without a run id)."""
    _check_run_id(run_id)
    return f"rejects-{run_id}.jsonl" if run_id else REJECTS


def rejects_path(directory: str, manifest: Mapping[str, Any] | None = None) -> str:
    """The path of a packed dataset's rejects file (the manifest's `rejects`, else rejects.jsonl)."""
    manifest = read_manifest(directory) if manifest is None else manifest
    return os.path.join(directory, manifest.get("rejects", REJECTS))


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
    """Create `path`; if it holds files, refuse (OutputDirError) unless overwrite. Nothing is removed
    here: a committed dataset stays readable until the new run's manifest replaces it, and the files no
    manifest lists go after that (remove_unlisted). The owner's lock (claim_output) is not content."""
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


def remove_unlisted(directory: str, manifest: Mapping[str, Any]) -> list[str]:
    """After a commit: remove this tool's files that `manifest` does not list (an older run's shards and
    rejects, a dead run's leftovers and temporaries); returns their names. Call it only while owning the folder."""
    keep = {MANIFEST, manifest.get("rejects", REJECTS)} | {s["file"] for s in manifest["shards"]}
    gone = sorted(e for e in os.listdir(directory) if _OUR_FILE.match(e) and e not in keep)
    for e in gone:
        _remove_quietly(os.path.join(directory, e))
    return gone


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256_fd(f.fileno())


def _sha256_fd(fd: int) -> str:
    """sha256 of the whole file open as `fd` (pread: the fd's offset is left alone)."""
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        offset += len(chunk)


class _HashingFile:
    """A binary file that hashes what is written through it (write_shard: sha256 without re-reading)."""

    def __init__(self, f):
        self.f, self.hash, self.pos, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        n = self.f.write(data)
        self.hash.update(memoryview(data)[:n])
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True  # the underlying file is closed by write_shard

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False


def _atomic_path(directory: str, name: str) -> str:
    """Create an empty `.{name}.<random>.tmp` (_create_empty); returns its path."""
    path = _temporary_name(directory, name)
    _create_empty(path)
    return path


def _temporary_name(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


def _create_empty(path: str) -> None:
    """An empty file with the mode the umask gives a normally created file (mkstemp's 0600 would make the
    dataset unreadable to other accounts)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


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


def _write_records(target: Any, fmt: str, records: Iterable[Any], schema: Schema) -> int:
    """Records (dicts), or for formats stored record by record also their encoded bytes (RecordEncoder's
    output, e.g. from fill workers; a packer.SharedBytes goes as it is to a FramedFile, which sends it by
    location), written in order to `target` (a path, or a file for formats that stream)."""
    form = _formats.get(fmt)
    if form.write_encoded is None:
        return form.write(target, _batches(records, schema), schema)
    encode = _formats.RecordEncoder(fmt, schema)
    by_location = isinstance(target, _sink.FramedFile)

    def data(r: Any) -> Any:
        if isinstance(r, packer.SharedBytes):
            return r if by_location else r.view
        return r if isinstance(r, (bytes, memoryview)) else encode(r)

    return form.write_encoded(target, map(data, records))


def write_shard(directory: str, index: int, num_shards: int, fmt: str, records: Iterable[Mapping[str, np.ndarray]], *,
                seq_len: int, token_dim: int, max_images_per_seq: int, meta_fields: Sequence[str] = (),
                run_id: str | None = None) -> dict:
    """Write one shard atomically (temporary name, then rename; named for `run_id`, shard_name); returns
    {file, num_sequences, sha256}, the sha256 taken as the bytes are written (by a schemas._sink child that
    also writes and fsyncs them, where the platform has /dev/fd). Every record is validated first (RecordError names the field).
    For TFRecord and ArrayRecord an item may also be a record already encoded (schemas.record_encoder's bytes)."""
    schema = Schema(seq_len, token_dim, max_images_per_seq, tuple(meta_fields))
    name = shard_name(index, num_shards, fmt, run_id)
    with _atomic(directory, name) as tmp:
        if _sink.AVAILABLE:
            n, digest = _write_through_sink(tmp, fmt, records, schema)
        elif _formats.get(fmt).streams:
            with open(tmp, "wb") as f:
                hashing = _HashingFile(f)
                n = _write_records(hashing, fmt, records, schema)
                f.flush()
                os.fsync(f.fileno())
            digest = hashing.hash.hexdigest()
        else:
            n = _write_records(tmp, fmt, records, schema)
            digest = sha256_file(tmp)
    return {"file": name, "num_sequences": n, "sha256": digest}


def _write_through_sink(tmp: str, fmt: str, records: Iterable[Any], schema: Schema) -> tuple[int, str]:
    """(records, sha256) of `tmp` written by a ShardSink child: this process only fills the pipe, and records
    in a fill pool's shared memory (packer.SharedBytes) go by location where the format writes them as they
    are. A write that fails in the child (a full disk) raises the child's OSError, not the broken pipe it left here."""
    form = _formats.get(fmt)
    records = iter(records)
    first = next(records, None)
    shared = first.fd if isinstance(first, packer.SharedBytes) and form.streams and form.write_encoded else None
    if first is not None:
        records = itertools.chain([first], records)
    sink = _sink.ShardSink(tmp, shared)
    try:
        try:
            n = _write_records(sink.file() if form.streams else sink.path, fmt, records, schema)
            digest, _ = sink.finish()
        except OSError as e:
            failure = sink.failure()  # a broken pipe here means the child failed: say why
            if failure is None:
                raise
            raise failure from e
        return n, digest
    finally:
        sink.close()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_text_atomic(directory: str, name: str, text: str, owner: str | None = None) -> None:
    """Write `name` under a temporary name, then rename; with `owner`, check the folder is still owned
    by that token just before the rename (schemas._owner.OwnershipLost otherwise)."""
    with _atomic(directory, name, owner) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _atomic(directory: str, name: str, owner: str | None = None) -> Iterator[str]:
    """A temporary path to write `name` at: renamed to `name` when the block ends (after checking that
    `owner`, if given, still owns the folder), removed when it fails; OSErrors become OutputWriteError."""
    tmp = _temporary_name(directory, name)
    try:  # created inside the try: an interrupt right after the creation still removes it
        _create_empty(tmp)
        yield tmp
        if owner is not None:
            check_owner(directory, owner)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, SchemaError):
            raise _write_failed(directory, e) from e
        raise


def write_rejects(directory: str, rejects: Iterable[Mapping[str, Any]], run_id: str | None = None) -> int:
    """rejects-RUN.jsonl (rejects.jsonl without a run id): one JSON object per rejected input, each with at
    least `key` and `reason`. Returns their count."""
    lines = []
    for r in rejects:
        if "key" not in r or "reason" not in r:
            raise SchemaError(f"a reject needs 'key' and 'reason', got {dict(r)!r}")
        lines.append(json.dumps(dict(r), sort_keys=True, default=str))
    _write_text_atomic(directory, rejects_name(run_id), "".join(line + "\n" for line in lines))
    return len(lines)


def _sniff_meta_fields(directory: str, fmt: str, shard: str) -> tuple[str, ...]:
    """Meta field names as stored in a shard (for writers that did not pass them to write_manifest)."""
    names = _formats.get(fmt).field_names(os.path.join(directory, shard))
    return tuple(sorted(n[len(META_PREFIX):] for n in names if n.startswith(META_PREFIX)))


def write_manifest(directory: str, *, fmt: str, config: Any, num_images_in: int, num_images_packed: int,
                   num_rejected: int, num_sequences: int, tokens_real: int, tokens_padding: int, shards: list,
                   meta_fields: Sequence[str] | None = None, extra: Mapping[str, Any] | None = None,
                   owner: str | None = None, run_id: str | None = None) -> dict:
    """Write manifest.json (last, replaced atomically: the commit point). `config` is a PackConfig or its
    to_json() dict; meta_fields default to those stored in the first shard; with `owner` (a claim's
    token, claim_output) it is written only if the folder is still that run's; with `run_id` it names the
    run (`run_id`, `rejects`: rejects-RUN.jsonl) and every shard must carry it. Returns the manifest."""
    _formats.get(fmt)
    config_json = config.to_json() if hasattr(config, "to_json") else dict(config)
    _check_run_id(run_id)
    for s in shards:
        problem = _bad_shard_name(s.get("file"), run_id)
        if problem:
            raise SchemaError(problem)
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
        **({"run_id": run_id, "rejects": rejects_name(run_id)} if run_id else {}),
        **schema.to_json(),
        **dict(extra or {}),
    }
    _write_text_atomic(directory, MANIFEST, json.dumps(manifest, indent=2) + "\n", owner)
    return manifest


def write_dataset(directory: str, records: Iterable[Mapping[str, np.ndarray]], *, config: Any, fmt: str = "tfrecord",
                  num_shards: int = 1, rejects: Iterable[Mapping[str, Any]] = (), num_images_in: int | None = None,
                  meta_fields: Sequence[str] = (), overwrite: bool = False, run_id: str | None = None) -> dict:
    """Single-process convenience: records split into `num_shards` contiguous shards (order kept),
    rejects, then the manifest (the commit), then the replaced dataset's files are removed. The files are
    named for `run_id` (default: a fresh one, new_run_id). Returns the manifest."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise SchemaError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    config_json = config.to_json() if hasattr(config, "to_json") else dict(config)
    schema = Schema.from_config(config_json, meta_fields)
    with claim_output(directory, overwrite) as claim:
        manifest = _write_dataset(directory, list(records), list(rejects), config_json, schema, fmt, num_shards,
                                  num_images_in, claim.token, run_id or new_run_id())
        remove_unlisted(directory, manifest)
        return manifest


def _write_dataset(directory: str, records: list, rejects: list, config_json: dict, schema: Schema, fmt: str,
                   num_shards: int, num_images_in: int | None, owner: str, run_id: str) -> dict:
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    shards = [write_shard(directory, i, num_shards, fmt, records[bounds[i]:bounds[i + 1]], seq_len=schema.seq_len,
                          token_dim=schema.token_dim, max_images_per_seq=schema.max_images_per_seq,
                          meta_fields=schema.meta_fields, run_id=run_id)
              for i in range(num_shards)]
    num_rejected = write_rejects(directory, rejects, run_id)
    packed = sum(int(r["num_images"]) for r in records)
    real = sum(int(np.count_nonzero(r["segment_ids"])) for r in records)
    return write_manifest(directory, fmt=fmt, config=config_json,
                          num_images_in=packed + num_rejected if num_images_in is None else num_images_in,
                          num_images_packed=packed, num_rejected=num_rejected, num_sequences=len(records),
                          tokens_real=real, tokens_padding=len(records) * schema.seq_len - real, shards=shards,
                          meta_fields=schema.meta_fields, owner=owner, run_id=run_id)


def _bad_shard_name(name: Any, run_id: str | None) -> str | None:
    """Why `name` cannot be a shard of run `run_id` (None when it can): a plain file name of this folder,
    carrying the run id when the manifest has one."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"shard file name {name!r} is not a plain file name inside the folder"
    if run_id is not None and not name.startswith(f"packed-{run_id}-"):
        return f"shard {name!r} is not a file of run {run_id} (another run's shard)"
    return None


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
    run_id = manifest.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        raise ManifestError(f"{path} has a bad run_id {run_id!r}")
    if not isinstance(manifest["shards"], list) or not all(isinstance(s, dict) for s in manifest["shards"]):
        raise ManifestError(f"{path}: shards is not a list of objects")
    for s in manifest["shards"]:
        problem = _bad_shard_name(s.get("file"), run_id)
        if problem:
            raise ManifestError(f"{path}: {problem}")
    if _bad_shard_name(manifest.get("rejects", REJECTS), None):
        raise ManifestError(f"{path}: rejects file name {manifest['rejects']!r} is not a plain file name inside the folder")
    return manifest


def _check_sha(directory: str, shard: Mapping[str, Any]) -> str:
    """Check a shard's sha256 by its path (tf_dataset's TensorFlow readers, which open by name); the path.
    Readers that can, read through open_shard instead (the hash and the records from one open file)."""
    with open_shard(directory, shard):
        return os.path.join(directory, shard["file"])


class OpenShard:
    """A shard file opened once: `path` names this open file (/proc/self/fd/N), so a reader given it reads
    the very bytes that were hashed even if the name is removed or replaced meanwhile; `name` its file name."""

    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd
        self.path = _fd_path(fd)


def _fd_path(fd: int) -> str:
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    raise OSError(f"no /proc/self/fd or /dev/fd on this system to read shard {fd} by descriptor")


@contextmanager
def open_shard(directory: str, shard: Mapping[str, Any], check_sha256: bool = True) -> Iterator[OpenShard]:
    """Open a manifest shard once, check its sha256 on that open file (check_sha256), yield an OpenShard to
    read it from; CorruptShard when missing, not a regular file or its hash differs."""
    name = shard["file"]
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CorruptShard(name, "file is missing") from None
    except OSError as e:
        raise CorruptShard(name, f"cannot be opened: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptShard(name, "is not a regular file")
        if check_sha256:
            got = _sha256_fd(fd)
            if got != shard["sha256"]:
                raise CorruptShard(name, f"sha256 {got} differs from the manifest's {shard['sha256']} "
                                         "(truncated, modified, corrupt or another run's)")
        yield OpenShard(name, fd)
    finally:
        os.close(fd)


def iter_shard(path: str, fmt: str, schema: Schema, *, full_validation: bool = False,
               name: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Records of one shard file, in batches; any decode failure is raised as CorruptShard(name, by default
    the file's name)."""
    name = name or os.path.basename(path)
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
    arrays), shards in manifest order. Each shard is opened once; its sha256 is checked on that open file
    before its records are read from it, and its record count after, so a corrupt, truncated or replaced
    shard raises CorruptShard naming it (a reader racing an overwrite gets the old data or that error).

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
            with open_shard(directory, shard, check_sha256) as opened:
                n = 0
                for r in iter_shard(opened.path, fmt, schema, name=opened.name):
                    if n >= first:
                        yield r
                    n += 1
                    if n == end < shard["num_sequences"]:
                        break
            if n != end:
                raise CorruptShard(shard["file"], f"holds {n} records, the manifest says {shard['num_sequences']}")

    return records()
