"""`iommu-dma serve BDF -n NSID`: the namespace as an NBD export, served by nbdkit."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

from iommu_dma.cli.common import CliError, add_nsid, int_range, positive, require_vfio, set_handler
from iommu_dma.errors import IommuDmaError
from iommu_dma.nbd.export import NamespaceExport
from iommu_dma.nbd.server import DEFAULT_PORT, ServeError, ServeOptions, Server
from iommu_dma.nvme.interrupts import WAIT_MODES

DEFAULT_THREADS = 4


class _Stop(IommuDmaError):
    """SIGINT or SIGTERM: stop serving."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def probe(bdf: str, nsid: int, readonly: bool) -> int:
    """Open the controller once to check the namespace (clear errors before nbdkit starts);
    its LBA size."""
    from iommu_dma.nvme.controller import Controller

    with Controller.open(bdf) as ctrl:
        export = NamespaceExport(ctrl.namespace(nsid), readonly=readonly)
        export.close()
        return export.caps.lba_size


def cmd_serve(args: argparse.Namespace) -> int:
    if args.socket and args.port:
        raise CliError("--socket and --port exclude each other: a Unix socket or TCP")
    bdf = require_vfio(args.bdf)
    opts = ServeOptions(bdf=bdf, nsid=args.nsid, socket=args.socket, port=args.port,
                        address=args.address, readonly=args.readonly, threads=args.threads,
                        wait=args.wait, extra=tuple(args.nbdkit_option))
    lba_size = probe(bdf, args.nsid, args.readonly)
    server = Server(opts, lba_size=lba_size, verbose=args.debug)
    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
            print(opts.uri, flush=True)
            rc = server.wait()
        except _Stop as e:
            print(f"iommu-dma serve: {e}: stopping", file=sys.stderr, flush=True)
            rc = 0
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # let nbdkit finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stopped = server.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0 or stopped not in (0, None, -signal.SIGTERM, -signal.SIGINT):
        raise ServeError(f"nbdkit ended with status {stopped if rc == 0 else rc}")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve a namespace over NBD (nbdkit)",
                       description="Export a namespace over NBD: nbdkit speaks the protocol "
                                   "(connections, multi-conn, TLS), iommu-dma drives the "
                                   "controller, one queue pair per nbdkit thread. Prints the "
                                   "NBD URI once it listens; SIGINT or SIGTERM stops it "
                                   "(connections ended, cache flushed, controller shut down).")
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    add_nsid(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int_range(1, 65535, "a TCP port"), default=None,
                       help=f"listen on this TCP port (default {DEFAULT_PORT})")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="TCP address to listen on (default: all)")
    p.add_argument("--readonly", action="store_true", help="refuse writes, trims and zeroes")
    p.add_argument("--threads", type=positive, default=DEFAULT_THREADS,
                   help="nbdkit threads per connection, each with its own queue pair (default "
                        f"{DEFAULT_THREADS}: the plugin runs under Python's GIL, so more threads "
                        "mostly contend for it; nbdkit's own default is 16)")
    p.add_argument("--wait", choices=WAIT_MODES, default="interrupt",
                   help="how each queue pair waits: interrupt (default: no CPU while idle), "
                        "poll or hybrid")
    p.add_argument("--nbdkit-option", action="append", default=[], metavar="OPT",
                   help="pass OPT to nbdkit (repeatable), e.g. --nbdkit-option=--tls=require "
                        "--nbdkit-option=--tls-certificates=/etc/pki/nbdkit")
    set_handler(p, cmd_serve)
