"""NVM namespaces: block I/O with bounds checks, MDTS splitting, sync and async calls."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.memory import DmaBuffer
from iommu_dma.nvme import aio, sqe
from iommu_dma.nvme.constants import DSM_MAX_RANGES, MAX_NLB, SC_COMPARE_FAILURE, SCT_MEDIA
from iommu_dma.nvme.identify import IdentifyNamespace
from iommu_dma.nvme.ioqueue import QUEUE_DEFAULT, IoFuture, IoQueue, NotMappedError
from iommu_dma.nvme.pi import (
    PiFields,
    PiFormat,
    PiType,
    Prinfo,
    join_extended,
    split_extended,
)
from iommu_dma.nvme.queue import Command
from iommu_dma.nvme.status import NvmeError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from iommu_dma.nvme.controller import Controller

    # What data transfers take: DMA memory, or any writable buffer-protocol object that lies
    # in mapped memory (registered with the allocator).
    DataBuffer = DmaBuffer | WriteableBuffer

# The default `timeout` of the calls below: wait until the command ends; its own deadline
# (ctrl.recovery.io_timeout) decides when it is aborted. A number: wait that long, then the
# command counts as timed out and is recovered (Abort, then a reset if needed).
IO_TIMEOUT: float | None = None


class InactiveNamespaceError(IommuDmaError, LookupError):
    """The NSID names no active namespace of the controller."""


class UnsupportedFormatError(IommuDmaError):
    """The namespace's LBA format is one iommu-dma does not drive (bad FLBAS or LBADS, a
    reserved protection type, PI in less than 8 bytes of metadata)."""


class Request:
    """An asynchronous request: one or more commands (a transfer split at the largest transfer
    the controller and engine allow). Every piece is waited for before an error is raised, so
    no piece is still running when the caller sees the failure (a piece that times out stays
    with the device and keeps its buffer quarantined).

    Like a concurrent.futures.Future: result(timeout), exception(), done(),
    add_done_callback(fn). Awaitable in a coroutine (`await ns.read_async(...)`): on the
    running loop's own queue the loop reaps it when the interrupt fires; a request on another
    queue is waited for in a worker thread. Cancelling the awaiting task does not cancel the
    commands (NVMe has no take-back): their buffer stays the device's until they end."""

    def __init__(self, futures: list[IoFuture], on_done: Callable[[], Any] | None = None,
                 value: Any = None) -> None:
        self.futures = futures
        self._on_done = on_done
        self._value: Any = value
        self._finished = False
        self._left = len(futures)
        self._all_done = not futures
        self._watching = False
        self._callbacks: list[Callable[[Request], object]] = []
        self._cb_lock = threading.Lock()

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def exception(self) -> BaseException | None:
        """The first piece's error once every piece has ended (None: success or not done)."""
        if not self.done():
            return None
        return next((f.exception() for f in self.futures if f.exception() is not None), None)

    def add_done_callback(self, fn: Callable[[Request], object]) -> None:
        """Call fn(request) once every command of it has ended (at once if they have), in
        the thread that ended the last one, after the queue lock is released: it may call
        result() (which does not wait then) and submit more. Exceptions it raises are
        logged."""
        with self._cb_lock:
            now = self._all_done
            if not now:
                self._callbacks.append(fn)
                start, self._watching = not self._watching, True
        if now:
            _run_request_callback(fn, self)
        elif start:
            for f in self.futures:
                f.add_done_callback(self._piece_done)

    def _piece_done(self, _: object) -> None:
        with self._cb_lock:
            self._left -= 1
            if self._left > 0:
                return
            self._all_done = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _run_request_callback(fn, self)

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            loop = asyncio.get_running_loop()
            queues = {id(f._queue): f._queue for f in self.futures}
            if all(q.loop is loop for q in queues.values()):
                for q in queues.values():
                    if q.watch is not None:
                        q.watch()
                yield from aio.completion_future(self, loop).__await__()
            else:                       # nobody reaps that queue for this loop: a thread waits
                yield from loop.run_in_executor(None, self.result).__await__()
        return self.result(0)

    def result(self, timeout: float | None = IO_TIMEOUT) -> Any:
        """Wait (polling) for every command; then raise the first piece's error, if any.
        timeout: seconds to wait; a piece not done by then is timed out and recovered (it
        then fails with NvmeTimeoutError). None: until each ends (its deadline applies)."""
        if self._finished:
            return self._value
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self.futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            f.wait(left)
        for f in self.futures:
            if not f.done():
                f.expire(timeout)           # recovered: ends with NvmeTimeoutError
                f.result(0)
        for f in self.futures:
            if f.exception() is not None:
                f.result()
        if self._on_done is not None:
            self._value = self._on_done()
        self._finished = True
        return self._value


