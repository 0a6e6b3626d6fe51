"""NVM namespaces: block I/O with bounds checks, MDTS splitting, sync and async calls."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.memory import DmaBuffer
from iommu_dma.nvme import sqe
from iommu_dma.nvme.identify import IdentifyNamespace
from iommu_dma.nvme.ioqueue import IoFuture, IoQueue, NotMappedError
from iommu_dma.nvme.status import SCT_MEDIA, NvmeError

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

IO_TIMEOUT = 30.0
MAX_NLB = 1 << 16            # NLB is a 16-bit 0's based field (NVM Command Set 1.0 §3.2)
DSM_RANGE_SIZE = 16
DSM_MAX_RANGES = 256
SC_COMPARE_FAILURE = 0x85


class InactiveNamespaceError(IommuDmaError, LookupError):
    """The NSID names no active namespace of the controller."""


class Request:
    """An asynchronous request: one or more commands (a transfer split at MDTS)."""

    def __init__(self, futures: list[IoFuture], on_done: Any = None) -> None:
        self.futures = futures
        self._on_done = on_done
        self._value: Any = None
        self._finished = False

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self, timeout: float | None = IO_TIMEOUT) -> Any:
        """Wait (polling) for every command; raise the first NvmeError, if any."""
        if not self._finished:
            for f in self.futures:
                f.result(timeout)
            self._value = self._on_done() if self._on_done else None
            self._finished = True
        return self._value


def _bytes_view(buf: DmaBuffer) -> memoryview:
    return memoryview(buf).cast("B")


def buffer_address(obj: Any) -> tuple[int, int]:
    """(address, length) of a writable, contiguous buffer-protocol object."""
    if isinstance(obj, DmaBuffer):
        return obj.addr, obj.size
    view = memoryview(obj)
    if view.readonly:
        raise TypeError("the buffer is read-only; DMA needs writable memory (use write() for "
                        "bytes, which copies them into DMA memory)")
    if not view.contiguous:
        raise TypeError("the buffer is not contiguous")
    if view.nbytes == 0:
        raise ValueError("the buffer is empty")
    return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B"))), view.nbytes


class Namespace:
    """Namespace nsid of a controller. LBAs and block counts are in logical blocks."""

    def __init__(self, ctrl: Controller, nsid: int, queue: IoQueue | None = None) -> None:
        self.ctrl = ctrl
        self.nsid = nsid
        self._queue = queue
        self.identify: IdentifyNamespace = ctrl.identify_namespace(nsid)
        if not self.identify.active:
            active = ctrl.active_namespaces()
            raise InactiveNamespaceError(
                f"{ctrl.bdf}: namespace {nsid} is not active; active NSIDs: "
                f"{', '.join(map(str, active)) or 'none'}")
        self.lba_size = self.identify.lba_size
        self.blocks = self.identify.nsze
        self.max_blocks = max(1, min(ctrl.max_transfer // self.lba_size, MAX_NLB))

    @property
    def capacity(self) -> int:
        return self.blocks * self.lba_size

    @property
    def queue(self) -> IoQueue:
        if self._queue is None:
            self._queue = self.ctrl.default_io_queue()
        return self._queue

    def __repr__(self) -> str:
        return (f"<Namespace {self.ctrl.bdf} nsid={self.nsid} {self.blocks} x {self.lba_size} B>")

    # ---- checks done before anything is submitted ---------------------------------------

    def _check_range(self, slba: int, nlb: int, what: str) -> None:
        self.ctrl.check_open()
        if nlb < 1:
            raise ValueError(f"{what}: block count must be at least 1, not {nlb}")
        if slba < 0 or slba + nlb > self.blocks:
            raise ValueError(f"{what}: LBAs {slba}..{slba + nlb - 1} are outside namespace "
                             f"{self.nsid} (LBAs 0..{self.blocks - 1})")

    def _data(self, buf: Any, nlb: int, what: str) -> int:
        addr, size = buffer_address(buf)
        need = nlb * self.lba_size
        if size < need:
            raise ValueError(f"{what}: buffer holds {size} bytes, {nlb} blocks need {need}")
        if addr & 3:
            raise ValueError(f"{what}: buffer address {addr:#x} is not dword aligned "
                             f"(NVMe Base 2.0 §4.1.1: PRP offsets are dword aligned)")
        if not self.ctrl.container.is_mapped(addr, need):
            raise NotMappedError(f"{what}: buffer [{addr:#x}, {addr + need:#x}) is not "
                                 f"DMA-mapped; use Controller.alloc() or register() the memory")
        return addr

    # ---- asynchronous data transfers ------------------------------------------------------

    def _transfer(self, build: Any, name: str, slba: int, nlb: int, buf: Any) -> Request:
        what = f"{name} nsid {self.nsid} LBAs {slba}+{nlb}"
        self._check_range(slba, nlb, what)
        addr = self._data(buf, nlb, what)
        cmds = []
        for off in range(0, nlb, self.max_blocks):
            n = min(self.max_blocks, nlb - off)
            cmds.append((build(self.nsid, slba + off, n), addr + off * self.lba_size,
                         n * self.lba_size, f"{name} nsid {self.nsid} LBAs {slba + off}+{n}"))
        return Request(self.queue.submit_many(cmds))

    def read_async(self, slba: int, nlb: int, buf: Any) -> Request:
        """Read nlb blocks into DMA-mapped buf (zero copy)."""
        return self._transfer(sqe.read, "Read", slba, nlb, buf)

    def write_async(self, slba: int, buf: Any, nlb: int | None = None) -> Request:
        """Write nlb blocks (default: all of buf) from DMA-mapped buf (zero copy)."""
        n = nlb if nlb is not None else buffer_address(buf)[1] // self.lba_size
        return self._transfer(sqe.write, "Write", slba, n, buf)

    def compare_async(self, slba: int, buf: Any, nlb: int | None = None) -> Request:
        n = nlb if nlb is not None else buffer_address(buf)[1] // self.lba_size
        return self._transfer(sqe.compare, "Compare", slba, n, buf)

    # ---- synchronous calls -------------------------------------------------------------------

    def read_into(self, slba: int, buf: Any, nlb: int | None = None) -> None:
        n = nlb if nlb is not None else buffer_address(buf)[1] // self.lba_size
        self.read_async(slba, n, buf).result()

    def write_from(self, slba: int, buf: Any, nlb: int | None = None) -> None:
        self.write_async(slba, buf, nlb).result()

    def read(self, slba: int, nlb: int) -> bytes:
        """Read nlb blocks into fresh DMA memory and return them as bytes."""
        self._check_range(slba, nlb, f"Read nsid {self.nsid}")
        buf = self.ctrl.alloc(nlb * self.lba_size)
        try:
            self.read_into(slba, buf, nlb)
            return bytes(buf)
        finally:
            buf.free()

    def write(self, slba: int, data: bytes | bytearray | memoryview) -> None:
        """Write data (a whole number of blocks), copied through DMA memory."""
        nlb, rest = divmod(len(data), self.lba_size)
        if rest or nlb == 0:
            raise ValueError(f"Write nsid {self.nsid}: {len(data)} bytes is not a positive "
                             f"multiple of the {self.lba_size}-byte block")
        self._check_range(slba, nlb, f"Write nsid {self.nsid}")
        buf = self.ctrl.alloc(len(data))
        try:
            _bytes_view(buf)[:] = memoryview(data).cast("B")
            self.write_from(slba, buf, nlb)
        finally:
            buf.free()

    def compare(self, slba: int, data: bytes | bytearray | memoryview) -> bool:
        """True when the blocks at slba equal data (the device compares: Compare command)."""
        nlb = len(data) // self.lba_size
        buf = self.ctrl.alloc(max(len(data), 1))
        try:
            _bytes_view(buf)[:len(data)] = memoryview(data).cast("B")
            self.compare_async(slba, buf, nlb).result()
            return True
        except NvmeError as e:
            if (e.sct, e.sc) == (SCT_MEDIA, SC_COMPARE_FAILURE):
                return False
            raise
        finally:
            buf.free()

    def _no_data(self, build: Any, name: str, slba: int, nlb: int) -> None:
        what = f"{name} nsid {self.nsid} LBAs {slba}+{nlb}"
        self._check_range(slba, nlb, what)
        cmds = [(build(self.nsid, slba + off, min(MAX_NLB, nlb - off)), 0, 0, what)
                for off in range(0, nlb, MAX_NLB)]
        Request(self.queue.submit_many(cmds)).result()

    def write_zeroes(self, slba: int, nlb: int) -> None:
        self._no_data(sqe.write_zeroes, "Write Zeroes", slba, nlb)

    def verify(self, slba: int, nlb: int) -> None:
        """Verify command: the device reads and checks the blocks; NvmeError if it cannot."""
        self._no_data(sqe.verify, "Verify", slba, nlb)

    def flush(self) -> None:
        self.ctrl.check_open()
        self.queue.submit(sqe.flush(self.nsid), what=f"Flush nsid {self.nsid}").result(IO_TIMEOUT)

    def deallocate(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Dataset Management with AD set (trim) on (slba, nlb) ranges."""
        todo = list(ranges)
        if not 1 <= len(todo) <= DSM_MAX_RANGES:
            raise ValueError(f"deallocate takes 1..{DSM_MAX_RANGES} ranges, not {len(todo)}")
        for slba, nlb in todo:
            self._check_range(slba, nlb, f"Deallocate nsid {self.nsid}")
            if nlb > 0xFFFF_FFFF:
                raise ValueError(f"Deallocate: a range holds at most 2^32-1 blocks, not {nlb}")
        payload = sqe.dsm_ranges(todo)
        buf = self.ctrl.alloc(len(payload))
        try:
            _bytes_view(buf)[:] = payload
            what = f"Dataset Management (deallocate) nsid {self.nsid}, {len(todo)} range(s)"
            cmd = sqe.dataset_management(self.nsid, len(todo), deallocate=True)
            self.queue.submit(cmd, buf.addr, len(payload), what).result(IO_TIMEOUT)
        finally:
            buf.free()

    def command(self, cmd: sqe.Sqe, buf: Any = None, length: int = 0,
                timeout: float = IO_TIMEOUT) -> int:
        """A raw I/O command (NSID filled in when 0); returns DW0 of the completion."""
        self.ctrl.check_open()
        if cmd.nsid == 0:
            cmd.nsid = self.nsid
        addr, size = buffer_address(buf) if buf is not None else (0, 0)
        return self.queue.submit(cmd, addr, length or size).result(timeout)
