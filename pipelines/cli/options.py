"""Command-line options that shape the packed output, shared by `pack`, `serve` and `bench`.

`add_pack_options(parser)` adds them; `config_or_error(args)` turns them into a validated PackConfig.
Values are parsed here rather than by argparse so that every invalid value gives exactly one line on
stderr naming the option and what it accepts (argparse would print the usage block first), and the
command exits with status 2 before doing any work.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

import packer
from pipelines.sources import LABEL_MODES

# PackConfig field -> command-line flag, so that a packer.ConfigError names the flag the user typed.
CONFIG_FLAGS = {
    "seq_len": "--seq-len", "patch_size": "--patch-size", "resolution": "--resolution",
    "token_drop": "--token-drop", "max_images_per_seq": "--max-images-per-seq",
    "max_tokens_per_image": "--max-tokens-per-image", "packer": "--packer", "window": "--window",
    "seed": "--seed", "max_pixels": "--max-pixels", "fill": "--fill", "resize": "--resize",
}


class OptionError(ValueError):
    """An invalid command-line value; the message names the flag and what it accepts."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def fail(error: Exception | str, prog: str = "navit-pack", status: int = 2) -> NoReturn:
    """Print one line `navit-pack: error: ...` and exit: the one error format of every subcommand.
    Status 2 for a usage or configuration error (the default), 1 for a run that failed."""
    if isinstance(error, packer.ConfigError):
        error = as_option_error(error)
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(status)


