"""`tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]`: a prepared TensorFlow Datasets split, images kept encoded.

The image feature is read with tfds.decode.SkipDecoding(), so the stored JPEG/PNG bytes reach the packer
untouched (no decode and re-encode). Key: the example's tfds_id (unique and stable); label: a top-level
'label' ClassLabel feature, whose names are the class names. One unit per shard of the split.
With DATA_DIR the prepared files are opened directly (tfds.builder_from_directory), so workers need no
builder code; the dataset must already be prepared (`tfds build NAME`): nothing is downloaded here."""
from __future__ import annotations

import os
import re
from typing import Any, Iterator, Optional, Sequence

from .base import SourceError, Source, SourceRecord, check_meta_fields, has_scheme, text


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in name.split("."))


def _prepared_dir(data_dir: str, name: str) -> Optional[str]:
    """DATA_DIR/NAME[/CONFIG]/VERSION with the highest version holding dataset_info.json, if any."""
    import tensorflow as tf  # tf.io.gfile also lists gs:// folders

    base = f"{data_dir.rstrip('/')}/{name}"
    if not tf.io.gfile.isdir(base):
        return None
    versions = [v.rstrip("/") for v in tf.io.gfile.listdir(base) if re.fullmatch(r"\d+\.\d+\.\d+/?", v)]
    versions = [v for v in versions if tf.io.gfile.exists(f"{base}/{v}/dataset_info.json")]
    return f"{base}/{max(versions, key=_version_key)}" if versions else None


def _split_outside_brackets(text: str, maxsplit: int) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == ":" and depth == 0 and len(parts) < maxsplit:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


class TfdsSource(Source):
    """See the module docstring; `units()` are sub-split strings, one per shard."""

    unique_keys = True

    def __init__(self, spec: str, name: str, split: str, data_dir: Optional[str], *, labels: str,
                 meta_fields: tuple[str, ...]):
        self.spec, self.name, self.split, self.data_dir = spec, name, split, data_dir
        self.meta_fields = meta_fields
        builder = self._get_builder()
        features = builder.info.features
        import tensorflow_datasets as tfds

        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if not images:
            raise SourceError(spec, f"no Image feature among {', '.join(features.keys())}")
        self.image = images[0]
        label = features["label"] if "label" in features.keys() else None
        self.label = "label" if labels != "none" and isinstance(label, tfds.features.ClassLabel) else None
        self.class_names = tuple(features["label"].names) if self.label else None
        check_meta_fields(spec, meta_fields, [k for k in features.keys() if k != self.image])
        base = split.split("[", 1)[0]
        if base not in builder.info.splits:
            raise SourceError(spec, f"no split {base!r}; {name} has {', '.join(builder.info.splits.keys())}")
        info = builder.info.splits[split]
        if int(info.num_examples) == 0:
            raise SourceError(spec, f"split {split!r} is empty")
        shards = 0 if "[" in split else len(builder.info.splits[base].shard_lengths)
        self._units = [f"{split}[{i}shard:{i + 1}shard]" for i in range(shards)] if shards > 1 else [split]

    @classmethod
    def from_spec(cls, spec: str, body: str, *, labels: str = "auto", meta_fields: Sequence[str] = ()) -> "TfdsSource":
        parts = _split_outside_brackets(body, 2)  # a split may be sliced: train[:10%], train[0shard:4shard]
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise SourceError(spec, "expected tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]")
        name, split = parts[0], parts[1]
        data_dir = parts[2] if len(parts) == 3 and parts[2] else None
        if data_dir is not None and not has_scheme(data_dir):
            data_dir = os.path.abspath(data_dir)
        return cls(spec, name, split, data_dir, labels=labels, meta_fields=tuple(meta_fields))

    def _get_builder(self):
        builder = self.__dict__.get("_builder")
        if builder is not None:
            return builder
        import tensorflow_datasets as tfds

        try:
            directory = _prepared_dir(self.data_dir, self.name) if self.data_dir else None
            if directory is not None:
                builder = tfds.builder_from_directory(directory)
            else:
                builder = tfds.builder(self.name, data_dir=self.data_dir)
                if not builder.is_prepared():
                    raise SourceError(self.spec, f"{self.name} is not prepared in {builder.data_dir}; run "
                                                 f"`tfds build {self.name}` first (nothing is downloaded here)")
        except SourceError:
            raise
        except Exception as e:  # DatasetNotFoundError and friends
            raise SourceError(self.spec, f"cannot open TFDS dataset {self.name!r}: {type(e).__name__}: {e}") from None
        self._builder = builder
        return builder

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_builder", None)  # rebuilt lazily on the worker
        return state

    def units(self) -> list[str]:
        return list(self._units)

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        import tensorflow_datasets as tfds

        builder = self._get_builder()
        dataset = builder.as_dataset(split=unit, shuffle_files=False,
                                     decoders={self.image: tfds.decode.SkipDecoding()},
                                     read_config=tfds.ReadConfig(add_tfds_id=True))
        for example in tfds.as_numpy(dataset):
            key = text(example["tfds_id"])
            label = int(example[self.label]) if self.label else None
            meta = {name: text(example[name]) for name in self.meta_fields}
            yield SourceRecord(key, bytes(example[self.image]), label, meta)
