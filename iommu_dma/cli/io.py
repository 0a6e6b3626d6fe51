"""Block I/O: read, write, compare.

Unlike nvme-cli, whose -c/--block-count is 0's based (NLB), --block-count here is a natural
count: `--block-count 8` moves 8 blocks.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

from iommu_dma.cli import output
from iommu_dma.cli.common import (
    CliError,
    add_nsid,
    add_output_format,
    namespace,
    nonnegative,
    positive,
    set_handler,
)

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace

CHUNK = 4 << 20                 # bytes moved per round trip through DMA memory
COUNT_HELP = ("number of blocks (a natural count: 8 means 8 blocks; nvme-cli's -c is 0's "
              "based, this one is not)")


def check_range(ns: Namespace, start: int, count: int) -> None:
    """Refuse LBAs outside the namespace before sending anything."""
    if count < 1:
        raise CliError("--block-count must be at least 1")
    if start + count > ns.blocks:
        raise CliError(f"LBA out of range: blocks {start}..{start + count - 1} do not fit "
                       f"namespace {ns.nsid} (LBAs 0..{ns.blocks - 1}, {ns.lba_size}-byte "
                       "blocks)")


def chunks(ns: Namespace, start: int, count: int) -> list[tuple[int, int]]:
    """(lba, blocks) pieces of at most CHUNK bytes covering start..start+count-1."""
    step = max(1, CHUNK // ns.lba_size)
    return [(lba, min(step, start + count - lba)) for lba in range(start, start + count, step)]


def payload_pieces(ns: Namespace, start: int, blocks: int,
                   payload: bytes) -> list[tuple[int, int, bytes]]:
    """(lba, blocks, bytes) of payload in chunks(): what write and compare send per call."""
    return [(lba, n, payload[(lba - start) * ns.lba_size:(lba - start + n) * ns.lba_size])
            for lba, n in chunks(ns, start, blocks)]


def read_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def padded(data: bytes, lba_size: int, count: int | None, path: str) -> tuple[bytes, int]:
    """data cut or zero-padded to whole blocks (count of them when given); (bytes, blocks)."""
    if not data:
        raise CliError(f"{path}: the file is empty; nothing to write")
    blocks = count if count is not None else -(-len(data) // lba_size)
    want = blocks * lba_size
    if len(data) < want:
        sys.stderr.write(f"note: {path} holds {len(data)} bytes; the last block is zero-padded "
                         f"to {want} bytes ({blocks} blocks of {lba_size})\n")
    return data[:want].ljust(want, b"\0"), blocks


def _report(args: argparse.Namespace, op: str, ns: Namespace, start: int, blocks: int) -> None:
    if args.output_format == "json":
        output.emit_json({"op": op, "nsid": ns.nsid, "start_block": start, "blocks": blocks,
                          "bytes": blocks * ns.lba_size, "result": "success"})
    elif op != "read":
        print(f"{op}: Success ({blocks} blocks of {ns.lba_size} bytes at LBA {start})")


def _open_output(path: str | None) -> BinaryIO:
    if path is None or path == "-":
        return sys.stdout.buffer
    return open(path, "wb")  # noqa: SIM115 - closed by the caller


def cmd_read(args: argparse.Namespace) -> int:
    if args.output_format == "json" and args.data in (None, "-"):
        raise CliError("--output-format json needs --data FILE (stdout carries the data)")
    with namespace(args.bdf, args.nsid) as ns:
        check_range(ns, args.start_block, args.block_count)
        out = _open_output(args.data)
        try:
            for lba, n in chunks(ns, args.start_block, args.block_count):
                out.write(ns.read(lba, n))
            out.flush()
        finally:
            if out is not sys.stdout.buffer:
                out.close()
        _report(args, "read", ns, args.start_block, args.block_count)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    data = read_file(args.data)
    with namespace(args.bdf, args.nsid) as ns:
        payload, blocks = padded(data, ns.lba_size, args.block_count, args.data)
        check_range(ns, args.start_block, blocks)
        for lba, _, piece in payload_pieces(ns, args.start_block, blocks, payload):
            ns.write(lba, piece)
        ns.flush()
        _report(args, "write", ns, args.start_block, blocks)
    return 0


def _equal(ns: Namespace, lba: int, data: bytes) -> bool:
    """Compare command when the controller has it (ONCS bit 0), else read and compare here."""
    if ns.ctrl.identify.oncs & 1:
        return bool(ns.compare(lba, data))
    return ns.read(lba, len(data) // ns.lba_size) == data


def cmd_compare(args: argparse.Namespace) -> int:
    data = read_file(args.data)
    with namespace(args.bdf, args.nsid) as ns:
        payload, blocks = padded(data, ns.lba_size, args.block_count, args.data)
        check_range(ns, args.start_block, blocks)
        for lba, n, piece in payload_pieces(ns, args.start_block, blocks, payload):
            if not _equal(ns, lba, piece):
                raise CliError(f"Compare Failure: LBAs {lba}..{lba + n - 1} of namespace "
                               f"{ns.nsid} differ from {args.data}")
        _report(args, "compare", ns, args.start_block, blocks)
    return 0


def _parser(sub: Any, common: argparse.ArgumentParser, name: str, what: str,
            func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=what, description=f"{what}. {__doc__}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    add_nsid(p)
    p.add_argument("-s", "--start-block", type=nonnegative, default=0,
                   help="first LBA (default 0)")
    add_output_format(p)
    set_handler(p, func)
    return p


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "read", "Read blocks to a file or stdout", cmd_read)
    p.add_argument("-c", "--block-count", type=positive, default=1, help=COUNT_HELP +
                   " (default 1)")
    p.add_argument("-d", "--data", metavar="FILE", help="where to write the data (default stdout)")
    p = _parser(sub, common, "write", "Write blocks from a file", cmd_write)
    p.add_argument("-c", "--block-count", type=positive, default=None, help=COUNT_HELP +
                   " (default: the file's size rounded up to whole blocks, zero-padded)")
    p.add_argument("-d", "--data", metavar="FILE", required=True, help="data to write (- = stdin)")
    p = _parser(sub, common, "compare", "Compare blocks with a file (exit 1 if they differ)",
                cmd_compare)
    p.add_argument("-c", "--block-count", type=positive, default=None, help=COUNT_HELP +
                   " (default: the file's size rounded up to whole blocks, zero-padded)")
    p.add_argument("-d", "--data", metavar="FILE", required=True, help="expected data (- = stdin)")
