"""An NVMe controller driven from user space: reset, admin queue, admin commands, I/O queues.

    with Controller.open("0000:00:0a.0") as ctrl:
        print(ctrl.identify.mn)
        ns = ctrl.namespace(1)
        ns.write(0, data)
"""

from __future__ import annotations

import time
from typing import Any

from iommu_dma.container import Container
from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.memory import DmaAllocator, DmaBuffer
from iommu_dma.nvme import dbbuf, regs, sqe
from iommu_dma.nvme.identify import (
    FirmwareSlotLog,
    IdentifyController,
    IdentifyNamespace,
    SmartLog,
    parse_error_log,
    parse_ns_list,
)
from iommu_dma.nvme.ioqueue import IoQueue
from iommu_dma.pci import PciDevice

ADMIN_DEPTH = 32
ADMIN_TIMEOUT = 10.0
FID_NUMBER_OF_QUEUES = 0x07
LID_ERROR, LID_SMART, LID_FW_SLOT = 0x01, 0x02, 0x03
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NS_LIST = 0x00, 0x01, 0x02


class ControllerError(IommuDmaError):
    """The controller did not behave as the spec says (not ready in time, fatal status...)."""


class Controller:
    """One NVMe controller behind VFIO. Open with Controller.open(bdf); close() (or the context
    manager) deletes the I/O queues, shuts the controller down and releases everything."""

    # Use shadow doorbells (Doorbell Buffer Config, §5.8) when OACS bit 8 says they exist.
    use_shadow_doorbells = True

    def __init__(self, pci: PciDevice, container: Container, allocator: DmaAllocator, *,
                 owns_container: bool, admin_depth: int = ADMIN_DEPTH) -> None:
        self.pci = pci
        self.bdf = pci.bdf
        self.container = container
        self.allocator = allocator
        self._owns_container = owns_container
        self.closed = False
        self.cap = regs.Capabilities(pci.read64(regs.CAP))
        self.page_size = max(4096, self.cap.mps_min)
        self.io_queues: dict[int, IoQueue] = {}
        self._namespaces: dict[int, Any] = {}
        self.admin: IoQueue | None = None
        self._default_queue: IoQueue | None = None
        self.dbbuf: dbbuf.DoorbellBuffers | None = None
        self._reset(admin_depth)
        self.identify = IdentifyController.parse(self._identify_raw(CNS_CONTROLLER))
        if self.use_shadow_doorbells and dbbuf.supported(self.identify.oacs):
            self.enable_shadow_doorbells()
        self.max_io_queues = self._negotiate_queues(64)

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, bdf: str, *, container: Container | None = None,
             allocator: DmaAllocator | None = None) -> Controller:
        """Take the controller at bdf (bound to vfio-pci). A given container (and allocator)
        is shared, e.g. by several controllers; else the controller makes its own."""
        owns = container is None
        cont = container if container is not None else Container()
        try:
            cont.attach(bdf)                 # no-op when its group is already attached
            alloc = allocator if allocator is not None else DmaAllocator(cont)
            pci = PciDevice(cont, bdf)
        except BaseException:
            if owns:
                cont.close()
            raise
        try:
            return cls(pci, cont, alloc, owns_container=owns)
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
        if self.closed:
            return
        try:
            if not self.pci_gone():
                for qid in sorted(self.io_queues, reverse=True):
                    self.delete_io_queue(qid)
                self._shutdown()
                if self.dbbuf is not None:      # the disabled controller forgot the pages
                    self.dbbuf.free()
        finally:
            self.closed = True
            self.pci.close()
            if self._owns_container:
                self.container.close()

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"controller {self.bdf} is closed")

    def pci_gone(self) -> bool:
        return self.pci.read32(regs.CSTS) == regs.CSTS_GONE

    # ---- reset and enable (NVMe Base 2.0 §3.5.1) -------------------------------------------

    def _reset(self, admin_depth: int) -> None:
        self.pci.enable_bus_master()
        self._disable()
        depth = min(admin_depth, self.cap.mqes, 4096)
        self.admin = IoQueue(0, depth, self.allocator, self.pci.bar0_addr, dstrd=self.cap.dstrd,
                             page_size=self.page_size, maptable=self.container.maptable)
        self.pci.write32(regs.AQA, regs.aqa_value(depth, depth))
        self.pci.write64(regs.ASQ, self.admin.sq_mem.iova)
        self.pci.write64(regs.ACQ, self.admin.cq_mem.iova)
        self.pci.write32(regs.CC, regs.cc_value(self.page_size))
        self._wait_ready(True)

    def enable_shadow_doorbells(self) -> None:
        """Doorbell Buffer Config (§5.8): the admin queue and every I/O queue created later
        write tails/heads to a shadow page and ring BAR0 only when the EventIdx asks."""
        assert self.admin is not None
        bufs = dbbuf.DoorbellBuffers(self.allocator, self.page_size)
        try:
            self.admin_command(bufs.sqe(), what="Doorbell Buffer Config")
        except BaseException:
            bufs.free()
            raise
        self.dbbuf = bufs
        self.admin.qpair.set_shadow(*bufs.addrs, mmio_always=True)

    def _disable(self) -> None:
        if self.pci.read32(regs.CC) & regs.CC_EN:
            self.pci.write32(regs.CC, 0)
        self._wait_ready(False)

    def _wait_ready(self, ready: bool) -> None:
        """Wait for CSTS.RDY to reach `ready`, bounded by CAP.TO (§3.1.4.1)."""
        deadline = time.monotonic() + max(self.cap.timeout_ms, 500) / 1000
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
        deadline = time.monotonic() + max(self.cap.timeout_ms, 500) / 1000
        while (self.pci.read32(regs.CSTS) & regs.CSTS_SHST_MASK) != regs.CSTS_SHST_COMPLETE:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        self._disable()

    # ---- admin commands ---------------------------------------------------------------------

    def admin_command(self, cmd: sqe.Sqe, buf: DmaBuffer | None = None, length: int = 0,
                      what: str = "", timeout: float = ADMIN_TIMEOUT) -> int:
        """Run one admin command and return DW0 of its completion; NvmeError on error status.
        buf (DMA memory) carries the data, length bytes of it."""
        self.check_open()
        assert self.admin is not None
        addr = buf.addr if buf is not None else 0
        n = length or (buf.size if buf is not None else 0)
        return self.admin.submit(cmd, addr, n, what).result(timeout)

    def _admin_read(self, cmd: sqe.Sqe, size: int, what: str) -> bytes:
        buf = self.allocator.alloc(size, self.page_size)
        try:
            self.admin_command(cmd, buf, size, what)
            return bytes(memoryview(buf)[:size])
        finally:
            buf.free()

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

    def error_log(self, entries: int | None = None):  # -> list[ErrorLogEntry]
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
        self.admin_command(sqe.format_nvm(nsid, lbaf, ses=ses),
                           what=f"Format NVM nsid {nsid} lbaf {lbaf}", timeout=timeout)
        self._namespaces.pop(nsid, None)

    def _negotiate_queues(self, wanted: int) -> int:
        """Set Features Number of Queues (§5.27.1.7): returns the I/O queue pairs granted."""
        n = wanted - 1
        dw0 = self.set_features(FID_NUMBER_OF_QUEUES, n | n << 16)
        return min(dw0 & 0xFFFF, dw0 >> 16) + 1

    # ---- I/O queues ---------------------------------------------------------------------------

    def create_io_queue(self, depth: int = 256) -> IoQueue:
        """A new polled I/O queue pair (CQ with interrupts off, then its SQ)."""
        self.check_open()
        qid = next(q for q in range(1, self.max_io_queues + 2) if q not in self.io_queues)
        if qid > self.max_io_queues:
            raise ControllerError(f"{self.bdf}: all {self.max_io_queues} I/O queue pairs the "
                                  f"controller granted are in use")
        depth = min(depth, self.cap.mqes)
        q = IoQueue(qid, depth, self.allocator, self.pci.bar0_addr, dstrd=self.cap.dstrd,
                    page_size=self.page_size, maptable=self.container.maptable,
                    shadow=self.dbbuf.addrs if self.dbbuf is not None else None)
        try:
            self.admin_command(sqe.create_io_cq(qid, depth, prp1=q.cq_mem.iova),
                               what=f"Create I/O CQ {qid}")
            try:
                self.admin_command(sqe.create_io_sq(qid, depth, qid, prp1=q.sq_mem.iova),
                                   what=f"Create I/O SQ {qid}")
            except BaseException:
                self.admin_command(sqe.delete_io_cq(qid), what=f"Delete I/O CQ {qid}")
                raise
        except BaseException:
            q.free()
            raise
        self.io_queues[qid] = q
        return q

    def default_io_queue(self) -> IoQueue:
        """The I/O queue pair namespaces use unless given their own (created on first use)."""
        self.check_open()
        if self._default_queue is None:
            self._default_queue = self.create_io_queue()
        return self._default_queue

    def delete_io_queue(self, qid: int) -> None:
        if self._default_queue is not None and self._default_queue.qid == qid:
            self._default_queue = None
        q = self.io_queues.pop(qid)
        self.admin_command(sqe.delete_io_sq(qid), what=f"Delete I/O SQ {qid}")
        self.admin_command(sqe.delete_io_cq(qid), what=f"Delete I/O CQ {qid}")
        q.free()

    # ---- namespaces and memory -----------------------------------------------------------------

    def namespace(self, nsid: int):  # -> Namespace
        from iommu_dma.nvme.namespace import Namespace

        self.check_open()
        if nsid not in self._namespaces:
            self._namespaces[nsid] = Namespace(self, nsid)
        return self._namespaces[nsid]

    def alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        """DMA memory usable as a data buffer by this controller (IOVA = address)."""
        return self.allocator.alloc(size, align)

    @property
    def max_transfer(self) -> int:
        """Largest transfer of one command in bytes (MDTS; 2 MiB when MDTS says unlimited)."""
        return self.identify.max_transfer(self.cap.mps_min) or 2 << 20

    def __repr__(self) -> str:
        return f"<Controller {self.bdf} {self.identify.mn!r} sn={self.identify.sn!r}>"
