"""Fill and assemble: the record of a decision from its images, filled in slot order.

Failed fill rule. An image whose header planned but whose pixels fail (ImageRejected from fill_image, an
unreadable payload, or `worker_crashed` when the process filling it died) is left out of its sequence:
the other images keep their order, their segment ids renumber 1..k and the sequence's tokens stay packed
from the start, so the failed image's tokens become padding at the end. The record is exactly
`build_record` of the remaining images (a sequence whose every image failed is all padding,
num_images 0). The image is reported as a `FillReject`, which the deciding PackingCore counts
(`fill_failed`). Deterministic: the same bytes fail the same way in every process.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from ._config import PackConfig
from ._core import Decision
from ._image import ImageRejected
from ._process import PatchedImage
from ._record import empty_record, fill_per_image, ordered, text_fields
from ._transform import ImagePlan, fill_image

Filled = Union[PatchedImage, ImageRejected]
Reader = Callable[[Any], bytes]  # a payload reference -> its encoded bytes (OSError when it cannot be read)


class Encoder(Protocol):
    """A record's on-disk form, made where the record is assembled (a fill worker), so that the writing
    process only appends bytes. Picklable; provided by the output format (schemas.record_encoder)."""

    meta_fields: tuple[str, ...]
    row_bytes: int  # room for one encoded record; a larger one is left to the writer (returned unencoded)

    def into(self, record: Mapping[str, Any], out: np.ndarray) -> int:
        """The record's bytes written at the start of uint8 array `out` (the worker's encoded slot): their
        size, or -1 when they do not fit."""
        ...


@dataclasses.dataclass(frozen=True)
class FillReject:
    """An image of a decision whose fill failed (see the module doc): its slot, key, reason, detail."""

    slot: int
    key: str
    reason: str
    detail: str
    provenance: Any
    tokens: int


def payload_bytes(payload: Any, read: Optional[Reader]) -> bytes:
    """The encoded bytes of a payload: bytes as they are, a reference through `read`; ImageRejected
    ("missing" or "unreadable") when the reference no longer reads."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return payload
    if read is None:
        raise ValueError(f"payload {payload!r} is a reference, but the pool has no reader")
    try:
        return read(payload)
    except FileNotFoundError as e:
        raise ImageRejected("missing", f"{type(e).__name__}: {e}") from None
    except OSError as e:
        raise ImageRejected("unreadable", f"{type(e).__name__}: {e}") from None


def fill_all(plans: Sequence[ImagePlan], payloads: Sequence[Any], config: PackConfig, read: Optional[Reader] = None,
             masked: Mapping[int, tuple[str, str]] = {}, before: Callable[[int, ImagePlan], None] = lambda i, p: None
             ) -> list[Filled]:
    """Fill each image of a decision (ImageRejected in its place when it fails); `masked` images are
    rejected without filling; `before(i, plan)` runs before image i (a worker's heartbeat)."""
    filled: list[Filled] = []
    for i, (plan, payload) in enumerate(zip(plans, payloads)):
        if i in masked:
            filled.append(ImageRejected(*masked[i]))
            continue
        before(i, plan)
        try:
            filled.append(fill_image(payload_bytes(payload, read), plan, config))
        except ImageRejected as e:
            filled.append(e)
    return filled


def assemble_into(out: Mapping[str, np.ndarray], plans: Sequence[ImagePlan], filled: Sequence[Filled],
                  config: PackConfig) -> list[tuple[int, str, str]]:
    """Write the numeric fields of the record of `plans`, filled as `filled`, into preallocated arrays `out`
    (e.g. one row of a shared-memory slot); returns the failed slots as (slot, reason, detail)."""
    if len(filled) != len(plans):
        raise ValueError(f"a decision of {len(plans)} images, got {len(filled)} filled")
    ok: list[PatchedImage] = []
    failed = []
    for slot, (plan, im) in enumerate(zip(plans, filled)):
        if isinstance(im, ImageRejected):
            failed.append((slot, im.reason, im.detail))
        else:
            if im.num_tokens != plan.final_tokens:
                raise ValueError(f"image {plan.key!r} was filled with {im.num_tokens} tokens, its plan has {plan.final_tokens}")
            ok.append(im)
    counts = [im.num_tokens for im in ok]
    total, k = sum(counts), len(ok)
    if total > config.seq_len or k > config.max_images_per_seq:
        raise ValueError(f"cannot pack {k} images with {total} tokens into L={config.seq_len}")
    patches, seg, pos_y, pos_x = out["patches"], out["segment_ids"], out["pos_y"], out["pos_x"]
    if k:
        np.concatenate([im.patches for im in ok], out=patches[:total])
        np.concatenate([im.pos_y for im in ok], out=pos_y[:total])
        np.concatenate([im.pos_x for im in ok], out=pos_x[:total])
        seg[:total] = np.repeat(np.arange(1, k + 1, dtype=np.int32), counts)
    patches[total:] = 0
    seg[total:] = 0
    pos_y[total:] = 0
    pos_x[total:] = 0
    out["num_images"][...] = k
    fill_per_image(out, ok)
    return failed


def fill_rejects(decision: Decision, failed: Sequence[tuple[int, str, str]]) -> list[FillReject]:
    items = decision.items
    return [FillReject(i, items[i][0].key, reason, detail, items[i][1], items[i][0].final_tokens)
            for i, reason, detail in failed]


def filled_plans(decision: Decision, rejects: Sequence[FillReject]) -> list[ImagePlan]:
    """The plans of the images of `decision` that were filled (its record's images, in order)."""
    failed = {r.slot for r in rejects}
    return [p for slot, p in enumerate(decision.plans) if slot not in failed]


def record_of(decision: Decision, numeric: Mapping[str, np.ndarray], rejects: Sequence[FillReject], config: PackConfig,
              meta_fields: Sequence[str] = (), copy: bool = True) -> dict[str, Any]:
    """The whole record of `decision` from its assembled numeric fields: the text fields of the images that
    were filled, every field in record order."""
    return row_record(filled_plans(decision, rejects), numeric, config, meta_fields, copy)


def row_record(plans: Sequence[ImagePlan], numeric: Mapping[str, np.ndarray], config: PackConfig,
               meta_fields: Sequence[str] = (), copy: bool = True) -> dict[str, Any]:
    """The record of an assembled row holding the images of `plans` (those filled), in record order."""
    record = {k: (v.copy() if copy else v) for k, v in numeric.items()}
    record["num_images"] = np.int32(record["num_images"])
    record.update(text_fields(plans, config, meta_fields))
    return ordered(record, meta_fields)


def assemble(decision: Decision, filled: Sequence[Filled], config: PackConfig,
             meta_fields: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], list[FillReject]]:
    """(record, failed fills) for `decision` from its images filled in slot order (PatchedImage or the
    ImageRejected their fill raised). The record has build_record's fields and layout."""
    numeric = empty_record(config)
    rejects = fill_rejects(decision, assemble_into(numeric, decision.plans, filled, config))
    return record_of(decision, numeric, rejects, config, meta_fields, copy=False), rejects
