"""The run journal of a local `navit-pack pack`: what the run has finished, so `--resume` continues it.

It lives in the output folder, in `.navit-pack-journal/`: `run.json` ({run_id, options, inputs, shards}:
the options that decide the bytes, a digest of the input's listing, the run's shard count), written once
the input is listed; then one `group-EEEEE-GGGGG.json` per finished packing group ({summary, rejects},
the shards' names and sha256 inside the summary), written after that group's shards are renamed. Every
file is written whole under a temporary name and renamed. The journal goes after the manifest commits.

A resumed run plans again (planning reads headers only) and skips the fill of every group whose
recorded shards are all there with their recorded sha256; the rest are filled and written as before,
so the output is byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Optional

JOURNAL = ".navit-pack-journal"


class ResumeRefused(ValueError):
    """`--resume` asked for with other options or another input than the interrupted run's (one line)."""


def job_options(job) -> dict:
    """The options of `job` that decide its output's bytes, by flag name (run_id, owner, tmp_dir excluded)."""
    options = {"--input": job.input, "--format": job.fmt, "--num-shards": job.num_shards or "auto",
               "--epochs": job.epochs, "--group-size": job.group_size, "--labels": job.labels,
               "--meta-fields": ",".join(job.meta_fields), "--max-reject-fraction": job.max_reject_fraction}
    options.update({"--" + k.replace("_", "-"): v for k, v in job.config.to_json().items()})
    return json.loads(json.dumps(options))  # as the journal will read back (tuples -> lists)


def listing_digest(keys, labels, metas, heights, widths, rejects: dict, header_rejects: dict) -> str:
    """sha256 of what planning reads from the input: every record's key, label, metadata, header size and
    rejection (the local runner's Listing)."""
    h = hashlib.sha256()
    for i, key in enumerate(keys):
        h.update(json.dumps([key, labels[i], metas[i], int(heights[i]), int(widths[i]), rejects.get(i),
                             header_rejects.get(i)], sort_keys=True, default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def _dir(output: str) -> str:
    return os.path.join(output, JOURNAL)


def _write(output: str, name: str, value: Any) -> None:
    """Write one journal file whole (temporary name, then rename); OutputWriteError when that fails."""
    import schemas

    path = os.path.join(_dir(output), name)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise schemas.OutputWriteError(f"cannot write the output {output}: {e.strerror or e} ({JOURNAL})") from e
        raise


def load(output: str) -> Optional[dict]:
    """The interrupted run's run.json, or None when the folder records none (or an unreadable one)."""
    try:
        with open(os.path.join(_dir(output), "run.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "run_id" in state else None


def check_options(state: dict, job) -> None:
    """ResumeRefused naming the first option that differs from the interrupted run's."""
    now = job_options(job)
    before = state.get("options", {})
    for name in list(now) + [k for k in before if k not in now]:  # the flags in their order: --seq-len first
        if now.get(name) != before.get(name):
            raise ResumeRefused(f"--resume: {name} was {before.get(name)!r} in the interrupted run, {now.get(name)!r} "
                                "now; rerun with the same options, or without --resume (with --overwrite) to start again")


def check_inputs(state: dict, digest: str, count: int) -> None:
    """ResumeRefused when the input's listing differs from the interrupted run's."""
    if state.get("inputs") != digest:
        then = state.get("num_images")
        how = (f"{then} records listed then, {count} now" if then != count else
               f"the names, sizes, labels or metadata of its {count} records differ")
        raise ResumeRefused(f"--resume: the input changed since the interrupted run ({how}); rerun without "
                            "--resume (with --overwrite) to start again")


def start(output: str, run_id: str, job, digest: str, count: int, num_shards: int) -> dict:
    """A fresh journal for run `run_id` (any older one removed); returns its state."""
    shutil.rmtree(_dir(output), ignore_errors=True)
    os.makedirs(_dir(output))
    state = {"run_id": run_id, "options": job_options(job), "inputs": digest, "num_images": count,
             "num_shards": num_shards}
    _write(output, "run.json", state)
    return state


def _group_name(epoch: int, group: int) -> str:
    return f"group-{epoch:05d}-{group:05d}.json"


def record_group(output: str, summary: dict, rejects: list) -> None:
    """Note a group finished: its summary (shards with their sha256) and its rejects."""
    _write(output, _group_name(summary["epoch"], summary["group"]), {"summary": summary, "rejects": rejects})


def finished_group(output: str, epoch: int, group: int) -> Optional[tuple[dict, list]]:
    """(summary, rejects) of a group the journal records as finished and whose shards are all still there
    with their recorded sha256; None otherwise (the group is filled again)."""
    from schemas import sha256_file

    try:
        with open(os.path.join(_dir(output), _group_name(epoch, group)), encoding="utf-8") as f:
            done = json.load(f)
        summary = done["summary"]
        summary["shards"] = [(int(i), info) for i, info in summary["shards"]]
        for _, info in summary["shards"]:
            if sha256_file(os.path.join(output, info["file"])) != info["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary, done["rejects"]


def shards_done(output: str) -> tuple[int, Optional[int]]:
    """(shards the journal records as written, the run's shard count or None): for the interrupt line."""
    state = load(output)
    if state is None:
        return 0, None
    n = 0
    for name in os.listdir(_dir(output)):
        if name.startswith("group-") and name.endswith(".json"):
            try:
                with open(os.path.join(_dir(output), name), encoding="utf-8") as f:
                    n += len(json.load(f)["summary"]["shards"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return n, state.get("num_shards")


def remove(output: str) -> None:
    """Remove the journal (after the commit)."""
    shutil.rmtree(_dir(output), ignore_errors=True)
