"""`navit-pack advise`: recommend a sequence length L and --max-images-per-seq for a padding target."""
from __future__ import annotations

import argparse
import json

from pipelines.cli.options import fail


def register(subparsers) -> None:
    import packer
    from pipelines.packing_efficiency import ADVISE_SEQ_LENS

    p = subparsers.add_parser("advise", help="recommend L and --max-images-per-seq for a padding target",
                              description="Packs resampled draws of SRC's size distribution at candidate sequence "
                                          "lengths and recommends the smallest L whose padding meets the target.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="image folder, source spec, or CSV of sizes with columns key,height,width")
    p.add_argument("--resolution", default="uniform:64:256", help=packer.RESOLUTION_HELP)
    p.add_argument("--token-drop", default="none", help=packer.DROP_HELP)
    p.add_argument("--target-padding", type=float, default=0.02, help="largest acceptable padding fraction")
    p.add_argument("--max-shrunk", type=float, default=0.01,
                   help="largest share of images allowed to need more than L tokens (they are shrunk to fit)")
    p.add_argument("--seq-len", type=int, nargs="+", default=list(ADVISE_SEQ_LENS), help="candidate sequence lengths")
    p.add_argument("--packer", default=packer.PACKERS[0],
                   help="packer to plan for (window-swap@W or window-bfd@W for another window)")
    p.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    p.add_argument("--draws", type=int, default=20_000, help="images drawn (sizes resampled) per candidate")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--json", default=None, help="also write the advice as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import packer
    from pipelines import packing_efficiency as packing

    try:
        sizes = packing.load_sizes(args.input)
        advice = packing.advise(sizes, resolution=args.resolution, token_drop=args.token_drop,
                                target_padding=args.target_padding, seq_lens=args.seq_len, packer_spec=args.packer,
                                draws=args.draws, patch_size=args.patch_size, seed=args.seed,
                                max_shrunk=args.max_shrunk)
    except (ValueError, packer.ConfigError) as e:
        fail(e)
    print(packing.format_advice(advice))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(advice, f, indent=1)
    return 0
