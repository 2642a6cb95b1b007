"""navit-pack core: resolution planning, decoding, patchify, token dropping and sequence packing.

Framework-free (numpy, Pillow, simplejpeg and OpenCV only): Beam, tf.data and plain Python all wrap these functions.
Every random choice is a pure function of (seed, image key, epoch). The names in `__all__` are the public API;
the `_modules` are private.
"""
from ._algorithms import fill_lengths, make_algorithm, pack_lengths
from ._config import (DROP_HELP, FILL_PACKERS, PACKERS, RESOLUTION_HELP, BetaDrop, Budget, ConfigError, ConstDrop, Fixed,
                      NaFlex, Native, NoDrop, PackConfig, ResDepDrop, SigmoidSchedule, TruncNormal, Uniform, parse_drop,
                      parse_resolution)
from ._drop import kept_count, sample_drop_rate
from ._engine import (Decision, ImagePlan, PackingCore, Refit, RejectBudgetExceeded, SequencePacker, assemble,
                      check_budget_spec, fill_image, plan_header, prepare_image, text_fields)
from ._fill import FILL_EXTRA_DROP, FillPlan, plan_fill
from ._image import ImageRejected, OpenedImage, image_size, library_versions
from ._packer import META_PREFIX, PER_IMAGE_FIELDS, build_record, unpack
from ._patch import patchify, unpatchify
from ._plan import plan_grid, plan_image
from ._process import PatchedImage
from ._rng import image_rng, stable_hash, unit_fraction
from ._workers import FillPool, WorkerError

__all__ = [
    # configuration: the one PackConfig, its policies and their spec strings
    "PackConfig", "ConfigError", "PACKERS", "FILL_PACKERS", "RESOLUTION_HELP", "DROP_HELP",
    "parse_resolution", "parse_drop", "Native", "Fixed", "Budget", "NaFlex", "Uniform", "TruncNormal",
    "NoDrop", "ConstDrop", "BetaDrop", "ResDepDrop", "SigmoidSchedule",
    # one image: open, plan, patchify, drop
    "prepare_image", "PatchedImage", "ImageRejected", "OpenedImage", "image_size", "library_versions",
    "plan_image", "plan_grid", "plan_header", "sample_drop_rate", "kept_count", "patchify", "unpatchify",
    "FillPlan", "plan_fill", "FILL_EXTRA_DROP",
    # packing: records and their inverse, the packing algorithms on token counts
    "SequencePacker", "build_record", "unpack", "META_PREFIX", "PER_IMAGE_FIELDS",
    "pack_lengths", "make_algorithm", "fill_lengths",
    # the plan / decide / fill core that the stream and the Beam job drive
    "PackingCore", "ImagePlan", "Decision", "Refit", "RejectBudgetExceeded", "check_budget_spec", "text_fields",
    "fill_image", "assemble",
    "FillPool", "WorkerError",
    # deterministic randomness: a pure function of (seed, key, epoch)
    "image_rng", "stable_hash", "unit_fraction",
]
