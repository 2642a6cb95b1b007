"""navit-pack core: resolution planning, decoding, patchify, token dropping and sequence packing.

Framework-free (numpy, Pillow, simplejpeg and OpenCV only): Beam, tf.data and plain Python all wrap these
functions. Every random choice is a pure function of (seed, image key, epoch). The names in `__all__` are
the public API; the `_modules` are private. Where a change goes, by flow:

  _config      PackConfig and the spec strings of resolution and token drop
  _plan        resolution -> patch grid;  _drop: token dropping;  _rng: per-image randomness
  _image       decoding and resizing;  _patch: patchify;  _transform: one image's plan and fill
  _record      the record's one field table: records, empty records, worker slots, field order
  _algorithms  the packers on token counts (ALGORITHMS registry);  _fill: exact-fill re-plans
  _core        decide: PackingCore, the one RejectBudget
  _assemble    a decision's record from its filled images (the failed-fill rule)
  _pool        fill pools (in this process, or worker processes: _worker);  _driver: the one fill loop
"""
from ._algorithms import ALGORITHMS, pack_lengths
from ._config import DROP_HELP, PACKERS, RESOLUTION_HELP, ConfigError, PackConfig, parse_drop, parse_resolution
from ._core import Decision, PackingCore, RejectBudget, RejectBudgetExceeded
from ._driver import Driver, pack_images, pack_patched
from ._image import ImageRejected, image_size, library_versions, read_image_size
from ._pool import SharedBytes, WorkerError, fill_pool, resolve_workers
from ._process import PatchedImage, check_label
from ._record import META_PREFIX, RECORD_FIELDS, build_record, record_fields, unpack
from ._rng import image_rng, stable_hash, unit_fraction
from ._patch import unpatchify
from ._transform import ImagePlan, PlanBlock, Refit, fill_image, plan_header, plan_size, prepare_image

__all__ = [
    # configuration: the one PackConfig and its spec strings
    "PackConfig", "ConfigError", "PACKERS", "RESOLUTION_HELP", "DROP_HELP", "parse_resolution", "parse_drop",
    # one image: plan from its size or header, fill to the plan (or both)
    "prepare_image", "plan_header", "plan_size", "fill_image", "ImagePlan", "Refit", "PatchedImage", "ImageRejected",
    "image_size", "read_image_size", "check_label", "library_versions", "unpatchify",
    # the record: its one field table, records and their inverse
    "RECORD_FIELDS", "record_fields", "META_PREFIX", "build_record", "unpack",
    # decide, fill, assemble: the core every pipeline drives
    "PackingCore", "Decision", "RejectBudget", "RejectBudgetExceeded", "ALGORITHMS", "pack_lengths",
    "Driver", "SharedBytes", "fill_pool", "WorkerError", "resolve_workers", "pack_images", "pack_patched",
    # deterministic randomness: a pure function of (seed, key, epoch)
    "image_rng", "PlanBlock", "stable_hash", "unit_fraction",
]
