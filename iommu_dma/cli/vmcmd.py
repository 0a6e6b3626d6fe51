"""`vm`: run a command inside a bench guest (QEMU + emulated IOMMU + emulated NVMe)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from iommu_dma.cli.common import CliError, seconds, set_handler

TIMEOUT_EXIT = 124


def cmd_vm(args: argparse.Namespace) -> int:
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("vm: give the command to run, e.g. `iommu-dma vm -- iommu-dma list`")
    try:
        bench = get_bench(args.bench)
    except KeyError as e:
        raise CliError(str(e.args[0])) from None
    try:
        result = vm.run(bench, shlex.join(command), timeout=args.timeout)
    except vm.HostRequirementsError as e:
        raise CliError(str(e)) from None           # nothing booted: exit 1, what to install
    except vm.VmError as e:
        sys.stderr.write(f"iommu-dma: error: {e}\n")
        return TIMEOUT_EXIT
    return result.returncode


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from iommu_dma.testing.bench import BENCHES
    from iommu_dma.testing.vm import DEFAULT_TIMEOUT

    p = sub.add_parser("vm", parents=[common], help="run a command inside a bench guest",
                       description="Boot a bench guest (the host's kernel and root filesystem, "
                                   "emulated Intel IOMMU and NVMe controllers), run COMMAND in "
                                   "it as root, exit with its status (124: guest timed out).")
    p.add_argument("--bench", default="default",
                   help=f"bench configuration: {', '.join(sorted(BENCHES))} (default: default)")
    p.add_argument("--timeout", type=seconds(), default=DEFAULT_TIMEOUT,
                   help=f"seconds before the guest is killed (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                   help="command and its arguments")
    set_handler(p, cmd_vm)
