"""Shadow doorbells: the Doorbell Buffer Config admin command (NVMe Base 2.0 §5.11).

The host gives the controller two pages: the Shadow Doorbell buffer (PRP1), where it writes
SQ tails and CQ heads at the doorbell offsets (dword 2y: SQ y tail, 2y+1: CQ y head, stride
4 << CAP.DSTRD), and the EventIdx buffer (PRP2), where the controller says when it still wants
an MMIO doorbell write. Optional: Identify Controller OACS bit 8 says the controller has it.
Emulated controllers gain the most (each MMIO doorbell write is a VM exit).
"""

from __future__ import annotations

import ctypes

from iommu_dma.memory import DmaAllocator, DmaBuffer
from iommu_dma.nvme.constants import ADM_DOORBELL_BUFFER_CONFIG, OACS_DBBUF
from iommu_dma.nvme.sqe import Sqe


def supported(oacs: int) -> bool:
    """Identify Controller OACS bit 8: the controller implements Doorbell Buffer Config."""
    return bool(oacs & OACS_DBBUF)


def config_sqe(shadow_iova: int, eventidx_iova: int) -> Sqe:
    """Doorbell Buffer Config (§5.11): PRP1 = shadow doorbell page, PRP2 = EventIdx page.
    The engine copies PRP1/PRP2 of a command sent without a data buffer unchanged."""
    return Sqe(ADM_DOORBELL_BUFFER_CONFIG, prp1=shadow_iova, prp2=eventidx_iova)


class DoorbellBuffers:
    """The two zeroed, page-aligned DMA pages of one controller."""

    def __init__(self, allocator: DmaAllocator, page_size: int) -> None:
        self.shadow: DmaBuffer = allocator.alloc(page_size, page_size)
        self.eventidx: DmaBuffer = allocator.alloc(page_size, page_size)
        for buf in (self.shadow, self.eventidx):
            ctypes.memset(buf.addr, 0, page_size)

    @property
    def addrs(self) -> tuple[int, int]:
        return self.shadow.addr, self.eventidx.addr

    def sqe(self) -> Sqe:
        return config_sqe(self.shadow.iova, self.eventidx.iova)

    def free(self) -> None:
        self.shadow.free()
        self.eventidx.free()
