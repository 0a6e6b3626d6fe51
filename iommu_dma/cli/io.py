"""Block I/O: read, write, compare.

Metadata and protection information (nvme-cli's options): -M/--metadata FILE holds the
metadata of the blocks (ms bytes each; also for extended-LBA namespaces, whose data file
holds the data only), -p/--prinfo PRINFO (8 PRACT, 4 guard, 2 application tag, 1 reference
tag checks), -r/--ref-tag ILBRT (default: the low 32 bits of the LBA), -a/--app-tag LBAT,
-m/--app-tag-mask LBATM. On a namespace whose metadata is only the 8-byte PI, reads and
writes without --metadata use PRACT (the controller inserts and strips the PI).

Unlike nvme-cli, whose -c/--block-count is 0's based (NLB), --block-count here is a natural
count: `--block-count 8` moves 8 blocks.

Data moves CHUNK bytes at a time: a file's last partial block is zero-padded; data from stdin
(`--data -`) is streamed and must be a whole number of blocks.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from iommu_dma.cli import output
from iommu_dma.cli.common import (
    CliError,
    add_nsid,
    add_output_format,
    int_range,
    namespace,
    nonnegative,
    positive,
    seconds,
    set_handler,
)
from iommu_dma.nvme.recovery import DEFAULT_IO_TIMEOUT, DEFAULT_RETRIES

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace

CHUNK = 4 << 20                 # bytes moved per round trip through DMA memory
COUNT_HELP = ("number of blocks (a natural count: 8 means 8 blocks; nvme-cli's -c is 0's "
              "based, this one is not)")


def check_range(ns: Namespace, start: int, count: int) -> None:
    """Refuse LBAs outside the namespace before sending anything."""
    if count < 1:
        raise CliError("--block-count must be at least 1")
    if start >= ns.blocks:
        raise CliError(f"--start-block {start} is past the end of namespace {ns.nsid} "
                       f"(LBAs 0..{ns.blocks - 1}, {ns.lba_size}-byte blocks)")
    if start + count > ns.blocks:
        raise CliError(f"LBA out of range: blocks {start}..{start + count - 1} do not fit "
                       f"namespace {ns.nsid} (LBAs 0..{ns.blocks - 1}, {ns.lba_size}-byte "
                       "blocks)")


def chunks(ns: Namespace, start: int, count: int) -> list[tuple[int, int]]:
    """(lba, blocks) pieces of at most CHUNK bytes covering start..start+count-1."""
    step = max(1, CHUNK // ns.lba_size)
    return [(lba, min(step, start + count - lba)) for lba in range(start, start + count, step)]


def read_full(f: BinaryIO, size: int) -> bytes:
    """Up to size bytes of f: fewer only at the end of the data (pipes return short reads)."""
    parts, got = [], 0
    while got < size:
        part = f.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class Source:
    """The data of write/compare, read CHUNK by CHUNK (never all at once). A regular file's
    size is known up front: its partial last block is zero-padded (with a note). A stream
    (`-` = stdin, a pipe) must hold whole blocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path == "-":
            self.name, self.file, self.size = "stdin", sys.stdin.buffer, None
            return
        self.name = path
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        st = os.fstat(self.file.fileno())
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else None

    def close(self) -> None:
        if self.file is not sys.stdin.buffer:
            self.file.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plan(self, ns: Namespace, start: int, count: int | None) -> int | None:
        """Check the arguments against ns before reading anything: the number of blocks to
        move (None: a stream without --block-count, as many as it holds)."""
        if self.size == 0:
            raise CliError(f"{self.name}: the file is empty; no data")
        if start >= ns.blocks:
            check_range(ns, start, 1)
        if self.size is None:
            if count is not None:
                check_range(ns, start, count)
            return count
        blocks = count if count is not None else -(-self.size // ns.lba_size)
        check_range(ns, start, blocks)
        want = blocks * ns.lba_size
        if self.size < want:
            sys.stderr.write(f"note: {self.name} holds {self.size} bytes; the last block is "
                             f"zero-padded to {want} bytes ({blocks} blocks of "
                             f"{ns.lba_size})\n")
        return blocks

    def pieces(self, ns: Namespace, start: int, blocks: int | None,
               verb: str = "written") -> Iterator[tuple[int, int, bytes]]:
        """(lba, blocks, bytes) in pieces of at most CHUNK bytes, each read when needed (verb:
        what the caller did with the pieces taken so far, for the error messages)."""
        lba_size, step = ns.lba_size, max(1, CHUNK // ns.lba_size)
        lba, end = start, (start + blocks if blocks is not None else ns.blocks)
        while lba < end or (blocks is None and lba == end):
            n = min(step, end - lba) if lba < end else 1
            data = read_full(self.file, n * lba_size)
            if self.size is not None:                  # a file: pad its last block
                yield lba, n, data.ljust(n * lba_size, b"\0")
                lba += n
                continue
            done = f"; LBAs {start}..{lba - 1} were already {verb}" if lba > start else ""
            if not data:
                if lba == start:
                    raise CliError(f"{self.name} is empty; no data")
                if blocks is not None:
                    raise CliError(f"{self.name} ended after {lba - start} blocks; "
                                   f"--block-count asked for {blocks}{done}")
                return
            if lba >= end:
                raise CliError(f"{self.name} holds more than the {ns.blocks - start} blocks "
                               f"from LBA {start} to the end of namespace {ns.nsid}{done}")
            whole, rest = divmod(len(data), lba_size)
            if rest:
                raise CliError(f"{self.name}: data read from a stream must be a whole number "
                               f"of {lba_size}-byte blocks; it ends with {rest} bytes of a "
                               f"block (pad it, or give a file: a file's last block is "
                               f"zero-padded){done}")
            yield lba, whole, data
            lba += whole
            if whole < n:
                if blocks is not None:
                    raise CliError(f"{self.name} ended after {lba - start} blocks; "
                                   f"--block-count asked for {blocks}; LBAs "
                                   f"{start}..{lba - 1} were already {verb}")
                return


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


def _pi_args(args: argparse.Namespace, lba: int) -> dict[str, Any]:
    """The protection fields of the piece of read/write at lba (None: the library's
    default); a given --ref-tag is the first block's, one more for each later block."""
    ref = None if args.ref_tag is None else (args.ref_tag + lba - args.start_block) & 0xFFFF_FFFF
    return {"prinfo": args.prinfo, "reftag": ref, "apptag": args.app_tag,
            "appmask": args.app_tag_mask}


def _read_piece(ns: Namespace, args: argparse.Namespace, lba: int, n: int,
                meta_out: BinaryIO | None) -> bytes:
    """Data of n blocks (metadata written to meta_out, or dropped from extended LBAs)."""
    if not ns.ms or (meta_out is None and not ns.extended):
        return ns.read(lba, n, **_pi_args(args, lba))
    data, meta = ns.read_metadata(lba, n, **_pi_args(args, lba))
    if meta_out is not None:
        meta_out.write(meta)
    return data


def cmd_read(args: argparse.Namespace) -> int:
    if args.output_format == "json" and args.data in (None, "-"):
        raise CliError("--output-format json needs --data FILE (stdout carries the data)")
    with _namespace(args) as ns:
        check_range(ns, args.start_block, args.block_count)
        if args.metadata and not ns.ms:
            raise CliError(f"--metadata: namespace {ns.nsid} has no metadata (MS 0)")
        pract = args.prinfo is None or args.prinfo & 0x8
        if (ns.ms and not ns.extended and not args.metadata
                and not (ns.pi is not None and ns.ms == 8 and pract)):
            raise CliError(f"namespace {ns.nsid} keeps {ns.ms} bytes of metadata per block in "
                           "a separate buffer: give --metadata FILE (or --prinfo 8, PRACT, "
                           "on a format whose metadata is only the PI)")
        out = _open_output(args.data)
        meta_out = open(args.metadata, "wb") if args.metadata else None  # noqa: SIM115
        try:
            for lba, n in chunks(ns, args.start_block, args.block_count):
                out.write(_read_piece(ns, args, lba, n, meta_out))
            out.flush()
        finally:
            if out is not sys.stdout.buffer:
                out.close()
            if meta_out is not None:
                meta_out.close()
        _report(args, "read", ns, args.start_block, args.block_count)
    return 0


def _write_metadata(ns: Namespace, args: argparse.Namespace, meta: bytes | None,
                    offset: int, n: int) -> bytes | None:
    """The metadata of n blocks offset blocks into the write: from --metadata, zeroes for the
    controller to fill with PRACT, or None when the controller moves none."""
    if not ns.ms:
        if meta is not None:
            raise CliError(f"--metadata: namespace {ns.nsid} has no metadata (MS 0)")
        return None
    pract = args.prinfo is not None and args.prinfo & 0x8
    if meta is None:
        if not ns.extended and ns.pi is not None and ns.ms == 8 and (
                args.prinfo is None or pract):
            return None                             # PRACT: the controller makes the PI
        if not pract:
            raise CliError(f"namespace {ns.nsid} has {ns.ms} bytes of metadata per block: "
                           "give --metadata FILE, or --prinfo 8 (PRACT) on a PI format")
        return bytes(n * ns.ms)
    piece = meta[offset * ns.ms:(offset + n) * ns.ms]
    if len(piece) != n * ns.ms:
        raise CliError(f"--metadata holds {len(meta)} bytes; {offset + n} blocks need "
                       f"{(offset + n) * ns.ms} ({ns.ms} per block)")
    return piece


def cmd_write(args: argparse.Namespace) -> int:
    meta = None
    if args.metadata:
        with open(args.metadata, "rb") as f:
            meta = f.read()
    with Source(args.data) as src, namespace(args.bdf, args.nsid) as ns:
        planned = src.plan(ns, args.start_block, args.block_count)
        blocks = 0
        for lba, n, piece in src.pieces(ns, args.start_block, planned):
            md = _write_metadata(ns, args, meta, lba - args.start_block, n)
            ns.write(lba, piece, metadata=md, **_pi_args(args, lba))
            blocks += n
        ns.flush()
        _report(args, "write", ns, args.start_block, blocks)
    return 0


def _equal(ns: Namespace, lba: int, data: bytes) -> bool:
    """Compare command when the controller has it (ONCS bit 0), else read and compare here."""
    if ns.ctrl.identify.oncs & 1:
        return bool(ns.compare(lba, data))
    return ns.read(lba, len(data) // ns.lba_size) == data


def cmd_compare(args: argparse.Namespace) -> int:
    with Source(args.data) as src, namespace(args.bdf, args.nsid) as ns:
        planned = src.plan(ns, args.start_block, args.block_count)
        blocks = 0
        for lba, n, piece in src.pieces(ns, args.start_block, planned, "compared"):
            if not _equal(ns, lba, piece):
                raise CliError(f"Compare Failure: LBAs {lba}..{lba + n - 1} of namespace "
                               f"{ns.nsid} differ from {src.name}")
            blocks += n
        _report(args, "compare", ns, args.start_block, blocks)
    return 0


@contextmanager
def _namespace(args: argparse.Namespace) -> Iterator[Namespace]:
    """The namespace, with the command's --retries and --timeout in its controller's policy."""
    with namespace(args.bdf, args.nsid) as ns:
        ns.ctrl.recovery.retries = args.retries
        ns.ctrl.recovery.io_timeout = args.timeout
        yield ns


def _parser(sub: Any, common: argparse.ArgumentParser, name: str, what: str,
            func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=what, description=f"{what}. {__doc__}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    add_nsid(p)
    p.add_argument("-s", "--start-block", type=nonnegative, default=0,
                   help="first LBA (default 0)")
    p.add_argument("--retries", type=nonnegative, default=DEFAULT_RETRIES,
                   help="send a command that failed with DNR clear again up to this many times "
                   f"(default {DEFAULT_RETRIES}, as Linux; 0 shows every status)")
    p.add_argument("--timeout", type=seconds(), default=DEFAULT_IO_TIMEOUT,
                   help="seconds a command may take before it is aborted and, if it does not "
                   f"come back, the controller reset (default {DEFAULT_IO_TIMEOUT:g})")
    add_output_format(p)
    set_handler(p, func)
    if name != "compare":
        _pi_options(p)
    return p


def _pi_options(p: argparse.ArgumentParser) -> None:
    """nvme-cli's metadata and protection options of read/write."""
    p.add_argument("-M", "--metadata", metavar="FILE",
                   help="metadata of the blocks (ms bytes each): read writes it there, write "
                   "takes it from there")
    p.add_argument("-p", "--prinfo", type=int_range(0, 15, "PRINFO"), default=None,
                   help="PRINFO: 8 PRACT, 4 check guard, 2 check application tag, 1 check "
                   "reference tag (default: PRACT with guard/ref checks when the metadata "
                   "is only the 8-byte PI and no --metadata is given, else 0)")
    p.add_argument("-r", "--ref-tag", type=int_range(0, 0xFFFF_FFFF, "a reference tag"),
                   default=None, help="ILBRT (default: the low 32 bits of the LBA)")
    p.add_argument("-a", "--app-tag", type=int_range(0, 0xFFFF, "an application tag"),
                   default=0, help="LBAT, the expected application tag")
    p.add_argument("-m", "--app-tag-mask", type=int_range(0, 0xFFFF, "an app tag mask"),
                   default=0, help="LBATM, the bits of the application tag checked")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "read", "Read blocks to a file or stdout", cmd_read)
    p.add_argument("-c", "--block-count", type=positive, default=1, help=COUNT_HELP +
                   " (default 1)")
    p.add_argument("-d", "--data", metavar="FILE", help="where to write the data (default stdout)")
    p = _parser(sub, common, "write", "Write blocks from a file", cmd_write)
    p.add_argument("-c", "--block-count", type=positive, default=None, help=COUNT_HELP +
                   " (default: the file's size rounded up to whole blocks, zero-padded)")
    p.add_argument("-d", "--data", metavar="FILE", required=True,
                   help="data to write (- = stdin, streamed: whole blocks only)")
    p = _parser(sub, common, "compare", "Compare blocks with a file (exit 1 if they differ)",
                cmd_compare)
    p.add_argument("-c", "--block-count", type=positive, default=None, help=COUNT_HELP +
                   " (default: the file's size rounded up to whole blocks, zero-padded)")
    p.add_argument("-d", "--data", metavar="FILE", required=True,
                   help="expected data (- = stdin, streamed: whole blocks only)")
