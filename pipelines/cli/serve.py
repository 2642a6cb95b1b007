"""`navit-pack serve`: tf.data service servers that pack an input for trainers.

Three ways to run it:
  --input SRC --workers N            a dispatcher and N workers in one process (default N = 2)
  --workers 0 --port PORT            a dispatcher alone, for workers started elsewhere
  --input SRC --dispatcher HOST:PORT N workers that join that dispatcher (another process or host)

Every worker process builds the same packing dataset and registers it under --dataset-id (the first
registration wins), so all processes that serve one dataset must get the same input and packing options:
a process started with other options is refused in one line (exit 2) before its workers join.
Trainers read it with
    pipelines.service.read_service("grpc://HOST:PORT", config, dataset_id=ID, processing_mode="dynamic")
With processing_mode "dynamic" each image is packed exactly once per epoch while no worker fails (at
most once if one does); with "off" every worker packs everything (once per worker per epoch).
A worker process that dies or goes silent for --worker-timeout seconds fails the trainers reading from
it with ServiceWorkerLost naming its address (they would otherwise wait for it for good); its
unfinished units are not re-sent.

Stopping: SIGTERM, SIGINT (Ctrl-C) or the end of --duration stops the servers within 10 s and exits 0;
a second signal kills them and exits at once with status 128 + the signal number. The servers run in a child process: TensorFlow cannot stop a worker that
a trainer has read from without deadlocking (its stop waits, holding the GIL, for a task that needs it),
so the child exits without stopping them, and the parent kills it if that takes longer than 10 s.
Exposure: the servers listen on every network interface whatever --host says, with no
authentication, and anyone who can reach their ports can run code as this user (a client may register
its own tf.data graph). --host 127.0.0.1 (the default) runs with a warning; any other --host also needs
--i-understand-remote-code-execution. Firewall the ports to the trainers' hosts: see docs/streaming.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from pipelines.cli import options

STOP_SECONDS = 10.0  # the bound on shutdown after a signal or the end of --duration
HANG_ON_STOP_ENV = "NAVIT_PACK_TEST_SERVE_HANG_ON_STOP"  # test-only: the servers' process ignores the stop

EXAMPLES = """examples:
  navit-pack serve --input synthetic:2000 --workers 2 --port 5050 --epochs 10
  navit-pack serve --input ~/imagenet/train --resolution uniform:64:256 --token-drop beta:0.25:0.5 \\
      --workers 4 --port 5050 --epochs 100 --duration 3600
  # a dispatcher alone, then worker processes on this or other hosts that join it
  navit-pack serve --workers 0 --port 5050
  navit-pack serve --input ~/imagenet/train --dispatcher head-node:5050 --host $(hostname) --workers 4 --epochs 100
