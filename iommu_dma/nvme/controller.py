"""An NVMe controller driven from user space: reset, admin queue, admin commands, I/O queues.

    with Controller.open("0000:00:0a.0") as ctrl:
        print(ctrl.identify.mn)
        ns = ctrl.namespace(1)
        ns.write(0, data)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from iommu_dma.container import Container
from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.memory import DmaAllocator, DmaBuffer
from iommu_dma.nvme import aio, dbbuf, regs, sqe
from iommu_dma.nvme.constants import (
    CNS_ACTIVE_NS_LIST,
    CNS_CONTROLLER,
    CNS_NAMESPACE,
    FID_NUMBER_OF_QUEUES,
    LID_ERROR,
    LID_FW_SLOT,
    LID_SMART,
)
from iommu_dma.nvme.events import AsyncEvents
from iommu_dma.nvme.health import HealthWatch
from iommu_dma.nvme.identify import (
    ErrorLogEntry,
    FirmwareSlotLog,
    IdentifyController,
    IdentifyNamespace,
    SmartLog,
    parse_error_log,
    parse_ns_list,
)
from iommu_dma.nvme.interrupts import QueueInterrupt, WaitMode, check_mode
from iommu_dma.nvme.ioqueue import QUEUE_DEFAULT, IoQueue, PendingCommand
from iommu_dma.nvme.recovery import RecoveryPolicy
from iommu_dma.nvme.status import (
    ControllerFailedError,
    ControllerFatalError,
    ControllerResetError,
    DeviceGoneError,
    NvmeError,
    NvmeTimeoutError,
)
from iommu_dma.pci import PciDevice

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace

log = logging.getLogger(__name__)

ADMIN_DEPTH = 32
ADMIN_TIMEOUT: float | None = None     # wait until done; ctrl.recovery.admin_timeout applies
MAX_QUEUE_DEPTH = 4096       # the engine's CIDs hold a 12-bit tracker index
WANTED_IO_QUEUES = 64
ADMIN_MAX_TRANSFER = 2 << 20
# Largest transfer of one command when MDTS is 0 (unlimited) or larger. 2 MiB = 513 pages at
# any offset: QEMU's nvme fails a command whose pages map to more than 1024 host segments
# (IOV_MAX) with Internal Error (seen at 4 MiB); larger commands gain little anyway.
MAX_TRANSFER_CAP = 2 << 20


class ControllerError(IommuDmaError):
    """The controller did not behave as the spec says (not ready in time, fatal status...)."""


class QueuesExhaustedError(ControllerError):
    """Every I/O queue pair the controller granted is in use."""


def _thread_alive(tid: int) -> bool:
    """The OS thread tid of this process still runs (Linux: /proc/self/task/TID)."""
    return os.path.exists(f"/proc/self/task/{tid}")


class Controller:
    """One NVMe controller behind VFIO. Open with Controller.open(bdf); close() (or the context
    manager) deletes the I/O queues, shuts the controller down and releases everything.

    Thread-safe: admin commands, queue creation/deletion, namespace lookup and close() may be
    called from any thread. After close() every object derived from the controller (queues,
    requests, namespaces, and buffers of an allocator it owns) raises ClosedError; requests
    still pending at close fail with ClosedError.

    Which I/O queue pair a namespace call uses (queue_for_caller): inside a running asyncio
    event loop, that loop's own interrupt-driven queue (created on first use, reaped by the
    loop); else, with per_thread_queues set, the calling thread's own queue (created on first
    use, deleted after the thread ends); else one default queue shared by all threads.
    `wait` is how the default and per-thread queues wait: "poll" (spin on the CQ, lowest
    latency, a core per waiting thread), "interrupt" (sleep on the MSI-X vector, no CPU while
    waiting) or "hybrid" (spin `hybrid_spin` seconds, then sleep).
    """

    # Use shadow doorbells (Doorbell Buffer Config, §5.8) when OACS bit 8 says they exist.
    use_shadow_doorbells = True

    def __init__(self, pci: PciDevice, container: Container, allocator: DmaAllocator, *,
                 owns_container: bool, admin_depth: int = ADMIN_DEPTH) -> None:
        self.pci = pci
        self.bdf = pci.bdf
        self.container = container
        self.allocator = allocator
        self._owns_container = owns_container
        self._lock = threading.RLock()
        self.closed = False
        self.recovery = RecoveryPolicy()
        self.resets = 0                     # controller resets done (by reset() or recovery)
        self.resetting = False
        self._failure: ControllerFailedError | None = None   # why it stopped serving
        self._recovering = False
        self._deferred: list[tuple[IoQueue, PendingCommand]] = []
        self._health: HealthWatch | None = None
        self.events: AsyncEvents | None = None
        self.cap = regs.Capabilities(pci.read64(regs.CAP))
        self.page_size = self._page_size()
        self.io_queues: dict[int, IoQueue] = {}
        self._namespaces: dict[int, Namespace] = {}
        self.admin: IoQueue | None = None
        self._default_queue: IoQueue | None = None
        self.dbbuf: dbbuf.DoorbellBuffers | None = None
        self.max_io_queues = 0
        self.wait: WaitMode = "poll"            # how default and per-thread queues wait
        self.hybrid_spin: float | None = None   # hybrid: seconds of polling before sleeping
        self.per_thread_queues = False
        self.queue_depth = 256                  # of the queues created on demand
        self._msix: list[int] = []              # MSI-X eventfds, one per vector (enabled lazily)
        self._thread_queues: dict[int, IoQueue] = {}     # OS thread id -> its queue
        self.queues_created = 0             # I/O queue pairs created since open (a statistic)
        self._loop_queues: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], IoQueue]] = {}
        # queues created for a thread or a loop, with a test of whether their owner still lives
        self._owned: list[tuple[Callable[[], bool], IoQueue]] = []
        self._warned_full = False
        try:
            self._reset(admin_depth)
            self.identify = IdentifyController.parse(self._identify_raw(CNS_CONTROLLER))
            self.recovery.crdt = self.identify.crdt
            if self.use_shadow_doorbells and dbbuf.supported(self.identify.oacs):
                self.enable_shadow_doorbells()
            self.max_io_queues = self._negotiate_queues(WANTED_IO_QUEUES)
            self.events = AsyncEvents(self)     # Asynchronous Event Requests kept outstanding
            self.events.arm()
            self._health = HealthWatch(self)
        except BaseException:
            self.close()                # disable first: the device must let go of our memory
            raise

    def _page_size(self) -> int:
        """CC.MPS: 4 KiB when CAP.MPSMIN allows it (§3.1.3.1); our DMA memory is 4 KiB pages
        in 2 MiB chunks, so a controller whose smallest page is larger than that is refused."""
        size = max(4096, self.cap.mps_min)
        if size > 2 << 20:
            raise ControllerError(f"{self.bdf}: CAP.MPSMIN asks for {size}-byte memory pages; "
                                  "iommu-dma supports up to 2 MiB")
        return size

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, bdf: str, *, container: Container | None = None,
             allocator: DmaAllocator | None = None, wait: WaitMode = "poll",
             per_thread_queues: bool = False, backend: str | None = None) -> Controller:
        """Take the controller at bdf (bound to vfio-pci). A given container (and allocator)
        is shared, e.g. by several controllers; else the controller makes its own, over the
        IOMMU backend `backend` ("container", "iommufd"; None: $IOMMU_DMA_BACKEND or
        automatic, see Container). wait and per_thread_queues: how namespace calls get their
        queue (see the class text)."""
        check_mode(wait, None)
        owns = container is None
        if container is not None and backend is not None and container.backend_name not in (
                None, backend):
            raise ValueError(f"{bdf}: backend={backend!r} but the given container uses "
                             f"{container.backend_name!r}")
        cont = container if container is not None else Container(backend=backend)
        try:
            cont.attach(bdf)                 # no-op when its group is already attached
            alloc = allocator if allocator is not None else DmaAllocator(cont)
            pci = PciDevice(cont, bdf)
        except BaseException:
            if owns:
                cont.close()
            raise
        try:
            ctrl = cls(pci, cont, alloc, owns_container=owns)
            ctrl.wait, ctrl.per_thread_queues = wait, per_thread_queues
            return ctrl
        except BaseException:
            pci.close()
            if owns:
                cont.close()
            raise

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the I/O queues, shut the controller down (CC.SHN, then CC.EN=0), fail what
        is still pending with ClosedError, and release everything. Memory the device may still
        reach (a controller that did not disable) is never given back for reuse."""
        if self._health is not None:
            self._health.stop()                 # before the BAR goes: it reads CSTS
        if self.events is not None:
            self.events.close()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            quiet = False
            try:
                quiet = self._quiesce()
            finally:
                self._close_queues(quiet)
                self.pci.close()
                if self._owns_container:
                    self.container.close()      # IOMMU mappings gone: nothing is reachable

    def _quiesce(self) -> bool:
        """Delete I/O queues and disable the controller; True when the device can no longer
        access our memory (disabled, or gone)."""
        if isinstance(self._failure, DeviceGoneError) or self.pci_gone():
            return True
        for qid in sorted(self.io_queues, reverse=True):
            try:
                self._delete_queue(qid)
            except IommuDmaError:
                pass                            # disabling the controller deletes it too
        try:
            self._shutdown()
        except IommuDmaError:
            return self.pci_gone()
        return True

    def _close_queues(self, quiet: bool) -> None:
        error = ClosedError(f"controller {self.bdf}")
        # Not quiet: the memory stays quarantined, also when the container (closed right after)
        # is ours: between the two steps nothing may hand it out again.
        for q in [*self.io_queues.values(), *([self.admin] if self.admin else [])]:
            q.close(error, device_quiet=quiet)
        self.io_queues.clear()
        self._default_queue = None
        self._loop_queues.clear()
        self._thread_queues.clear()
        self._owned.clear()
        if self.dbbuf is not None and quiet:    # the disabled controller forgot the pages
            self.dbbuf.free()
        self.dbbuf = None

    def check_open(self) -> None:
        if isinstance(self._failure, ControllerFailedError):
            raise self._failure.again()
        if self.closed:
            raise ClosedError(f"controller {self.bdf}")

    def pci_gone(self) -> bool:
        """CSTS reads all ones when the device has vanished (surprise removal)."""
        return self.pci.read32(regs.CSTS) == regs.CSTS_GONE

    # ---- reset and enable (NVMe Base 2.0 §3.5.1) -------------------------------------------

    def _reset(self, admin_depth: int) -> None:
        self.pci.enable_bus_master()
        self._disable()
        depth = min(admin_depth, self.cap.mqes, MAX_QUEUE_DEPTH)
        if depth < 2:
            raise ControllerError(f"{self.bdf}: CAP.MQES allows {self.cap.mqes} queue entries; "
                                  "a queue needs at least 2")
        self.admin = self._new_queue(0, depth, ADMIN_MAX_TRANSFER, shadow=None)
        self.pci.write32(regs.AQA, regs.aqa_value(depth, depth))
        self.pci.write64(regs.ASQ, self.admin.sq_mem.iova)
        self.pci.write64(regs.ACQ, self.admin.cq_mem.iova)
        self.pci.write32(regs.CC, regs.cc_value(self.page_size, regs.cc_css(self.cap)))
        self._wait_ready(True)

    def _new_queue(self, qid: int, depth: int, max_transfer: int,
                   shadow: tuple[int, int] | None, irq: QueueInterrupt | None = None
                   ) -> IoQueue:
        q = IoQueue(qid, depth, self.allocator, self.pci.bar0_addr, self.pci.bar0_size,
                    dstrd=self.cap.dstrd, page_size=self.page_size, max_transfer=max_transfer,
                    maptable=self.container.maptable, shadow=shadow, policy=self.recovery,
                    irq=irq)
        q.on_timeout = self._on_timeout
        return q

    def enable_shadow_doorbells(self) -> None:
        """Doorbell Buffer Config (§5.8): the admin queue and every I/O queue created later
        write tails/heads to a shadow page and ring BAR0 only when the EventIdx asks."""
        assert self.admin is not None
        bufs = dbbuf.DoorbellBuffers(self.allocator, self.page_size)
        try:
            self.admin_command(bufs.sqe(), bufs.mem, what="Doorbell Buffer Config")
        except NvmeError:
            bufs.free()                         # completed with an error: pages not in use
            raise
        self.dbbuf = bufs
        self.admin.qpair.set_shadow(*bufs.addrs, mmio_always=True)

    def _disable(self) -> None:
        if self.pci.read32(regs.CC) & regs.CC_EN:
            self.pci.write32(regs.CC, 0)
        self._wait_ready(False)

    def _ready_timeout(self) -> float:
        """CAP.TO in seconds (at least 0.5 s; at most 127.5 s, the field's largest value)."""
        return max(self.cap.timeout_ms, 500) / 1000

    def _wait_ready(self, ready: bool) -> None:
        """Wait for CSTS.RDY to reach `ready`, bounded by CAP.TO (§3.1.4.1)."""
        deadline = time.monotonic() + self._ready_timeout()
        while True:
            csts = self.pci.read32(regs.CSTS)
            if csts == regs.CSTS_GONE:
                raise ControllerError(f"{self.bdf}: CSTS reads all ones: the device is gone")
            if ready and csts & regs.CSTS_CFS:
                raise ControllerError(f"{self.bdf}: Controller Fatal Status set while enabling")
            if bool(csts & regs.CSTS_RDY) == ready:
                return
            if time.monotonic() > deadline:
                raise ControllerError(f"{self.bdf}: CSTS.RDY did not become {int(ready)} within "
                                      f"CAP.TO ({self.cap.timeout_ms} ms)")
            time.sleep(0.001)

    def _shutdown(self) -> None:
        """Normal shutdown (CC.SHN), then disable, so the device forgets our memory."""
        cc = self.pci.read32(regs.CC)
        self.pci.write32(regs.CC, (cc & ~regs.CC_SHN_MASK) | regs.CC_SHN_NORMAL)
        deadline = time.monotonic() + self._ready_timeout()
        while (self.pci.read32(regs.CSTS) & regs.CSTS_SHST_MASK) != regs.CSTS_SHST_COMPLETE:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        self._disable()

    # ---- reset and recovery (NVMe Base 2.0 §3.7.2 controller level reset) -----------------

    def reset(self, *, function_level: bool = False) -> None:
        """Reset the controller and carry on: CC.EN 1 -> 0 (or, with function_level, a PCI
        function level reset through VFIO_DEVICE_RESET), then enable again with the admin
        queue, shadow doorbells and every I/O queue re-created under the same objects.

        Commands in flight end with ControllerResetError (a timed-out one with
        NvmeTimeoutError); their buffers are released only after the device is disabled.
        Commands not sent yet wait and go after the reset. Thread-safe: other threads may
        keep submitting and waiting meanwhile. If the controller does not come back, every
        command fails with ControllerFatalError and so does every later call."""
        if function_level and not self.pci.can_reset:
            raise ControllerError(f"{self.bdf}: the device offers no function level reset "
                                  "(VFIO_DEVICE_FLAGS_RESET is clear); use reset()")
        self._reset_controller(function_level, None)

    def _reset_controller(self, function_level: bool,
                          cause: Callable[[str], BaseException] | None) -> None:
        with self._lock:
            self.check_open()
            assert self.admin is not None
            started = time.monotonic()
            self.resetting = True
            queues = [self.admin, *self.io_queues.values()]
            try:
                for q in queues:
                    q.pause()
                self._stop_device(function_level)
                why = cause or self._aborted_by_reset
                for q in queues:
                    q.fail_in_flight(_ended_by_reset(q, why))
                self._restart()
            except BaseException as e:
                self._give_up(e)
                assert self._failure is not None
                raise self._failure.again() from e
            finally:
                self.resetting = False
            self.resets += 1
            log.info("%s: controller reset in %.3f s", self.bdf, time.monotonic() - started)

    def _aborted_by_reset(self, what: str) -> BaseException:
        return ControllerResetError(self.bdf, what, "aborted by a controller reset")

    def _stop_device(self, function_level: bool) -> None:
        """Disable (or FLR) the controller: afterwards it no longer touches our memory."""
        if self.pci_gone():
            raise DeviceGoneError(self.bdf, "", "CSTS reads all ones: the device is gone")
        if function_level:
            self.pci.reset()
            self.pci.enable_bus_master()
        self._disable()

    def _restart(self) -> None:
        """Enable the reset controller with the same admin queue, doorbell pages and I/O
        queues (§3.5.1 initialization, then Create I/O CQ/SQ for each queue)."""
        assert self.admin is not None
        self.admin.reinit(shadow=None)
        self.pci.enable_bus_master()
        self.pci.write32(regs.AQA, regs.aqa_value(self.admin.depth, self.admin.depth))
        self.pci.write64(regs.ASQ, self.admin.sq_mem.iova)
        self.pci.write64(regs.ACQ, self.admin.cq_mem.iova)
        self.pci.write32(regs.CC, regs.cc_value(self.page_size, regs.cc_css(self.cap)))
        self._wait_ready(True)
        self.admin.resume()
        if self.dbbuf is not None:
            self.dbbuf.clear()
            self._admin(self.dbbuf.sqe(), self.dbbuf.mem, what="Doorbell Buffer Config")
            self.admin.qpair.set_shadow(*self.dbbuf.addrs, mmio_always=True)
        granted = self._negotiate_queues(WANTED_IO_QUEUES)
        if self.io_queues and max(self.io_queues) > granted:
            raise ControllerError(f"{self.bdf}: after the reset the controller grants "
                                  f"{granted} I/O queue pairs; queue {max(self.io_queues)} "
                                  "cannot be re-created")
        for qid in sorted(self.io_queues):
            q = self.io_queues[qid]
            q.reinit(self.dbbuf.addrs if self.dbbuf is not None else None)
            self._create_cq(q)
            self._create_sq(q)
            q.resume()
        if self.events is not None:
            self.events.arm()                   # the reset aborted the outstanding AERs

    def _give_up(self, e: BaseException) -> None:
        """The controller could not be brought back: fail everything, for good."""
        if self._failure is None:
            self._failure = ControllerFatalError(
                self.bdf, "", f"the controller could not be reset ({e}); close it and open "
                "it again (or check the device)")
        quiet = False
        try:
            quiet = not (self.pci.read32(regs.CSTS) & regs.CSTS_RDY) or self.pci_gone()
        except IommuDmaError:
            pass
        for q in [*self.io_queues.values(), *([self.admin] if self.admin else [])]:
            q.close(self._failure, device_quiet=quiet)

    def _on_timeout(self, q: IoQueue, expired: list[PendingCommand]) -> None:
        """Commands past their deadline (called by the queue, from a waiting thread): Abort
        each (§5.1); one that does not come back within abort_timeout gets the controller
        reset. Nested timeouts (of the Abort itself) wait for the outer recovery."""
        with self._lock:                    # before any reset: one lock order for all
            if self.resetting or (self._recovering and q.qid == 0):
                # A command of the recovery itself (an Abort, a command of the restart) did
                # not come back: it cannot wait for a reset; the one under way settles it.
                for p in expired:
                    q.give_up(p, NvmeTimeoutError(
                        f"{p.future.what}: no completion within {p.timeout} s while the "
                        f"controller {self.bdf} was being recovered"))
                return
            self._deferred.extend((q, p) for p in expired)
            self._recovering = True
            try:
                while self._deferred:
                    q, p = self._deferred.pop(0)
                    if not p.future.done() and not self.closed and self._failure is None:
                        self._recover_command(q, p)
            finally:
                self._recovering = False
                self._deferred.clear()

    def _recover_command(self, q: IoQueue, p: PendingCommand) -> None:
        what = p.future.what
        log.warning("%s: %s timed out after %s s; recovering", self.bdf, what, p.timeout)
        cid = q.command_id(p) if q.qid else None
        if cid is not None:
            wait = self.recovery.abort_timeout
            try:
                dw0 = self._admin(sqe.abort(q.qid, cid), what=f"Abort of {what}", timeout=wait)
                log.info("%s: Abort of %s: %s", self.bdf, what,
                         "not aborted" if dw0 & 1 else "aborted")
            except IommuDmaError as e:
                log.warning("%s: Abort of %s failed: %s", self.bdf, what, e)
            if p.future.wait(wait):
                return
        try:
            self._reset_controller(False, None)
        except IommuDmaError as e:
            log.error("%s: reset after the timeout of %s failed: %s", self.bdf, what, e)

    def _fatal_status(self) -> None:
        """CSTS.CFS seen by the health watch: reset; waiters get ControllerFatalError."""
        log.error("%s: Controller Fatal Status; resetting", self.bdf)
        with self._lock:
            if self.closed or self._failure is not None:
                return
            try:
                self._reset_controller(False, lambda what: ControllerFatalError(
                    self.bdf, what, "the controller reported Controller Fatal Status (CSTS.CFS)"
                    " and was reset"))
            except IommuDmaError as e:
                log.error("%s: reset after Controller Fatal Status failed: %s", self.bdf, e)

    def _device_lost(self, why: str, *, present: bool) -> None:
        """The device is gone, or the kernel wants it back (present): fail every command
        with DeviceGoneError at once, disable the controller if it is still there, and close
        it (so the kernel can complete the removal)."""
        log.error("%s: %s", self.bdf, why)
        self._failure = err = DeviceGoneError(self.bdf, "", why)
        quiet = not present
        if present:
            try:
                self._disable()
                quiet = True
            except IommuDmaError:
                quiet = self.pci_gone()
        for q in [*list(self.io_queues.values()), *([self.admin] if self.admin else [])]:
            q.close(err, device_quiet=quiet)
        self.close()

    # ---- admin commands ---------------------------------------------------------------------

    def admin_command(self, cmd: sqe.Sqe, buf: DmaBuffer | None = None, length: int = 0,
                      what: str = "", timeout: float | None = ADMIN_TIMEOUT) -> int:
        """Run one admin command and return DW0 of its completion; NvmeError on error status.
        buf (DMA memory) carries the data, length bytes of it (default: all of buf)."""
        self.check_open()
        return self._admin(cmd, buf, length, what, timeout)

    def _admin(self, cmd: sqe.Sqe, buf: DmaBuffer | None = None, length: int = 0,
               what: str = "", timeout: float | None = ADMIN_TIMEOUT) -> int:
        if self.admin is None:
            raise ClosedError(f"controller {self.bdf} (no admin queue)")
        addr, n = 0, 0
        if buf is not None:
            buf.check_usable()
            addr, n = buf.addr, length or buf.size
            if n > buf.size:
                raise ValueError(f"{what or 'admin command'}: length {n} exceeds the "
                                 f"{buf.size}-byte buffer")
        return self.admin.submit(cmd, addr, n, what, owner=buf).result(timeout)

    def _admin_read(self, cmd: sqe.Sqe, size: int, what: str) -> bytes:
        with self.allocator.alloc(size, self.page_size) as buf:
            self.admin_command(cmd, buf, size, what)
            return bytes(buf.view[:size])

    def _identify_raw(self, cns: int, nsid: int = 0) -> bytes:
        return self._admin_read(sqe.identify(cns, nsid=nsid), 4096,
                                f"Identify CNS {cns:#04x} nsid {nsid}")

    def identify_namespace(self, nsid: int) -> IdentifyNamespace:
        return IdentifyNamespace.parse(self._identify_raw(CNS_NAMESPACE, nsid))

    def active_namespaces(self) -> list[int]:
        return parse_ns_list(self._identify_raw(CNS_ACTIVE_NS_LIST))

    def get_log_page(self, lid: int, size: int, nsid: int = sqe.NSID_ALL) -> bytes:
        return self._admin_read(sqe.get_log_page(lid, size, nsid=nsid), size,
                                f"Get Log Page LID {lid:#04x}")

    def smart_log(self) -> SmartLog:
        return SmartLog.parse(self.get_log_page(LID_SMART, 512))

    def error_log(self, entries: int | None = None) -> list[ErrorLogEntry]:
        n = min(entries or self.identify.elpe + 1, self.identify.elpe + 1)   # ELPE is 0's based
        return parse_error_log(self.get_log_page(LID_ERROR, 64 * n))

    def firmware_log(self) -> FirmwareSlotLog:
        return FirmwareSlotLog.parse(self.get_log_page(LID_FW_SLOT, 512))

    def get_features(self, fid: int, *, nsid: int = 0, sel: int = 0, cdw11: int = 0) -> int:
        return self.admin_command(sqe.get_features(fid, sel=sel, nsid=nsid, cdw11=cdw11),
                                  what=f"Get Features FID {fid:#04x}")

    def set_features(self, fid: int, cdw11: int, *, nsid: int = 0, save: bool = False) -> int:
        return self.admin_command(sqe.set_features(fid, cdw11, nsid=nsid, save=save),
                                  what=f"Set Features FID {fid:#04x}")

    def format_nvm(self, nsid: int, lbaf: int, *, ses: int = 0, timeout: float = 60.0) -> None:
        if not timeout > 0:
            raise ValueError(f"Format NVM: timeout must be positive, not {timeout} (a Format "
                             "must not be abandoned while the device runs it)")
        self.admin_command(sqe.format_nvm(nsid, lbaf, ses=ses),
                           what=f"Format NVM nsid {nsid} lbaf {lbaf}", timeout=timeout)
        with self._lock:
            self._namespaces.pop(nsid, None)

    def _negotiate_queues(self, wanted: int) -> int:
        """Set Features Number of Queues (§5.27.1.7): the I/O queue pairs granted, capped at
        what we asked for (a device may answer more, §5.27.1.7 allows it; we use no more)."""
        n = wanted - 1
        dw0 = self.set_features(FID_NUMBER_OF_QUEUES, n | n << 16)
        return min(dw0 & 0xFFFF, dw0 >> 16, n) + 1

    # ---- I/O queues ---------------------------------------------------------------------------

    def create_io_queue(self, depth: int = 256, *, timeout: float | None = QUEUE_DEFAULT,
                        wait: WaitMode = "poll", spin: float | None = None,
                        sgl: bool = False) -> IoQueue:
        """A new I/O queue pair (its CQ, then its SQ); at most CAP.MQES (and 4096) entries.
        wait: "poll" (CQ created with interrupts off), "interrupt" or "hybrid" (CQ with IEN
        and an MSI-X vector of its own while vectors last; waiting sleeps on it, hybrid after
        polling spin seconds). timeout: this queue's own command deadline in seconds (None:
        no limit); by default the queue follows ctrl.recovery.io_timeout. sgl: describe data
        with an SGL instead of PRPs (the controller must report SGL support). Thread-safe."""
        spin = check_mode(wait, spin)
        if sgl:
            self._check_sgl()
        with self._lock:
            self.check_open()
            qid = next((q for q in range(1, self.max_io_queues + 1) if q not in self.io_queues),
                       None)
            if qid is None:
                raise QueuesExhaustedError(
                    f"{self.bdf}: all {self.max_io_queues} I/O queue pairs the controller "
                    "granted are in use; delete one first")
            depth = max(2, min(depth, self.cap.mqes, MAX_QUEUE_DEPTH))
            irq = None
            if wait != "poll":
                vector = self._vector_for(qid)
                irq = QueueInterrupt(vector, self._msix[vector], wait, spin)
            q = self._new_queue(qid, depth, self.max_transfer,
                                self.dbbuf.addrs if self.dbbuf is not None else None, irq)
            q.timeout = timeout
            q.sgl = sgl
            if sgl:
                q.qpair.set_sgl(True)
            self._create_on_device(q)
            self.io_queues[qid] = q
            self.queues_created += 1
            return q

    def _check_sgl(self) -> None:
        """Identify SGLS bits 1:0 (Base 2.0 §5.17.2.1): 00b = SGLs not supported for NVM
        commands; 01b no alignment rule, 10b dword alignment (the engine always requires
        dword-aligned data)."""
        if not self.identify.sgls & 0x3:
            raise ControllerError(f"{self.bdf}: the controller does not support SGLs (Identify "
                                  f"SGLS = {self.identify.sgls:#x}); use PRPs (sgl=False)")

    def _vector_for(self, qid: int) -> int:
        """The MSI-X vector of I/O queue qid: its own while vectors last (vector 0 is the
        admin CQ's, §3.1.4 ACQ; further queues share round robin). Enables MSI-X through VFIO
        the first time, with as many vectors as queues (the count is fixed once enabled)."""
        if not self._msix:
            have = self.pci.irq_info().count
            if have < 1:
                raise ControllerError(f"{self.bdf}: the device offers no MSI-X vectors "
                                      "(VFIO reports 0), so a queue cannot wait on an "
                                      "interrupt; use wait='poll'")
            self._msix = self.pci.enable_msix(min(have, self.max_io_queues + 1),
                                              nonblocking=True)
        n = len(self._msix)
        return 0 if n == 1 else 1 + (qid - 1) % (n - 1)

    def _create_on_device(self, q: IoQueue) -> None:
        """Create I/O CQ then SQ (§5.4, §5.5); undo what was created when a step fails. The
        rings are released only when the device provably no longer uses them."""
        qid = q.qid
        gone = ClosedError(f"I/O queue {qid} (not created)")
        try:
            self._create_cq(q)
        except NvmeError:
            q.close(gone, device_quiet=True)   # refused: the device never took the rings
            raise
        except BaseException:
            q.close(gone, device_quiet=False)  # unknown: keep the rings quarantined
            raise
        try:
            self._create_sq(q)
        except BaseException as e:
            deleted = False
            if isinstance(e, NvmeError):
                try:
                    self._admin(sqe.delete_io_cq(qid), what=f"Delete I/O CQ {qid}")
                    deleted = True
                except IommuDmaError:
                    pass
            q.close(gone, device_quiet=deleted)
            raise

    def _create_cq(self, q: IoQueue) -> None:
        """Create I/O CQ (§5.4) over q's ring. The ring goes as the command's data buffer
        (its first page at most), so the engine checks it is mapped and puts its address in
        PRP1 (a physically contiguous queue's base, §5.4 Figure 149)."""
        ien, iv = (True, q.irq.vector) if q.irq is not None else (False, 0)
        self._admin(sqe.create_io_cq(q.qid, q.depth, ien=ien, iv=iv), q.cq_mem,
                    min(q.cq_mem.size, self.page_size), what=f"Create I/O CQ {q.qid}")

    def _create_sq(self, q: IoQueue) -> None:
        """Create I/O SQ (§5.5) over q's ring, bound to the CQ of the same QID."""
        self._admin(sqe.create_io_sq(q.qid, q.depth, q.qid), q.sq_mem, min(q.sq_mem.size,
                    self.page_size), what=f"Create I/O SQ {q.qid}")

    def default_io_queue(self) -> IoQueue:
        """The I/O queue pair namespaces share by default (created on first use, waiting as
        ctrl.wait says)."""
        q = self._default_queue
        if q is not None and not q.closed:
            return q
        with self._lock:
            self.check_open()
            if self._default_queue is None or self._default_queue.closed:
                self._default_queue = self.create_io_queue(self.queue_depth, wait=self.wait,
                                                           spin=self._spin())
            return self._default_queue

    def _spin(self) -> float | None:
        return self.hybrid_spin if self.wait == "hybrid" else None

    def queue_for_caller(self) -> IoQueue:
        """The I/O queue pair a namespace call from here uses (see the class text)."""
        loop = asyncio._get_running_loop()
        if loop is not None:
            return self.loop_queue(loop)
        if self.per_thread_queues:
            return self.thread_queue()
        return self.default_io_queue()

    def thread_queue(self) -> IoQueue:
        """The calling thread's own I/O queue pair (created on first use with ctrl.wait and
        ctrl.queue_depth; deleted once the thread has ended and another queue is created).
        When the controller has no queue pair left, the shared default queue (logged once)."""
        # Keyed by the OS thread, not threading.local: a C thread calling in through
        # PyGILState_Ensure (nbdkit's workers, for one) gets a new Python thread state, and so
        # empty thread-locals, on every call.
        tid = threading.get_native_id()
        q = self._thread_queues.get(tid)
        if q is not None and not q.closed:
            return q
        with self._lock:
            self.check_open()
            self._reclaim_queues()
            try:
                q = self.create_io_queue(self.queue_depth, wait=self.wait, spin=self._spin())
            except QueuesExhaustedError as e:
                return self._shared_instead(e)
            self._thread_queues[tid] = q
            self._owned.append((functools.partial(_thread_alive, tid), q))
            return q

    def loop_queue(self, loop: asyncio.AbstractEventLoop) -> IoQueue:
        """The I/O queue pair of an asyncio event loop: interrupt-driven, reaped by the loop
        when its vector fires (created on first use; deleted once the loop is closed and
        another queue is created). Call it from the loop's thread."""
        entry = self._loop_queues.get(id(loop))
        if entry is not None and entry[0]() is loop and not entry[1].closed:
            return entry[1]
        with self._lock:
            self.check_open()
            self._reclaim_queues()
            try:
                q = self.create_io_queue(self.queue_depth, wait="interrupt")
            except QueuesExhaustedError as e:
                return self._shared_instead(e)
            aio.LoopReaper(q, loop, self._on_timeout)
            ref = weakref.ref(loop)
            self._loop_queues[id(loop)] = (ref, q)
            self._owned.append((lambda: (lp := ref()) is not None and not lp.is_closed(), q))
            return q

    def _shared_instead(self, e: IommuDmaError) -> IoQueue:
        if not self._warned_full:
            self._warned_full = True
            log.warning("%s; using the shared default queue instead", e)
        return self.default_io_queue()

    def _reclaim_queues(self) -> None:
        """Delete the queues of threads that ended and loops that closed (under the lock)."""
        keep = []
        for alive, q in self._owned:
            if alive() and not q.closed:
                keep.append((alive, q))
            elif not q.closed and self.io_queues.get(q.qid) is q:
                try:
                    self._delete_queue(q.qid)
                except IommuDmaError as e:
                    log.warning("%s: deleting the queue of a finished thread/loop: %s",
                                self.bdf, e)
        self._owned = keep
        for key, (_, q) in list(self._loop_queues.items()):
            if q.closed:
                del self._loop_queues[key]
        for tid, q in list(self._thread_queues.items()):
            if q.closed:
                del self._thread_queues[tid]

    def delete_io_queue(self, qid: int) -> None:
        """Delete I/O SQ then CQ (§5.6, §5.7); commands still pending fail with ClosedError."""
        with self._lock:
            self.check_open()
            if qid not in self.io_queues:
                raise ValueError(f"{self.bdf}: no I/O queue {qid}; queues: "
                                 f"{sorted(self.io_queues) or 'none'}")
            self._delete_queue(qid)

    def _delete_queue(self, qid: int) -> None:
        q = self.io_queues[qid]
        if self._default_queue is q:
            self._default_queue = None
        self._admin(sqe.delete_io_sq(qid), what=f"Delete I/O SQ {qid}")
        self._admin(sqe.delete_io_cq(qid), what=f"Delete I/O CQ {qid}")
        del self.io_queues[qid]
        # §5.6: deleting an SQ aborts its outstanding commands; the device is done with them
        q.close(ClosedError(f"I/O queue {qid} (deleted)"), device_quiet=True)

    # ---- namespaces and memory -----------------------------------------------------------------

    def namespace(self, nsid: int) -> Namespace:
        """The Namespace object of nsid (one per NSID, shared; safe to use from threads)."""
        from iommu_dma.nvme.namespace import Namespace

        with self._lock:
            self.check_open()
            if nsid not in self._namespaces:
                self._namespaces[nsid] = Namespace(self, nsid)
            return self._namespaces[nsid]

    def alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        """DMA memory usable as a data buffer by this controller (IOVA = address)."""
        self.check_open()
        return self.allocator.alloc(size, align)

    @property
    def max_transfer(self) -> int:
        """Largest transfer of one command in bytes: MDTS, capped at what the engine's PRP
        lists are sized for (MAX_TRANSFER_CAP, also when MDTS is 0 = unlimited)."""
        mdts = self.identify.max_transfer(self.cap.mps_min)
        return min(mdts, MAX_TRANSFER_CAP) if mdts else MAX_TRANSFER_CAP

    def __repr__(self) -> str:
        ident = getattr(self, "identify", None)
        if ident is None:
            return f"<Controller {self.bdf}>"
        return f"<Controller {self.bdf} {ident.mn!r} sn={ident.sn!r}>"

    # ---- commands test engineers script (see nsmgmt, features, firmware, ...) -------------

    def forget_namespace(self, nsid: int) -> None:
        """Drop the cached Namespace of nsid (after it was detached, deleted or changed), so
        the next namespace(nsid) identifies it again. NSID_ALL drops every one."""
        with self._lock:
            if nsid == sqe.NSID_ALL:
                self._namespaces.clear()
            else:
                self._namespaces.pop(nsid, None)

    def abort(self, sqid: int, cid: int, *, timeout: float | None = None) -> bool:
        """Abort (Base §5.1) command cid of submission queue sqid; True when the controller
        says it aborted it (completion DW0 bit 0 clear), False when it did not (bit 0 set).
        Best effort: a command not aborted still completes on its own."""
        dw0 = self.admin_command(sqe.abort(sqid, cid), what=f"Abort SQID {sqid} CID {cid}",
                                 timeout=timeout)
        return not dw0 & 1


def _ended_by_reset(q: IoQueue, why: Callable[[str], BaseException]
                    ) -> Callable[[PendingCommand], BaseException]:
    """The error of each command a reset took away: timed out, or aborted by the reset."""
    def error(p: PendingCommand) -> BaseException:
        if p.timed_out:
            return NvmeTimeoutError(f"{p.future.what}: no completion within {p.timeout} s on "
                                    f"queue {q.qid}; the controller was reset to recover it")
        return why(p.future.what)
    return error
