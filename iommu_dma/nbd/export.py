"""The NBD operations on a namespace: byte ranges to LBAs, FUA, trim, (fast) zero, flush, and
every failure as the errno NBD sends back (NBD protocol, "Error values").

Thread-safe: nbdkit's worker threads call one NamespaceExport at once. Each call takes a
bounce buffer (DMA memory) from a pool, so the pool grows to the number of threads that are
in a call together; the commands go to the calling thread's own queue pair when the
controller was opened with per_thread_queues=True.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.memory import DmaBuffer
from iommu_dma.nvme.constants import (
    ONCS_DSM,
    ONCS_WRITE_ZEROES,
    SCT_CMD_SPECIFIC,
    SCT_GENERIC,
    SCT_MEDIA,
)
from iommu_dma.nvme.status import ControllerFailedError, NvmeError, NvmeTimeoutError

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace

CHUNK = 1 << 20                 # bytes per bounce buffer: larger requests go in pieces
NSATTR = 99                     # Identify Namespace byte 99 bit 0: write protected
# DLFEAT (Identify Namespace byte 33, NVM Command Set §4.1.5.1): bit 3, Write Zeroes may
# deallocate (DEAC); bits 2:0 = 001b, deallocated blocks read as zeroes.
DLFEAT_WZ_DEAC = 1 << 3
DLFEAT_READS_ZEROES = 0b001

# NVMe statuses whose NBD errno is not EIO (NBD allows EPERM, EIO, ENOMEM, EINVAL, ENOSPC,
# EOVERFLOW, ENOTSUP, ESHUTDOWN).
_STATUS_ERRNO = {
    (SCT_GENERIC, 0x02): errno.EINVAL,      # Invalid Field in Command
    (SCT_GENERIC, 0x0B): errno.EINVAL,      # Invalid Namespace or Format
    (SCT_GENERIC, 0x20): errno.EPERM,       # Namespace is Write Protected
    (SCT_GENERIC, 0x80): errno.ENOSPC,      # LBA Out of Range
    (SCT_GENERIC, 0x81): errno.ENOSPC,      # Capacity Exceeded
    (SCT_CMD_SPECIFIC, 0x82): errno.EPERM,  # Attempted Write to Read Only Range
    (SCT_MEDIA, 0x86): errno.EPERM,         # Access Denied
}


class ExportError(IommuDmaError):
    """An NBD request that failed: `errno` is what the client gets; the text names the
    request and the cause (the NVMe status by name)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{text} [{errno.errorcode.get(code, code)}]")
        self.errno = code


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for a failure of the library."""
    if isinstance(exc, ExportError):
        return exc.errno
    if isinstance(exc, NvmeError):
        return _STATUS_ERRNO.get((exc.sct, exc.sc), errno.EIO)
    if isinstance(exc, ClosedError):
        return errno.ESHUTDOWN          # the server is going away (or the device went)
    if isinstance(exc, (NvmeTimeoutError, ControllerFailedError)):
        return errno.EIO
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    if isinstance(exc, ValueError):
        return errno.EINVAL
    return errno.EIO


@dataclass(frozen=True)
class Capabilities:
    """What the export offers, from Identify (read once at start)."""

    size: int
    lba_size: int
    can_write: bool
    can_trim: bool              # Dataset Management (ONCS bit 2)
    write_zeroes: bool          # Write Zeroes (ONCS bit 3); else zeroes are written as data
    cheap_zero: bool            # Write Zeroes may deallocate, and deallocated blocks read 0
    volatile_cache: bool        # VWC bit 0: FUA and Flush have work to do
    write_protected: bool


def capabilities(ns: Namespace, readonly: bool) -> Capabilities:
    ident, cid = ns.identify, ns.ctrl.identify
    protected = bool(ident.raw[NSATTR] & 1)
    writable = not readonly and not protected
    wz = cid.nvm_supported(ONCS_WRITE_ZEROES)
    return Capabilities(
        size=ns.capacity, lba_size=ns.lba_size, can_write=writable,
        can_trim=writable and cid.nvm_supported(ONCS_DSM), write_zeroes=wz,
        cheap_zero=wz and bool(ident.dlfeat & DLFEAT_WZ_DEAC)
        and ident.dlfeat & 0b111 == DLFEAT_READS_ZEROES,
        volatile_cache=bool(cid.vwc & 1), write_protected=protected)


def check_data_only(ns: Namespace) -> None:
    """NBD carries data only: refuse a namespace whose blocks carry metadata the host must
    move, unless the metadata is just the 8-byte PI the controller inserts and strips
    (PRACT, NVM Command Set 1.0 §5.3.2), which Namespace reads and writes use by default."""
    if not ns.ms or (ns.pi is not None and ns.ms == 8 and ns.block_bytes == ns.lba_size):
        return
    layout = "extended LBAs" if ns.extended else "a separate metadata buffer"
    raise ExportError(errno.EINVAL, f"namespace {ns.nsid} carries {ns.ms} bytes of metadata "
                      f"per block ({layout}), which NBD cannot carry; serve a namespace "
                      "without metadata, or reformat this one to an LBA format without it "
                      f"(`iommu-dma format {ns.ctrl.bdf} -n {ns.nsid} --lbaf N`)")


class NamespaceExport:
    """One namespace as an NBD export. Offsets and lengths are bytes and must be multiples
    of the logical block size (nbdkit's blocksize filter in front does read-modify-write for
    clients that send less)."""

    def __init__(self, ns: Namespace, *, readonly: bool = False, chunk: int = CHUNK) -> None:
        check_data_only(ns)
        if chunk < ns.lba_size or chunk % ns.lba_size:
            raise ValueError(f"chunk {chunk} must be a positive multiple of the "
                             f"{ns.lba_size}-byte block")
        self.ns = ns
        self.caps = capabilities(ns, readonly)
        self.chunk = chunk
        self._pool: list[DmaBuffer] = []
        self._pool_lock = threading.Lock()
        self._closed = False

    # ---- bounce buffers ------------------------------------------------------------------

    def _take(self) -> DmaBuffer:
        with self._pool_lock:
            if self._closed:
                raise ClosedError(f"the NBD export of {self.ns!r}")
            if self._pool:
                return self._pool.pop()
        return self.ns.ctrl.alloc(self.chunk)

    def _give(self, buf: DmaBuffer) -> None:
        """A buffer a command still points at (it timed out) is freed, which quarantines it
        until the device is done with it; the pool only keeps buffers nobody can write."""
        with self._pool_lock:
            if not self._closed and not buf.device_owned:
                self._pool.append(buf)
                return
        buf.free()

    def _check(self, offset: int, count: int, what: str) -> None:
        lba = self.caps.lba_size
        if offset % lba or count % lba:
            raise ExportError(errno.EINVAL, f"{what}: {count} bytes at offset {offset} are not "
                                            f"whole {lba}-byte blocks")
        if offset < 0 or count < 0 or offset + count > self.caps.size:
            raise ExportError(errno.EINVAL if what == "read" else errno.ENOSPC,
                              f"{what}: {count} bytes at offset {offset} end past the "
                              f"{self.caps.size}-byte export")

    def _pieces(self, offset: int, count: int, what: str) -> Iterator[tuple[int, int, int]]:
        """(slba, nlb, byte offset into the request) per chunk of a checked byte range."""
        self._check(offset, count, what)
        lba = self.caps.lba_size
        for done in range(0, count, self.chunk):
            n = min(self.chunk, count - done)
            yield (offset + done) // lba, n // lba, done

    def _check_writable(self, what: str) -> None:
        if not self.caps.can_write:
            why = ("the namespace is write protected" if self.caps.write_protected
                   else "the export is read-only")
            raise ExportError(errno.EPERM, f"{what}: {why}")

    # ---- the NBD operations --------------------------------------------------------------

    def pread(self, out: memoryview, offset: int) -> None:
        """Fill out (len(out) bytes) from offset."""
        buf = self._take()
        try:
            for slba, nlb, at in self._pieces(offset, len(out), "read"):
                n = nlb * self.caps.lba_size
                self.ns.read_into(slba, buf, nlb)
                out[at:at + n] = buf.view[:n]
        finally:
            self._give(buf)

    def pwrite(self, data: memoryview, offset: int, *, fua: bool = False) -> None:
        """Write data at offset; fua: on non-volatile media when this returns."""
        self._check_writable("write")
        fua = fua and self.caps.volatile_cache      # without a volatile cache it already is
        buf = self._take()
        try:
            for slba, nlb, at in self._pieces(offset, len(data), "write"):
                n = nlb * self.caps.lba_size
                buf.view[:n] = data[at:at + n]
                self.ns.write_from(slba, buf, nlb, fua=fua)
        finally:
            self._give(buf)

    def flush(self) -> None:
        """Flush (NVM Command Set §3.3.2): it covers what completed on every queue of the
        controller, so one connection's flush persists the others' writes (multi-conn)."""
        self.ns.flush()

    def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """Deallocate (Dataset Management, AD). Trimmed blocks read back as whatever DLFEAT
        says; NBD allows any content after a trim."""
        self._check_writable("trim")
        if not self.caps.can_trim:
            raise ExportError(errno.ENOTSUP, "trim: the controller has no Dataset Management")
        self._check(offset, count, "trim")
        lba = self.caps.lba_size
        ranges, start, end = [], offset // lba, (offset + count) // lba
        while start < end:
            n = min(end - start, 0xFFFF_FFFF)       # a DSM range holds 2^32-1 blocks
            ranges.append((start, n))
            start += n
        for i in range(0, len(ranges), 256):        # 256 ranges per command (§3.3.3)
            self.ns.deallocate(ranges[i:i + 256])
        if fua and self.caps.volatile_cache:
            self.ns.flush()

    def zero(self, count: int, offset: int, *, may_trim: bool = False, fua: bool = False,
             fast: bool = False) -> None:
        """Zero a range: Write Zeroes (with DEAC when may_trim and deallocated blocks read as
        zeroes), else zero-filled writes. fast: fail with ENOTSUP unless it is cheap."""
        self._check_writable("zero")
        deac = may_trim and self.caps.cheap_zero
        if fast and not deac:
            raise ExportError(errno.ENOTSUP, "fast zero: the device cannot zero by "
                                             "deallocating" + ("" if may_trim else
                                                               " (the client asked for no hole)"))
        fua = fua and self.caps.volatile_cache
        if self.caps.write_zeroes:
            for slba, nlb, _ in self._pieces(offset, count, "zero"):
                self.ns.write_zeroes(slba, nlb, deallocate=deac, fua=fua)
            return
        buf = self._take()
        try:
            buf.view[:] = bytes(self.chunk)
            for slba, nlb, _ in self._pieces(offset, count, "zero"):
                self.ns.write_from(slba, buf, nlb, fua=fua)
        finally:
            self._give(buf)

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Give the bounce buffers back (the controller is closed by its owner)."""
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for buf in pool:
            buf.free()
