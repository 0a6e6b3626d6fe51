"""`iommu-dma`: entry point, subcommand table and error reporting.

Exit status: 0 success, 1 failure (one line on stderr: `iommu-dma: error: ...`; the traceback
only with --debug), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from iommu_dma.cli import admin, devices, io, perf, serve, vmcmd
from iommu_dma.cli import devcmds as devcmds_cli
from iommu_dma.cli import zns as zns_cli
from iommu_dma.cli.common import PROG, cli_hints
from iommu_dma.errors import IommuDmaError

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def common_options(default: object) -> argparse.ArgumentParser:
    """--debug, accepted before and after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the traceback of an error")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common_options(False)],
        description="NVMe controllers from user space through VFIO (nvme-cli-like). Bind a "
                    "controller to vfio-pci first: `iommu-dma bind BDF`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options(argparse.SUPPRESS)
    for module in (devices, admin, io, perf, serve, vmcmd):
        module.register(sub, common)
    zns_cli.register(sub, common)
    devcmds_cli.register(sub, common)
    return parser


def describe(exc: BaseException) -> str:
    """One line for the user: the error's own text (file errors: 'path: reason'), with the
    library's binding hints written as `iommu-dma bind BDF`."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, IommuDmaError):
        name = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{name}{exc.strerror}"
    text = " ".join((str(exc) or type(exc).__name__).split())     # one line
    return cli_hints(text)


def _logging(debug: bool) -> None:
    """The library's log records (recovery steps, a removed device) on stderr with --debug;
    otherwise the one error line says it all."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    else:
        logging.getLogger("iommu_dma").addHandler(logging.NullHandler())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _logging(args.debug)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except (IommuDmaError, OSError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: {describe(e)}\n")
        return EXIT_FAILURE
    except Exception as e:                      # a bug: still one line, the traceback on --debug
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: internal error ({type(e).__name__}: {describe(e)}); "
                         "run again with --debug for the traceback and report it\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