"""


def register(subparsers) -> None:
    p = options.command(subparsers, "serve", "serve packed sequences to trainers with tf.data service", __doc__, EXAMPLES)
    options.add_input(p, required=False, note=" (required unless --workers 0)")
    p.add_argument("--workers", default="2", metavar="N",
                   help="tf.data service workers in this process (default 2); 0 starts a dispatcher alone")
    p.add_argument("--dispatcher", default=None, metavar="HOST:PORT",
                   help="join the dispatcher at HOST:PORT instead of starting one (default: start one here)")
    p.add_argument("--port", default="0", metavar="PORT",
                   help="port of the dispatcher started here (default 0: any free port, printed)")
    p.add_argument("--host", default="127.0.0.1", metavar="NAME",
                   help="the name or address of this host that its servers advertise to trainers and workers elsewhere "
                        "(default 127.0.0.1). It does not limit what they bind: they listen on every interface. A host "
                        "other than 127.0.0.1/localhost needs --i-understand-remote-code-execution, e.g. --host $(hostname)")
    p.add_argument("--i-understand-remote-code-execution", dest="remote_ok", action="store_true",
                   help="allow a --host other than 127.0.0.1: anyone who can reach the ports can run code as this user, "
                        "so firewall them to the trainers' hosts or use a private network")
    p.add_argument("--worker-timeout", default="30", metavar="S",
                   help="with a dispatcher here: a worker process silent for S seconds is lost, and trainers reading "
                        "from it fail naming it (default 30; one that exits is lost at once), e.g. --worker-timeout 10")
    p.add_argument("--epochs", default="1", metavar="N", help="passes over the input (reshuffled, resampled each; default 1), e.g. --epochs 10")
    p.add_argument("--group-units", default="64", metavar="N",
                   help="source units (files or shards) packed together by one worker before its packer is flushed (default 64)")
    p.add_argument("--threads", default="auto", metavar="N", help="fill worker processes per packing group (default auto: every core this process may use; "
                        "0: in the tf.data worker's thread), e.g. --threads 4")
    p.add_argument("--dataset-id", default="navit-pack", metavar="ID", help="the id trainers read (default navit-pack)")
    p.add_argument("--duration", default="0", metavar="S",
                   help="stop S seconds after the servers are up (default 0: run until interrupted)")
    options.add_pack_options(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> dict:
    """Every option parsed (OptionError on a bad one), before any process starts."""
    values = dict(
        config=options.config_or_error(args),
        workers=options.parse_int(args.workers, "--workers", 0),
        port=options.parse_int(args.port, "--port", 0),
        epochs=options.parse_int(args.epochs, "--epochs", 1),
        group_units=options.parse_int(args.group_units, "--group-units", 1),
        threads=options.parse_int(args.threads, "--threads", 0, allow_none=True),
        duration=options.parse_float(args.duration, "--duration", 0.0, 1e9),
        worker_timeout=options.parse_float(args.worker_timeout, "--worker-timeout", 2.0, 60.0),
        meta_fields=options.parse_meta_fields(args.meta_fields),
    )
    if values["workers"] and not args.input:
        raise options.OptionError("--input", "required unless --workers 0 (a dispatcher alone)")
    if args.dispatcher is not None:
        host, _, port = args.dispatcher.rpartition(":")
        if not host or not port.isdigit():
            raise options.OptionError("--dispatcher", f"must be HOST:PORT, got {args.dispatcher!r}")
        if not values["workers"]:
            raise options.OptionError("--workers", "must be >= 1 with --dispatcher (there is nothing else to run)")
    if not _loopback(args.host) and not args.remote_ok:
        raise options.OptionError("--host", f"{args.host!r} exposes the servers to other hosts, and anyone who can reach "
                                  "their ports can run code as this user: add --i-understand-remote-code-execution "
                                  "(and firewall the ports), or use --host 127.0.0.1")
    return values


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def run(args: argparse.Namespace) -> int:
    """Supervise the servers' child process: forward the first signal, bound the shutdown, exit 0."""
    try:
        duration = _check(args)["duration"]
    except options.OptionError as e:
        options.fail(e)
    if _loopback(args.host):
        print("navit-pack serve: warning: the tf.data service ports listen on every network interface, not only "
              f"{args.host}; anyone who can reach them can run code as this user (firewall them)", file=sys.stderr)
    import multiprocessing

    stop = threading.Event()
    children: list = []

    def on_signal(signum, frame):
        if stop.is_set():  # the second signal: end now, servers included
            for c in children:
                if c.is_alive():
                    c.kill()
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()  # set by the child once its servers are up: --duration counts from then
    child = context.Process(target=serve, args=(args, ready), name="navit-pack-serve")
    children.append(child)
    child.start()
    start = None
    while child.is_alive() and not stop.is_set():
        if start is None and ready.is_set():
            start = time.monotonic()
        if duration and start is not None and time.monotonic() - start >= duration:
            break
        child.join(0.1)
    stopping = stop.is_set() or (duration and start is not None and time.monotonic() - start >= duration)
    if not child.is_alive() and not stopping:  # ended on its own: an error it has reported
        return child.exitcode if child.exitcode and child.exitcode > 0 else 1
    if child.is_alive():
        os.kill(child.pid, signal.SIGTERM)
    child.join(STOP_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()
        print(f"navit-pack serve: the servers did not stop within {STOP_SECONDS:.0f} s and were killed", file=sys.stderr)
    return 0


def _claim(service, target: str, dataset_id: str, fingerprint: int) -> None:
    try:
        service.claim_options(target, dataset_id, fingerprint)
    except service.OptionsMismatch as e:
        options.fail(e)


def serve(args: argparse.Namespace, ready) -> None:
    """The child process: start the servers, register the dataset, set `ready`, and on SIGTERM or SIGINT
    report and exit. It also exits when its parent has gone (killed with SIGKILL)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    values = _check(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipelines import service

    source = None
    if values["workers"]:
        from pipelines.sources import open_source
        try:
            source = open_source(options.input_spec(args), labels=args.labels, meta_fields=values["meta_fields"])
        except Exception as e:  # noqa: BLE001 - any source error becomes one clear line
            options.fail(f"--input: {e}")
    fingerprint = None
    if source is not None:
        fingerprint = service.options_fingerprint(source, values["config"], epochs=values["epochs"],
                                                  group_units=values["group_units"], meta_fields=values["meta_fields"])
    if fingerprint is not None and args.dispatcher:  # before this process's workers join it
        _claim(service, f"grpc://{args.dispatcher}", args.dataset_id, fingerprint)
    local = service.LocalService(num_workers=values["workers"], port=values["port"], host=args.host,
                                 dispatcher=args.dispatcher, lost_after=values["worker_timeout"])
    if fingerprint is not None and not args.dispatcher:
        _claim(service, local.target, args.dataset_id, fingerprint)
    if source is None:
        print(f"navit-pack serve: dispatcher {local.target} alone; start workers with "
              f"--dispatcher {args.host}:{local.dispatcher_address.rsplit(':', 1)[1]}", flush=True)
    else:
        dataset = service.service_dataset(source, values["config"], epochs=values["epochs"],
                                          group_units=values["group_units"], meta_fields=values["meta_fields"],
                                          num_parallel=values["threads"])
        service.register(dataset, local.target, args.dataset_id)
        meta = values["meta_fields"]
        joined = "joined dispatcher" if args.dispatcher else "and dispatcher"
        print(f"navit-pack serve: {len(local.workers)} workers ({', '.join(local.worker_addresses)}) {joined} "
              f"{local.target}, dataset id {args.dataset_id!r}", flush=True)
        if not local.reporting:
            print(f"navit-pack serve: note: the dispatcher {local.target} has no navit-pack health registry: trainers "
                  "will not hear of a lost worker", file=sys.stderr, flush=True)
        print(f"  read with: pipelines.service.read_service({local.target!r}, config, dataset_id={args.dataset_id!r}, "
              f"processing_mode='dynamic'{', meta_fields=' + repr(meta) if meta else ''})", flush=True)
    ready.set()
    parent = os.getppid()
    while not stop.wait(0.2) and os.getppid() == parent:
        pass
    if os.environ.get(HANG_ON_STOP_ENV):  # tests: a child that never stops, as a deadlocked TF stop would
        while True:
            time.sleep(60)
    if service.REJECTS:
        print(f"navit-pack serve: rejected images by reason: {dict(service.REJECTS)}", file=sys.stderr)
    print("navit-pack serve: stopped", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not local.stop(): it can deadlock once a trainer has read (see pipelines.service.LocalService)
