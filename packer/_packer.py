"""Sequence packing: PatchedImages in, fixed-length packed records (dicts of numpy arrays) out."""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ._algorithms import make_algorithm
from ._config import PackConfig
from ._fill import ImageFill, refit_image
from ._process import PatchedImage

# Per-image record fields, padded to max_images_per_seq, with their dtype and padding value.
PER_IMAGE_FIELDS: dict[str, tuple[Any, Any]] = {
    "labels": (np.int32, -1),
    "grid_h": (np.int32, 0),
    "grid_w": (np.int32, 0),
    "orig_h": (np.int32, 0),
    "orig_w": (np.int32, 0),
    "num_tokens": (np.int32, 0),
    "drop_rates": (np.float32, 0.0),
}
META_PREFIX = "meta_"


def meta_text(value: Any) -> str:
    """Pass-through metadata is stored as text: strings as they are, anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def build_record(images: list[PatchedImage], config: PackConfig, meta_fields: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """One packed sequence from `images` (which must fit), filled by vectorized copies (each token is
    copied once; only the padding is zeroed)."""
    L, E = config.seq_len, config.max_images_per_seq
    counts = [im.patches.shape[0] for im in images]
    total, k = sum(counts), len(images)
    if total > L or k > E or k == 0:
        raise ValueError(f"cannot pack {k} images with {total} tokens into L={L}, max_images_per_seq={E}")
    patches = np.empty((L, config.token_dim), np.uint8)
    np.concatenate([im.patches for im in images], out=patches[:total])
    patches[total:] = 0
    segment_ids = np.zeros(L, np.int32)
    segment_ids[:total] = np.repeat(np.arange(1, k + 1, dtype=np.int32), counts)
    positions = np.zeros((2, L), np.int32)
    np.concatenate([im.pos_y for im in images], out=positions[0, :total])
    np.concatenate([im.pos_x for im in images], out=positions[1, :total])
    record = {"patches": patches, "segment_ids": segment_ids, "pos_y": positions[0], "pos_x": positions[1],
              "num_images": np.int32(k)}
    keys = np.full(E, "", dtype=object)
    keys[:k] = [im.key for im in images]
    record["image_keys"] = keys
    ints = np.zeros((6, E), np.int32)  # labels, grid_h, grid_w, orig_h, orig_w, num_tokens
    ints[:, :k] = np.array([(im.label, im.grid_h, im.grid_w, im.orig_h, im.orig_w, n)
                            for im, n in zip(images, counts)], np.int32).T
    ints[0, k:] = PER_IMAGE_FIELDS["labels"][1]
    for row, name in enumerate(("labels", "grid_h", "grid_w", "orig_h", "orig_w", "num_tokens")):
        record[name] = ints[row]
    drop_rates = np.zeros(E, np.float32)
    drop_rates[:k] = [im.drop_rate for im in images]
    record["drop_rates"] = drop_rates
    for name in meta_fields:
        arr = np.full(E, "", dtype=object)
        arr[:k] = [meta_text(im.meta.get(name)) for im in images]
        record[META_PREFIX + name] = arr
    return record


def unpack(record: Mapping[str, np.ndarray]) -> list[PatchedImage]:
    """The images of a packed record, exactly as they were packed (inverse of build_record)."""
    k = int(record["num_images"])
    seg = np.asarray(record["segment_ids"])
    meta_names = [n[len(META_PREFIX):] for n in record if n.startswith(META_PREFIX)]
    out = []
    for i in range(k):
        sel = seg == i + 1
        meta = {name: str(record[META_PREFIX + name][i]) for name in meta_names}
        out.append(PatchedImage(
            key=str(record["image_keys"][i]), patches=np.asarray(record["patches"])[sel],
            pos_y=np.asarray(record["pos_y"])[sel], pos_x=np.asarray(record["pos_x"])[sel],
            grid_h=int(record["grid_h"][i]), grid_w=int(record["grid_w"][i]),
            orig_h=int(record["orig_h"][i]), orig_w=int(record["orig_w"][i]),
            drop_rate=float(record["drop_rates"][i]), label=int(record["labels"][i]), meta=meta))
    return out


class SequencePacker:
    """Streams PatchedImages into packed records with the configured algorithm, in bounded memory
    (for the windowed and next-fit packers). Its state is plain JSON: the algorithm's decisions, the
    counters, and for each image still pending, the `provenance` the caller gave, from which the caller
    re-creates that image on resume (every image is a pure function of its key, epoch and config)."""

    def __init__(self, config: PackConfig, meta_fields: Iterable[str] = ()):
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self._pending: dict[int, tuple[PatchedImage, Any]] = {}
        self._fill = None
        if config.fill == "exact":  # PackConfig checked that the packer can fill
            self._fill = ImageFill(config, _Images(self._pending))
        self._algo = make_algorithm(config.packer, config.seq_len, config.max_images_per_seq, config.window, self._fill)
        self._next_id = 0
        self.stats = {"images": 0, "sequences": 0, "tokens_real": 0, "tokens_padding": 0}
        if self._fill is not None:  # images re-planned, tokens they dropped beyond their own drop rate
            self.stats.update(images_refit=0, tokens_refit_dropped=0, sequences_unfilled=0)

    def add(self, image: PatchedImage, provenance: Any = None) -> list[dict[str, np.ndarray]]:
        """Add one image; returns the sequences this closes (often none)."""
        n = image.num_tokens
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"image {image.key!r} has {n} tokens, outside [1, seq_len={self.config.seq_len}]")
        item = self._next_id
        self._next_id += 1
        self._pending[item] = (image, provenance)
        return self._emit(self._algo.push(item, n))

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Close every open sequence (end of stream)."""
        return self._emit(self._algo.flush())

    def pack_all(self, images: Iterable[PatchedImage]) -> Iterator[dict[str, np.ndarray]]:
        for im in images:
            yield from self.add(im)
        yield from self.flush()

    def _emit(self, bins: list[list[int]]) -> list[dict[str, np.ndarray]]:
        out = []
        refits = self._refit(bins) if self._fill is not None else {}
        for b in bins:
            images = [refits.get(i) or self._pending.pop(i)[0] for i in b]
            record = build_record(images, self.config, self.meta_fields)
            real = sum(im.num_tokens for im in images)
            self.stats["images"] += len(images)
            self.stats["sequences"] += 1
            self.stats["tokens_real"] += real
            self.stats["tokens_padding"] += self.config.seq_len - real
            out.append(record)
        return out

    def _refit(self, bins: list[list[int]]) -> dict[int, PatchedImage]:
        """The re-planned images of the emitted bins (their pending entries are removed)."""
        out = {}
        for item, length in self._algo.take_refits().items():
            plan = self._fill.plan(item, length)
            image = self._pending.pop(item)[0]
            new = refit_image(image, plan, self.config)
            out[item] = new
            self.stats["images_refit"] += 1
            self.stats["tokens_refit_dropped"] += ((new.grid_h * new.grid_w - new.num_tokens)
                                                   - (image.grid_h * image.grid_w - image.num_tokens))
        self._fill.clear()
        self.stats["sequences_unfilled"] += self._algo.unfilled
        self._algo.unfilled = 0
        return out

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def state(self) -> dict:
        """JSON-serializable state; pending images are named by their provenance."""
        return {"next_id": self._next_id, "algorithm": self._algo.state(), "stats": dict(self.stats),
                "pending": [[i, prov] for i, (_, prov) in self._pending.items()]}

    def pending_provenance(self, state: dict) -> list[Any]:
        """The provenances of the images that `restore(state, ...)` needs, in order."""
        return [prov for _, prov in state["pending"]]

    def restore(self, state: dict, images: list[PatchedImage]) -> None:
        """Resume from `state`; `images` are the pending images re-created from pending_provenance(state)."""
        if len(images) != len(state["pending"]):
            raise ValueError(f"state has {len(state['pending'])} pending images, got {len(images)}")
        self._next_id = int(state["next_id"])
        self._algo.restore(state["algorithm"])
        self.stats = dict(state["stats"])
        self._pending.clear()  # the same dict: the fill callback reads it
        self._pending.update((int(i), (im, prov)) for (i, prov), im in zip(state["pending"], images))


class _Images(Mapping[int, PatchedImage]):
    """A read-only view of the packer's pending images by item id (for the fill callback)."""

    def __init__(self, pending: dict[int, tuple[PatchedImage, Any]]):
        self._pending = pending

    def __getitem__(self, item: int) -> PatchedImage:
        return self._pending[item][0]

    def __iter__(self) -> Iterator[int]:
        return iter(self._pending)

    def __len__(self) -> int:
        return len(self._pending)