def _run_request_callback(fn: Callable[[Request], object], request: Request) -> None:
    try:
        fn(request)
    except Exception:
        aio.log.exception("done-callback %r of a request raised", fn)


def buffer_address(obj: DataBuffer) -> tuple[int, int]:
    """(address, length) of a DmaBuffer or a writable, contiguous buffer-protocol object."""
    if isinstance(obj, DmaBuffer):
        obj.check_usable()
        return obj.addr, obj.size
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"a {type(obj).__name__} is not a buffer; pass a DmaBuffer from "
                        "Controller.alloc() or registered memory") from None
    if view.readonly:
        raise TypeError("the buffer is read-only; DMA needs writable memory (use write() for "
                        "bytes, which copies them into DMA memory)")
    if not view.contiguous:
        raise TypeError("the buffer is not contiguous")
    if view.nbytes == 0:
        raise ValueError("the buffer is empty")
    return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B"))), view.nbytes


class Namespace:
    """Namespace nsid of a controller. LBAs and block counts are in logical blocks.

    Thread-safe: threads (and event loops) may share one Namespace; each call's commands go
    to the queue given at creation, else to the caller's queue (see `queue`), whose lock
    serializes submission and reaping while each thread waits for its own commands.
    """

    def __init__(self, ctrl: Controller, nsid: int, queue: IoQueue | None = None) -> None:
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise ValueError(f"NSID must be 1..{0xFFFFFFFE}, not {nsid}")
        self.ctrl = ctrl
        self.nsid = nsid
        self._queue = queue
        self.identify: IdentifyNamespace = ctrl.identify_namespace(nsid)
        if not self.identify.active:
            active = ctrl.active_namespaces()
            raise InactiveNamespaceError(
                f"{ctrl.bdf}: namespace {nsid} is not active; active NSIDs: "
                f"{', '.join(map(str, active)) or 'none'}")
        self._check_format()
        self.lba_size = self.identify.lba_size
        self.ms = self.identify.metadata_size           # metadata bytes per block (MS)
        # FLBAS bit 4 (MSET): extended LBA, each block's metadata follows its data in the
        # data buffer; else the metadata travels in a separate buffer (MPTR)
        self.extended = bool(self.ms and self.identify.flbas & 0x10)
        # bytes per block in the data buffer
        self.block_bytes = self.lba_size + (self.ms if self.extended else 0)
        pi_type = PiType(self.identify.dps & 0x7)
        # end-to-end protection (NVM Command Set 1.0 §5.3): DPS bits 2:0 type, bit 3 PIL
        self.pi: PiFormat | None = (PiFormat(self.ms, pi_type, bool(self.identify.dps & 0x8))
                                    if pi_type else None)
        self.blocks = self.identify.nsze
        self.max_blocks = max(1, min(ctrl.max_transfer // self.block_bytes, MAX_NLB))

    def _check_format(self) -> None:
        """Refuse formats whose transfers or protection we would get wrong: FLBAS and LBADS
        bounded, a reserved PI type (DPS 2:0 above 3), PI in less than 8 bytes of metadata
        (NVM Command Set 1.0 §4.1.5, §5.3)."""
        ident, where = self.identify, f"{self.ctrl.bdf} namespace {self.nsid}"
        try:
            fmt = ident.current_format          # bounds FLBAS and LBADS from below
        except ValueError as e:
            raise UnsupportedFormatError(f"{where}: {e}") from None
        index = ident.format_index
        if fmt.lbads > 16:
            raise UnsupportedFormatError(f"{where}: LBA format {index} has a {1 << fmt.lbads}-"
                                         "byte block (LBADS outside 512 B..64 KiB)")
        pi_type = ident.dps & 0x7
        if pi_type > PiType.TYPE3:
            raise UnsupportedFormatError(f"{where}: DPS {ident.dps:#x} names protection type "
                                         f"{pi_type}, a reserved value (types 1..3 exist)")
        if pi_type and fmt.ms < 8:
            raise UnsupportedFormatError(f"{where}: protection type {pi_type} with {fmt.ms} "
                                         "bytes of metadata; the PI tuple needs 8")

    @property
    def capacity(self) -> int:
        return self.blocks * self.lba_size

    @property
    def queue(self) -> IoQueue:
        """The queue pair this call's commands go to: the one given at creation, else the
        caller's (Controller.queue_for_caller: the running event loop's, the thread's own
        with per-thread queues, or the controller's shared default queue)."""
        if self._queue is not None:
            return self._queue
        return self.ctrl.queue_for_caller()

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

    def _data(self, buf: DataBuffer, nlb: int, what: str, per_block: int | None = None) -> int:
        """The address of a data buffer of nlb blocks (per_block bytes each, default
        block_bytes: lba_size, plus the metadata with extended LBAs), checked."""
        addr, size = buffer_address(buf)
        need = nlb * (per_block or self.block_bytes)
        if size < need:
            raise ValueError(f"{what}: buffer holds {size} bytes, {nlb} blocks need {need}")
        if addr & 3:
            raise ValueError(f"{what}: buffer address {addr:#x} is not dword aligned "
                             f"(NVMe Base 2.0 §4.1.1: PRP offsets are dword aligned)")
        if not self.ctrl.container.is_mapped(addr, need):
            raise NotMappedError(f"{what}: buffer [{addr:#x}, {addr + need:#x}) is not "
                                 f"DMA-mapped; use Controller.alloc() or register() the memory")
        return addr

    def _blocks_of(self, buf: DataBuffer) -> int:
        return buffer_address(buf)[1] // self.block_bytes

    # ---- protection information and metadata (NVM Command Set 1.0 §5.2, §5.3) -----------

    def protection(self, slba: int, *, prinfo: int | None = None, reftag: int | None = None,
                   apptag: int = 0, appmask: int = 0, metadata: bool = False) -> PiFields:
        """The PRINFO/ILBRT/LBAT/LBATM of a transfer at slba. prinfo None: on a namespace
        whose metadata is only the 8-byte PI, without a metadata buffer, PRACT with the
        guard (and, types 1/2, reference tag) checked, as Linux does; else no PRINFO bits.
        reftag None: the low 32 bits of slba (the type 1 rule; also used for type 2)."""
        if prinfo is None:
            pract_only = self.pi is not None and self.ms == 8 and not metadata
            if not pract_only:
                prinfo = Prinfo.NONE
            else:
                assert self.pi is not None
                prinfo = Prinfo.PRACT | Prinfo.PRCHK_GUARD | (
                    Prinfo.NONE if self.pi.pi_type == PiType.TYPE3 else Prinfo.PRCHK_REF)
        if prinfo and self.pi is None:
            raise ValueError(f"namespace {self.nsid} is not formatted with protection "
                             f"information (DPS {self.identify.dps:#x}); PRINFO {prinfo:#x} "
                             "needs a PI type (reformat with --pi 1..3)")
        if reftag is None:
            reftag = slba & 0xFFFF_FFFF if self.pi is not None else 0
        return PiFields(int(prinfo), reftag, apptag, appmask)

    def _check_metadata(self, meta: DataBuffer | None, pi: PiFields | None, nlb: int,
                        what: str) -> int:
        """The address of the separate metadata buffer (MPTR), 0 when none is needed; a
        clear error when one is missing or is given where the format has none."""
        pract_strips = (pi is not None and pi.prinfo & Prinfo.PRACT and self.pi is not None
                        and self.ms == 8)
        if meta is None:
            if self.ms and not self.extended and not pract_strips:
                raise ValueError(
                    f"{what}: namespace {self.nsid} keeps {self.ms} bytes of metadata per "
                    "block in a separate buffer (MPTR); pass metadata= (nlb * "
                    f"{self.ms} bytes)" + (", or prinfo with PRACT (the controller inserts "
                                           "and strips the PI)" if self.pi and self.ms == 8
                                           else ""))
            return 0
        if not self.ms or self.extended:
            layout = "extended LBAs: it follows each block in the data buffer" if self.ms \
                else "none"
            raise ValueError(f"{what}: namespace {self.nsid} has no separate metadata "
                             f"({layout}); leave metadata= out")
        if pract_strips:
            raise ValueError(f"{what}: with PRACT and 8 bytes of metadata the controller "
                             "inserts/strips the PI and moves no metadata; leave metadata= "
                             "out or clear PRACT")
        return self._data(meta, nlb, f"{what} metadata", per_block=self.ms)

    # ---- asynchronous data transfers ------------------------------------------------------

    def _transfer(self, build: Callable[[int, int, int], sqe.Sqe], name: str, slba: int,
                  nlb: int, buf: DataBuffer, timeout: float | None = QUEUE_DEFAULT,
                  value: Any = None, *, pi: PiFields | None = None,
                  meta: DataBuffer | None = None) -> Request:
        """Commands of at most max_blocks each; pi: their PRINFO/ILBRT/LBAT/LBATM (None: the
        namespace's default, see protection()); meta: the separate metadata buffer."""
        what = f"{name} nsid {self.nsid} LBAs {slba}+{nlb}"
        self._check_range(slba, nlb, what)
        if pi is None:
            pi = self.protection(slba, metadata=meta is not None)
        addr = self._data(buf, nlb, what)
        meta_addr = self._check_metadata(meta, pi, nlb, what)
        pi_type = self.pi.pi_type if self.pi is not None else PiType.NONE
        cmds = []
        for off in range(0, nlb, self.max_blocks):
            n = min(self.max_blocks, nlb - off)
            cmd = build(self.nsid, slba + off, n)
            if pi_type or pi != PiFields():
                pi.apply(cmd, off, pi_type)
            cmds.append(Command(cmd, addr + off * self.block_bytes, n * self.block_bytes, 0,
                                f"{name} nsid {self.nsid} LBAs {slba + off}+{n}",
                                meta_addr + off * self.ms if meta_addr else 0,
                                n * self.ms if meta_addr else 0))
        owner: object = buf if meta is None else (buf, meta)
        return Request(self.queue.submit_many(cmds, owner=owner, timeout=timeout), value=value)

    def read_async(self, slba: int, nlb: int, buf: DataBuffer, *,
                   timeout: float | None = QUEUE_DEFAULT, metadata: DataBuffer | None = None,
                   pi: PiFields | None = None) -> Request:
        """Read nlb blocks into DMA-mapped buf (zero copy); the request's result is buf
        (`data = await ns.read_async(...)` in a coroutine). timeout: seconds each command may
        take before it is aborted (default: ctrl.recovery.io_timeout; None: no limit).
        metadata: the separate metadata buffer (MPTR); pi: protection fields (see
        protection())."""
        return self._transfer(sqe.read, "Read", slba, nlb, buf, timeout, value=buf, pi=pi,
                              meta=metadata)

    def write_async(self, slba: int, buf: DataBuffer, nlb: int | None = None, *,
                    timeout: float | None = QUEUE_DEFAULT, fua: bool = False,
                    metadata: DataBuffer | None = None, pi: PiFields | None = None
                    ) -> Request:
        """Write nlb blocks (default: all of buf) from DMA-mapped buf (zero copy). fua: Force
        Unit Access (NVM Command Set §3.2.6: the data is on non-volatile media on completion).
        metadata, pi: as read_async."""
        n = nlb if nlb is not None else self._blocks_of(buf)
        build = functools.partial(sqe.write, fua=True) if fua else sqe.write
        return self._transfer(build, "Write", slba, n, buf, timeout, pi=pi, meta=metadata)

    def compare_async(self, slba: int, buf: DataBuffer, nlb: int | None = None, *,
                      timeout: float | None = QUEUE_DEFAULT) -> Request:
        n = nlb if nlb is not None else self._blocks_of(buf)
        return self._transfer(sqe.compare, "Compare", slba, n, buf, timeout)

    # ---- synchronous calls -------------------------------------------------------------------

    def read_into(self, slba: int, buf: DataBuffer, nlb: int | None = None, *,
                  timeout: float | None = IO_TIMEOUT, metadata: DataBuffer | None = None,
                  pi: PiFields | None = None) -> None:
        n = nlb if nlb is not None else self._blocks_of(buf)
        self.read_async(slba, n, buf, metadata=metadata, pi=pi).result(timeout)

    def write_from(self, slba: int, buf: DataBuffer, nlb: int | None = None, *,
                   timeout: float | None = IO_TIMEOUT, fua: bool = False,
                   metadata: DataBuffer | None = None, pi: PiFields | None = None) -> None:
        self.write_async(slba, buf, nlb, fua=fua, metadata=metadata, pi=pi).result(timeout)

    def read(self, slba: int, nlb: int, *, timeout: float | None = IO_TIMEOUT,
             prinfo: int | None = None, reftag: int | None = None, apptag: int = 0,
             appmask: int = 0) -> bytes:
        """Read nlb blocks into fresh DMA memory and return them as bytes (extended LBAs:
        block_bytes each, data then metadata). prinfo/reftag/apptag/appmask: PRINFO, ILBRT,
        LBAT, LBATM (see protection()); read_metadata() also returns separate metadata."""
        self._check_range(slba, nlb, f"Read nsid {self.nsid}")
        pi = self.protection(slba, prinfo=prinfo, reftag=reftag, apptag=apptag,
                             appmask=appmask)
        with self.ctrl.alloc(nlb * self.block_bytes) as buf:
            self.read_into(slba, buf, nlb, timeout=timeout, pi=pi)
            return bytes(buf)

    def read_metadata(self, slba: int, nlb: int, *, timeout: float | None = IO_TIMEOUT,
                      prinfo: int | None = None, reftag: int | None = None, apptag: int = 0,
                      appmask: int = 0) -> tuple[bytes, bytes]:
        """(data, metadata) of nlb blocks: the separate metadata buffer (MPTR), or, with
        extended LBAs, the metadata split out of the data buffer. prinfo default: none (the
        metadata as stored)."""
        self._check_range(slba, nlb, f"Read nsid {self.nsid}")
        if not self.ms:
            raise ValueError(f"namespace {self.nsid} has no metadata (LBA format "
                             f"{self.identify.format_index}: MS 0)")
        pi = self.protection(slba, prinfo=prinfo or 0, reftag=reftag, apptag=apptag,
                             appmask=appmask, metadata=True)
        if self.extended:
            raw = self.read(slba, nlb, timeout=timeout, prinfo=prinfo or 0, reftag=reftag,
                            apptag=apptag, appmask=appmask)
            return split_extended(raw, self.lba_size, self.ms)
        with self.ctrl.alloc(nlb * self.lba_size) as buf, \
                self.ctrl.alloc(nlb * self.ms) as meta:
            self.read_into(slba, buf, nlb, timeout=timeout, metadata=meta, pi=pi)
            return bytes(buf), bytes(meta.view[:nlb * self.ms])

    def _payload_blocks(self, name: str, slba: int, data: ReadableBuffer,
                        per_block: int | None = None) -> int:
        """Blocks in data (a whole, positive number of them), checked against the range."""
        size = per_block or self.block_bytes
        nbytes = memoryview(data).nbytes
        nlb, rest = divmod(nbytes, size)
        if rest or nlb == 0:
            kind = "extended block (data and metadata)" if size != self.lba_size else "block"
            raise ValueError(f"{name} nsid {self.nsid}: {nbytes} bytes is not a positive "
                             f"multiple of the {size}-byte {kind}")
        self._check_range(slba, nlb, f"{name} nsid {self.nsid}")
        return nlb

    def write(self, slba: int, data: ReadableBuffer, *,
              timeout: float | None = IO_TIMEOUT, metadata: ReadableBuffer | None = None,
              prinfo: int | None = None, reftag: int | None = None, apptag: int = 0,
              appmask: int = 0) -> None:
        """Write data (a whole number of blocks), copied through DMA memory. metadata: each
        block's metadata (ms bytes each): through MPTR, or, with extended LBAs, interleaved
        with data here (else data itself holds block_bytes per block). prinfo/reftag/apptag/
        appmask: PRINFO, ILBRT, LBAT, LBATM (see protection()); e.g. prinfo=Prinfo.PRCHK_GUARD
        with a wrong guard in metadata fails with "End-to-end Guard Check Error"."""
        if metadata is not None and self.extended:
            data = join_extended(memoryview(data).cast("B"), memoryview(metadata).cast("B"),
                                 self.lba_size, self.ms)
            metadata = None
        nlb = self._payload_blocks("Write", slba, data)
        pi = self.protection(slba, prinfo=prinfo, reftag=reftag, apptag=apptag,
                             appmask=appmask, metadata=metadata is not None)
        with self.ctrl.alloc(nlb * self.block_bytes) as buf:
            buf.view[:] = memoryview(data).cast("B")
            if metadata is None:
                self.write_from(slba, buf, nlb, timeout=timeout, pi=pi)
                return
            if memoryview(metadata).nbytes != nlb * self.ms:
                raise ValueError(f"Write nsid {self.nsid}: metadata holds "
                                 f"{memoryview(metadata).nbytes} bytes; {nlb} blocks need "
                                 f"{nlb * self.ms} ({self.ms} per block)")
            with self.ctrl.alloc(nlb * self.ms) as meta:
                meta.view[:nlb * self.ms] = memoryview(metadata).cast("B")
                self.write_from(slba, buf, nlb, timeout=timeout, metadata=meta, pi=pi)

    def compare(self, slba: int, data: ReadableBuffer, *,
                timeout: float | None = IO_TIMEOUT) -> bool:
        """True when the blocks at slba equal data (the device compares: Compare command)."""
        nlb = self._payload_blocks("Compare", slba, data)
        with self.ctrl.alloc(nlb * self.block_bytes) as buf:
            buf.view[:] = memoryview(data).cast("B")
            try:
                self.compare_async(slba, buf, nlb).result(timeout)
            except NvmeError as e:
                if (e.sct, e.sc) == (SCT_MEDIA, SC_COMPARE_FAILURE):
                    return False
                raise
            return True

    def _no_data(self, build: Callable[[int, int, int], sqe.Sqe], name: str, slba: int,
                 nlb: int) -> Request:
        what = f"{name} nsid {self.nsid} LBAs {slba}+{nlb}"
        self._check_range(slba, nlb, what)
        cmds = [Command(build(self.nsid, slba + off, min(MAX_NLB, nlb - off)), 0, 0, 0, what)
                for off in range(0, nlb, MAX_NLB)]
        return Request(self.queue.submit_many(cmds))

    def write_zeroes_async(self, slba: int, nlb: int, *, deallocate: bool = False,
                           fua: bool = False) -> Request:
        """Write Zeroes (NVM Command Set §3.2.8); deallocate sets DEAC (the device may
        deallocate the blocks; useful when Identify Namespace DLFEAT says they then read as
        zeroes), fua sets FUA."""
        build = functools.partial(sqe.write_zeroes, deallocate=deallocate, fua=fua)
        return self._no_data(build, "Write Zeroes", slba, nlb)

    def write_zeroes(self, slba: int, nlb: int, *, timeout: float | None = IO_TIMEOUT,
                     deallocate: bool = False, fua: bool = False) -> None:
        self.write_zeroes_async(slba, nlb, deallocate=deallocate, fua=fua).result(timeout)

    def verify(self, slba: int, nlb: int, *, timeout: float | None = IO_TIMEOUT) -> None:
        """Verify command: the device reads and checks the blocks; NvmeError if it cannot."""
        self._no_data(sqe.verify, "Verify", slba, nlb).result(timeout)

    def flush_async(self) -> Request:
        """Flush (NVM Command Set §3.3.2): what was written reaches non-volatile media."""
        self.ctrl.check_open()
        return Request([self.queue.submit(sqe.flush(self.nsid), what=f"Flush nsid {self.nsid}")])

    def flush(self, *, timeout: float | None = IO_TIMEOUT) -> None:
        self.flush_async().result(timeout)

    def deallocate(self, ranges: Iterable[tuple[int, int]], *,
                   timeout: float | None = IO_TIMEOUT) -> None:
        """Dataset Management with AD set (trim) on (slba, nlb) ranges."""
        todo = list(ranges)
        if not 1 <= len(todo) <= DSM_MAX_RANGES:
            raise ValueError(f"deallocate takes 1..{DSM_MAX_RANGES} ranges, not {len(todo)}")
        for slba, nlb in todo:
            self._check_range(slba, nlb, f"Deallocate nsid {self.nsid}")
            if nlb > 0xFFFF_FFFF:
                raise ValueError(f"Deallocate: a range holds at most 2^32-1 blocks, not {nlb}")
        payload = sqe.dsm_ranges(todo)
        with self.ctrl.alloc(len(payload)) as buf:
            buf.view[:] = payload
            what = f"Dataset Management (deallocate) nsid {self.nsid}, {len(todo)} range(s)"
            cmd = sqe.dataset_management(self.nsid, len(todo), deallocate=True)
            self.queue.submit(cmd, buf.addr, len(payload), what, owner=buf).result(timeout)

    def command(self, cmd: sqe.Sqe, buf: DataBuffer | None = None, length: int = 0,
                timeout: float | None = IO_TIMEOUT) -> int:
        """A raw I/O command (NSID filled in when 0); returns DW0 of the completion."""
        self.ctrl.check_open()
        if cmd.nsid == 0:
            cmd.nsid = self.nsid
        addr, size = buffer_address(buf) if buf is not None else (0, 0)
        if length > size:
            raise ValueError(f"command: length {length} exceeds the {size}-byte buffer")
        if buf is not None and not self.ctrl.container.is_mapped(addr, length or size):
            raise NotMappedError(f"command: buffer [{addr:#x}, +{length or size:#x}) is not "
                                 "DMA-mapped; use Controller.alloc() or register() the memory")
        return self.queue.submit(cmd, addr, length or size, owner=buf).result(timeout)

    # ---- Copy and Write Uncorrectable (NVM Command Set 1.0 §3.3.1, §3.3.7) ---------------

    def _check_copy(self, ranges: list[tuple[int, int]], sdlba: int) -> int:
        """Bounds of a Copy against the namespace and its limits (Identify Namespace MSRC:
        source ranges, 0's based; MSSRL: blocks per range; MCL: blocks in all; 0 = none
        stated). Returns the total number of blocks."""
        ident, what = self.identify, f"Copy nsid {self.nsid}"
        most = ident.msrc + 1
        if not 1 <= len(ranges) <= min(most, sqe.COPY_MAX_RANGES):
            raise ValueError(f"{what}: {len(ranges)} source ranges; the namespace takes "
                             f"1..{most} (Identify Namespace MSRC)")
        for slba, nlb in ranges:
            self._check_range(slba, nlb, f"{what} source")
            if nlb > MAX_NLB or (ident.mssrl and nlb > ident.mssrl):
                raise ValueError(f"{what}: a source range of {nlb} blocks is longer than the "
                                 f"namespace allows ({ident.mssrl or MAX_NLB}, MSSRL)")
        total = sum(nlb for _, nlb in ranges)
        if ident.mcl and total > ident.mcl:
            raise ValueError(f"{what}: {total} blocks in all is more than the namespace's "
                             f"copy length limit ({ident.mcl}, MCL)")
        self._check_range(sdlba, total, f"{what} destination")
        return total

    def copy_async(self, ranges: Iterable[tuple[int, int]], sdlba: int, *,
                   timeout: float | None = QUEUE_DEFAULT) -> Request:
        """Copy (Identify Controller ONCS bit 8): the blocks of the (slba, nlb) source ranges,
        in order, to consecutive blocks from sdlba (source range format 0)."""
        todo = list(ranges)
        total = self._check_copy(todo, sdlba)
        payload = sqe.copy_ranges(todo)
        buf = self.ctrl.alloc(len(payload))
        buf.view[:] = payload
        what = f"Copy nsid {self.nsid} {len(todo)} range(s), {total} blocks to LBA {sdlba}"
        try:
            fut = self.queue.submit(sqe.copy(self.nsid, sdlba, len(todo)), buf.addr,
                                    len(payload), what, owner=buf, timeout=timeout)
        except BaseException:
            buf.free()                  # not submitted (or quarantined while the device has it)
            raise
        fut.add_done_callback(lambda _: buf.free())     # the device is done with the ranges
        return Request([fut])

    def copy(self, ranges: Iterable[tuple[int, int]], sdlba: int, *,
             timeout: float | None = IO_TIMEOUT) -> None:
        self.copy_async(ranges, sdlba).result(timeout)

    def write_uncorrectable(self, slba: int, nlb: int, *,
                            timeout: float | None = IO_TIMEOUT) -> None:
        """Write Uncorrectable (ONCS bit 1): reads of the blocks fail with Unrecovered Read
        Error until they are written again."""
        self._no_data(sqe.write_uncorrectable, "Write Uncorrectable", slba, nlb).result(timeout)
