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


def config_sqe() -> Sqe:
    """Doorbell Buffer Config (§5.11), sent with the two pages as one 2-page data buffer: the
    engine's PRPs for it are then PRP1 = shadow doorbell page, PRP2 = EventIdx page."""
    return Sqe(ADM_DOORBELL_BUFFER_CONFIG)


class DoorbellBuffers:
    """The two zeroed, page-aligned DMA pages of one controller, contiguous (shadow first)."""

    def __init__(self, allocator: DmaAllocator, page_size: int) -> None:
        self.page_size = page_size
        self.mem: DmaBuffer = allocator.alloc(2 * page_size, page_size)
        self.clear()

    def clear(self) -> None:
        """Zero both pages (a reset controller forgot them; tails and heads restart at 0)."""
        ctypes.memset(self.mem.addr, 0, 2 * self.page_size)

    @property
    def addrs(self) -> tuple[int, int]:
        return self.mem.addr, self.mem.addr + self.page_size

    def sqe(self) -> Sqe:
        return config_sqe()

    def free(self) -> None:
        self.mem.free()
