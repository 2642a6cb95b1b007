"""navit-pack core: resolution planning, decoding, patchify, token dropping and sequence packing.

Framework-free (numpy, Pillow, simplejpeg and OpenCV only): Beam, tf.data and plain Python all wrap these functions.
Every random choice is a pure function of (seed, image key, epoch).
"""
from ._algorithms import (ExactFillWindow, FirstFit, NextFit, WindowBestFit, best_fit_decreasing, fill_lengths,
                          make_algorithm, pack_lengths)
from ._config import (DROP_HELP, PACKERS, RESOLUTION_HELP, BetaDrop, Budget, ConfigError, ConstDrop, Fixed, NaFlex, Native,
                      NoDrop, PackConfig, ResDepDrop, SigmoidSchedule, TruncNormal, Uniform, parse_drop,
                      parse_resolution)
from ._fill import (FILL_EXTRA_DROP, FILL_MIN_SCALE, FillPlan, ImageFill, grid_ladder, max_fill_drop, plan_fill,
                    plan_image_fill, refit_image, scale_range)
from ._drop import choose_kept, kept_count, sample_drop_rate
from ._image import RESIZE_KERNELS, ImageRejected, OpenedImage, image_size, library_versions, resize_rgb, to_rgb
from ._packer import META_PREFIX, PER_IMAGE_FIELDS, SequencePacker, build_record, meta_text, unpack
from ._patch import patchify, unpatchify
from ._plan import grid_for_budget, grid_for_naflex, grid_for_scale, plan_grid, plan_image, sample_resolution
from ._process import FillSource, PatchedImage, check_label
from ._workers import FillPool, SlotResult, WorkerError, stop_idle_workers
from ._engine import (NUMERIC_FIELDS, Decision, FillReject, ImagePlan, PackingCore, Refit, RejectBudgetExceeded, assemble,
                      assemble_into, empty_record, fill_image, plan_header, prepare_image, text_fields)
from ._rng import image_rng, stable_hash, unit_fraction

__all__ = [name for name in dir() if not name.startswith("_")]