def parse_int(value, flag: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer option (>= minimum), or None when allowed and the value is absent or 'auto'."""
    if allow_none and (value is None or value == "auto"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise OptionError(flag, f"must be an integer{bound}{' or auto' if allow_none else ''}, got {value!r}")
    return number


def parse_float(value, flag: str, low: float, high: float) -> float:
    """A float option in [low, high]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not low <= number <= high:
        raise OptionError(flag, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    return number


def parse_choice(value, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionError(flag, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_labels(value: str) -> str:
    """auto, none, folder or filename:REGEX (a regex with a group)."""
    from pipelines.sources import FILENAME_LABELS, SourceError, check_labels

    if not (isinstance(value, str) and value.startswith(FILENAME_LABELS)):
        return parse_choice(value, "--labels", LABEL_MODES + ("filename:REGEX",))
    try:
        check_labels("--labels", value)
    except SourceError as e:
        raise OptionError("--labels", str(e).split(": ", 1)[1]) from None
    return value


def parse_meta_fields(value: str | None) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); names must be unique identifiers-like strings."""
    if not value:
        return ()
    names = tuple(n.strip() for n in value.split(","))
    if any(not n or not n.replace("_", "").replace("-", "").isalnum() for n in names) or len(set(names)) != len(names):
        raise OptionError("--meta-fields", f"must be comma-separated unique names (letters, digits, _ or -), got {value!r}")
    return names


# Sources whose spec takes a `label=NAME` option, which --label-field fills in.
LABEL_FIELD_SOURCES = ("wds", "tfrecord", "parquet", "arrow")


def input_spec(args: argparse.Namespace) -> str:
    """--input with --label-field folded into it as the source's `label=NAME` option (so that the spec alone,
    as recorded in the manifest and passed to Beam workers, says where labels come from)."""
    spec, name = args.input, getattr(args, "label_field", None)
    if name is None:
        return spec
    if not re.fullmatch(r"[A-Za-z0-9_.:/-]+", name):
        raise OptionError("--label-field", f"must be a field name (letters, digits, _ . : / -), got {name!r}")
    if args.labels == "none":
        raise OptionError("--label-field", "names where labels come from, but --labels is none")
    kind, _, body = spec.partition(":")
    if kind not in LABEL_FIELD_SOURCES:
        raise OptionError("--label-field", f"applies to {', '.join(k + ':' for k in LABEL_FIELD_SOURCES)} inputs, "
                                           f"not {spec!r}")
    query = body.rpartition("?")[2] if "?" in body else ""
    if "=" not in query:
        return f"{spec}?label={name}"
    if re.search(r"(^|&)label=", query):
        raise OptionError("--label-field", f"the input {spec!r} already names its label field")
    return f"{spec}&label={name}"


INPUT_HELP = ("a folder or glob of images (local or gs://), tfds:NAME[/CONFIG]:SPLIT, tfrecord:GLOB, parquet:GLOB, "
              "arrow:GLOB, wds:SHARDS (WebDataset tars, e.g. wds:shards-{000..099}.tar) or synthetic:N[:SEED], "
              "e.g. --input synthetic:2000")


def command(subparsers, name: str, summary: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser: `summary` in `navit-pack --help`, the module docstring and examples kept as written."""
    return subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_input(parser: argparse.ArgumentParser, required: bool = True, note: str = "") -> None:
    """--input SRC, any source spec (pack, plan, serve)."""
    parser.add_argument("--input", required=required, default=None, metavar="SRC", help=INPUT_HELP + note)


def add_dataset_dir(parser: argparse.ArgumentParser) -> None:
    """The DIR argument of the commands that read a packed output (inspect, stats, verify)."""
    parser.add_argument("dir", metavar="DIR", help="a folder written by `navit-pack pack`, e.g. out")


def add_beam_args(parser: argparse.ArgumentParser, example: str) -> None:
    """Everything after `--`: Beam pipeline options (pack, plan)."""
    parser.add_argument("beam_args", nargs=argparse.REMAINDER, metavar="-- BEAM_PIPELINE_OPTIONS",
                        help=f"options for Beam after `--`, e.g. {example}")


def beam_args(raw: list[str]) -> list[str]:
    """The Beam pipeline options given after `--` (a stray positional argument fails in one line)."""
    if raw and raw[0] == "--":
        raw = raw[1:]
    if raw and not raw[0].startswith("--"):
        fail(OptionError(raw[0], "unexpected argument; Beam pipeline options go after `--`"))
    return raw


def quiet_beam() -> None:
    """Silence Beam's local chatter (apitools, semi_persistent_directory, unparseable args): errors only."""
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    for name in ("apache_beam", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="apache_beam")


def add_pack_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that define a PackConfig, plus --labels, --label-field and --meta-fields."""
    g = parser.add_argument_group("packing options (same names and spec strings as packer.PackConfig)")
    g.add_argument("--seq-len", default="256", metavar="L",
                   help="tokens per packed sequence (default 256), e.g. --seq-len 1024")
    g.add_argument("--patch-size", default="16", metavar="P",
                   help="patch side in pixels (default 16); a token is P*P*3 bytes, e.g. --patch-size 14")
    g.add_argument("--resolution", default="native", metavar="SPEC",
                   help=f"per-image effective resolution: {packer.RESOLUTION_HELP} (default native). "
                        "Area R*R, aspect ratio kept, e.g. --resolution uniform:64:256 (NaViT pretraining)")
    g.add_argument("--token-drop", default="none", metavar="SPEC",
                   help=f"per-image token dropping: {packer.DROP_HELP} (default none), "
                        "e.g. --token-drop beta:0.25:0.5 or --token-drop const:0.5@sigmoid:0.2:0.8:1e6:-2e5")
    g.add_argument("--max-images-per-seq", default=None, metavar="E",
                   help="at most E images in one sequence (default seq_len//16), e.g. --max-images-per-seq 8")
    g.add_argument("--max-tokens-per-image", default=None, metavar="T",
                   help="cap on one image's tokens before dropping (default seq_len); larger images are "
                        "resized to fit, e.g. --max-tokens-per-image 196")
    g.add_argument("--packer", default=packer.PACKERS[0], metavar="NAME",
                   help=f"packing algorithm: {', '.join(packer.PACKERS)} (default {packer.PACKERS[0]}: streaming "
                        "best-fit-decreasing over a window that meets --max-images-per-seq by swapping images between "
                        "sequences; window-bfd: the same, closing a sequence at the limit), "
                        "e.g. --packer first-fit (the paper's greedy)")
    g.add_argument("--window", default="1024", metavar="N",
                   help="window-swap, window-bfd: images considered together (default 1024), e.g. --window 4096")
    g.add_argument("--seed", default="0", metavar="S",
                   help="seed of every per-image random choice (resolution, drop, order; default 0), e.g. --seed 7")
    g.add_argument("--max-pixels", default="100000000", metavar="N",
                   help="reject images with more pixels than this (decompression bombs; default 1e8), "
                        "e.g. --max-pixels 50000000")
    g.add_argument("--fill", default="none", metavar="MODE",
                   help="none (default) or exact: resize the last image of a sequence to fill it exactly, e.g. --fill exact")
    g.add_argument("--resize", default="default", metavar="KERNEL",
                   help="resize kernel: default (antialiased, close to Pillow's bicubic) or fast (linear, about "
                        "1.2x faster per image, less faithful; see docs/core.md), e.g. --resize fast")
    g.add_argument("--labels", default="auto", metavar="MODE",
                   help="auto (default: from sub-folder names or the dataset's label column), folder (every image must "
                        "sit in a class sub-folder), none (all -1) or filename:REGEX (folders: the first group of "
                        "REGEX in each file name, unmatched files -1), e.g. --labels 'filename:^(n\\d+)_'")
    g.add_argument("--label-field", default=None, metavar="NAME",
                   help="labels from this field: of each sample's json member for wds: inputs (default: the cls "
                        "member), the feature or column for tfrecord:, parquet: and arrow:, "
                        "e.g. --label-field class_id")
    g.add_argument("--meta-fields", default="", metavar="A,B",
                   help="source metadata fields carried per image as meta_<name> columns, e.g. --meta-fields caption,url")


def config_or_error(args: argparse.Namespace) -> packer.PackConfig:
    """A validated PackConfig from parsed arguments; raises OptionError naming the flag of a bad value."""
    parse_labels(args.labels)
    parse_meta_fields(args.meta_fields)
    if hasattr(args, "input"):
        input_spec(args)
    values = dict(
        seq_len=parse_int(args.seq_len, "--seq-len", 1),
        patch_size=parse_int(args.patch_size, "--patch-size", 1),
        resolution=args.resolution,
        token_drop=args.token_drop,
        max_images_per_seq=parse_int(args.max_images_per_seq, "--max-images-per-seq", 1, allow_none=True),
        max_tokens_per_image=parse_int(args.max_tokens_per_image, "--max-tokens-per-image", 1, allow_none=True),
        packer=args.packer,
        window=parse_int(args.window, "--window", 1),
        seed=parse_int(args.seed, "--seed", 0),
        max_pixels=parse_int(args.max_pixels, "--max-pixels", 1),
        fill=args.fill,
        resize=args.resize,
    )
    try:
        return packer.PackConfig(**values)
    except packer.ConfigError as e:
        raise as_option_error(e) from None


def as_option_error(error: packer.ConfigError) -> OptionError:
    """The ConfigError of a PackConfig field, reworded to name the flag the user typed."""
    flag = CONFIG_FLAGS.get(error.field, "--" + error.field.replace("_", "-"))
    message = str(error).split(": ", 1)[1] if ": " in str(error) else str(error)
    return OptionError(flag, message)
