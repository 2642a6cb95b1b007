"""`navit-pack serve`: a tf.data service dispatcher and N workers that pack an input for trainers.

The dataset is built and registered in this process (its workers run the Python packing code), under
--dataset-id. Trainers read it with
    pipelines.service.read_service("grpc://HOST:PORT", config, dataset_id=ID, processing_mode="dynamic")
With processing_mode "dynamic" each image is packed exactly once per epoch while no worker fails (at
most once if one does); with "off" every worker packs everything (once per worker per epoch).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from pipelines import options

EXAMPLES = """examples:
  navit-pack serve --input synthetic:2000 --workers 2 --port 5050 --epochs 10
  navit-pack serve --input ~/imagenet/train --resolution uniform:64:256 --token-drop beta:0.25:0.5 \\
      --workers 4 --port 5050 --epochs 100 --duration 3600
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve packed sequences to trainers with tf.data service",
                              description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="SRC", help="any input spec `pack` accepts, e.g. --input synthetic:2000")
    p.add_argument("--workers", default="2", metavar="N", help="tf.data service workers in this process (default 2)")
    p.add_argument("--port", default="0", metavar="PORT", help="dispatcher port (default 0: any free port, printed)")
    p.add_argument("--epochs", default="1", metavar="N", help="passes over the input (reshuffled, resampled each), e.g. --epochs 10")
    p.add_argument("--group-units", default="64", metavar="N",
                   help="source units (files or shards) packed together by one worker before its packer is flushed (default 64)")
    p.add_argument("--threads", default="auto", metavar="N", help="threads preparing images (default: min(8, cores))")
    p.add_argument("--dataset-id", default="navit-pack", metavar="ID", help="the id trainers read (default navit-pack)")
    p.add_argument("--duration", default="0", metavar="S", help="stop after S seconds (default 0: run until interrupted)")
    options.add_pack_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = options.config_or_error(args)
        workers = options.parse_int(args.workers, "--workers", 1)
        port = options.parse_int(args.port, "--port", 0)
        epochs = options.parse_int(args.epochs, "--epochs", 1)
        group_units = options.parse_int(args.group_units, "--group-units", 1)
        threads = options.parse_int(args.threads, "--threads", 0, allow_none=True)
        duration = options.parse_float(args.duration, "--duration", 0.0, 1e9)
        meta_fields = options.parse_meta_fields(args.meta_fields)
    except options.OptionError as e:
        options.fail(e)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipelines import service
    from pipelines.sources import open_source

    try:
        source = open_source(options.input_spec(args), labels=args.labels, meta_fields=meta_fields)
    except Exception as e:  # noqa: BLE001 - any source error becomes one clear line
        options.fail(f"--input: {e}")
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a terminated server stops its workers and reports rejects
    local = service.LocalService(num_workers=workers, port=port)
    try:
        dataset = service.service_dataset(source, config, epochs=epochs, group_units=group_units,
                                          meta_fields=meta_fields, num_parallel=threads)
        service.register(dataset, local.target, args.dataset_id)
        print(f"navit-pack serve: dispatcher {local.target}, {workers} workers, dataset id {args.dataset_id!r}", flush=True)
        print(f"  read with: pipelines.service.read_service({local.target!r}, config, dataset_id={args.dataset_id!r}, "
              f"processing_mode='dynamic'{', meta_fields=' + repr(meta_fields) if meta_fields else ''})", flush=True)
        start = time.monotonic()
        while not duration or time.monotonic() - start < duration:
            time.sleep(min(1.0, duration or 1.0))
    except KeyboardInterrupt:
        pass
    finally:
        local.stop()
        if service.REJECTS:
            print(f"navit-pack serve: rejected images by reason: {dict(service.REJECTS)}", file=sys.stderr)
    return 0
