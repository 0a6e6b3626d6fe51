"""Pieces every subcommand shares: errors, option types, opening a controller, confirmation."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from iommu_dma.discovery import VFIO_DRIVER, find, normalize_bdf
from iommu_dma.errors import IommuDmaError

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller
    from iommu_dma.nvme.namespace import Namespace

PROG = "iommu-dma"
NSID_MAX = 0xFFFF_FFFF          # NSIDs are 32-bit; 0xFFFFFFFF is the broadcast value
WEEK = 7 * 24 * 3600
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
# The library's hints name the setup script of the source tree (`scripts/setup_vfio.sh bind
# BDF`); the CLI user runs `iommu-dma bind BDF`, which runs the packaged copy of that script.
_SCRIPT_HINT = re.compile(r"(?:[\w./-]*/)?setup_vfio\.sh (?=bind|unbind|--user|--force)")
_SCRIPT_STATUS = re.compile(r"(?:[\w./-]*/)?setup_vfio\.sh status")
_SCRIPT_FALLBACK = re.compile(r" \(or `(?:[\w./-]*/)?setup_vfio\.sh [^`]*`\)")


def cli_hints(text: str) -> str:
    """text with the setup script's commands written as the CLI's (`iommu-dma bind BDF`); a
    "(or `scripts/setup_vfio.sh ...`)" alternative after the CLI's own command is dropped."""
    text = _SCRIPT_FALLBACK.sub("", text)
    return _SCRIPT_STATUS.sub(f"{PROG} list", _SCRIPT_HINT.sub(f"{PROG} ", text))


class CliError(IommuDmaError):
    """A failure the command explains in one line (exit status 1)."""


def parse_size(text: str) -> int:
    """fio-style sizes: 4096, 4k, 128K, 1m, 2MiB, 1g (binary multiples, as fio's defaults)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 4k, 128k, 1m, 1g)")
    return int(m.group(1)) << _SHIFTS[m.group(2).lower()]


def nonnegative(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive(text: str) -> int:
    value = nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def int_range(low: int, high: int, what: str = "") -> Any:
    """An argparse type: an integer (decimal or 0x...) in low..high."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            limit = f"{low}..{high}" if high < 1 << 20 else f"{low}..{high:#x}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what or 'the value'} "
                                             f"must be in {limit}")
        return value
    parse.__name__ = what or "integer"            # argparse names the type in its messages
    return parse


nsid_type = int_range(1, NSID_MAX, "a namespace ID (NSID)")
any_nsid_type = int_range(0, NSID_MAX, "a namespace ID (0 = none)")


def seconds(low_exclusive: float = 0.0, high: float = WEEK) -> Any:
    """An argparse type: a finite number of seconds, > low_exclusive and <= high."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or not low_exclusive < value <= high:
            raise argparse.ArgumentTypeError(
                f"{text} seconds: give a finite number above {low_exclusive:g} and at most "
                f"{high:g} ({high / 86400:g} days)")
        return value
    parse.__name__ = "seconds"
    return parse


def add_output_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output-format", choices=("normal", "json"), default="normal",
                        help="normal (human) or json output (default: normal)")


def add_nsid(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-n", "--namespace-id", dest="nsid", type=nsid_type, required=required,
                        default=None if required else 1, help="namespace ID")


def require_vfio(bdf: str) -> str:
    """The normalized BDF of an NVMe controller bound to vfio-pci; CliError otherwise."""
    info = find(normalize_bdf(bdf))
    if info.driver != VFIO_DRIVER:
        owner = f"bound to the kernel {info.driver} driver" if info.driver else \
            "not bound to any driver"
        raise CliError(f"{info.bdf} is {owner}, not vfio-pci; run `{PROG} bind {info.bdf}` "
                       "first")
    return info.bdf


@contextmanager
def controller(bdf: str) -> Iterator[Controller]:
    """Controller.open of a vfio-pci-bound controller, closed afterwards."""
    from iommu_dma.nvme.controller import Controller

    with Controller.open(require_vfio(bdf)) as ctrl:
        yield ctrl


@contextmanager
def namespace(bdf: str, nsid: int) -> Iterator[Namespace]:
    with controller(bdf) as ctrl:
        yield ctrl.namespace(nsid)


def confirm(question: str, force: bool, refusal: str) -> None:
    """Ask on the terminal unless force; CliError when declined or stdin is not a terminal."""
    if force:
        return
    if not sys.stdin.isatty():
        raise CliError(f"{refusal}; stdin is not a terminal to ask for confirmation: "
                       "add --force")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("aborted")


def set_handler(parser: argparse.ArgumentParser, func: Any) -> None:
    parser.set_defaults(func=func)
