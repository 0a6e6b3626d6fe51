"""A PCI device opened through VFIO: BAR0 mapped, config space, bus mastering, reset, MSI-X."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING

from iommu_dma import vfio
from iommu_dma.discovery import VFIO_DRIVER, PciInfo, find
from iommu_dma.errors import ClosedError, NoIommuError, NotBoundError, VfioError
from iommu_dma.libc import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    eventfd,
    mmap_at,
    munmap,
)

if TYPE_CHECKING:
    from iommu_dma.container import Container

# PCI Local Bus spec, type 0 configuration header
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2      # bus master enable: the device may issue DMA
PCI_CLASS_REVISION = 0x08


def mapped_prefix(areas: tuple[tuple[int, int], ...], bar_size: int) -> int:
    """Bytes of the BAR mapped without a hole from offset 0: the contiguous run of mmap'd
    (offset, size) areas that starts at 0, capped at the BAR's size (0 if none starts at 0)."""
    end = 0
    for off, size in sorted(areas):
        if off > end:
            break
        end = max(end, off + size)
    return min(end, bar_size)


class PciDevice:
    """A device of `container` (its group, or with iommufd the device, is attached on open),
    by BDF.

    BAR0 is mmap'd at `bar0_addr` (an integer pointer for native code); `bar0_size` is how many
    bytes from there are really mapped and part of the BAR, and read32/write32/read64/write64
    refuse any register offset beyond it (a device may report a doorbell stride or a register
    layout that points past its BAR; nothing computed from device data is trusted unchecked).
    Config space goes through region 7 (pread/pwrite).
    """

    def __init__(self, container: Container, bdf: str, *, nvme: bool = True) -> None:
        self.info: PciInfo = find(bdf, nvme=nvme)
        self.bdf = self.info.bdf
        self._bindable_group(self.info)
        self.container = container
        # the container's backend opens it: VFIO_GROUP_GET_DEVICE_FD or the bound VFIO cdev
        self.fd = container.device_fd(self.bdf)
        self.closed = False
        self.msix_fds: list[int] = []
        self.request_fd: int | None = None
        self.bar0_addr = 0
        self.bar0_size = 0               # accessible bytes from bar0_addr (see _map_bar0)
        self._bar0_reserved = 0          # length of the address range reserved for BAR0
        try:
            self.device_info = vfio.device_get_info(self.fd)
            self.config_region = vfio.device_get_region_info(self.fd,
                                                             vfio.VFIO_PCI_CONFIG_REGION_INDEX)
            self.bar0 = vfio.device_get_region_info(self.fd, vfio.VFIO_PCI_BAR0_REGION_INDEX)
            self._map_bar0()
        except BaseException:
            os.close(self.fd)
            raise
        container.add_dependent(self)

    @staticmethod
    def _bindable_group(info: PciInfo) -> int:
        """The device's IOMMU group, when the device is bound to vfio-pci."""
        if info.iommu_group is None:
            raise NoIommuError("open device", f"{info.bdf} has no IOMMU group (boot with "
                                              "intel_iommu=on)")
        if info.driver != VFIO_DRIVER:
            raise NotBoundError(info.bdf, info.driver)
        return info.iommu_group

    # ---- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> PciDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"PciDevice {self.bdf}")

    def close(self) -> None:
        """Disable MSI-X, unmap BAR0, close the device fd (before the group may be detached)."""
        if self.closed:
            return
        if self.msix_fds:
            self.disable_msix()
        if self.request_fd is not None:
            os.close(self.request_fd)       # closing the device fd below drops the trigger
            self.request_fd = None
        if self.bar0_addr:
            munmap(self.bar0_addr, self._bar0_reserved)
            self.bar0_addr = self.bar0_size = 0
        os.close(self.fd)
        self.closed = True
        self.container.remove_dependent(self)

    # ---- BAR0 ------------------------------------------------------------------------------

    def _map_bar0(self) -> None:
        """mmap BAR0 as one contiguous range: reserve, then map each mmap-able area into it
        (vfio.h: with a sparse-mmap capability only the listed areas may be mapped)."""
        region = self.bar0
        areas = region.mmap_areas()
        if region.size == 0 or not areas:
            raise VfioError("mmap BAR0", errno.EINVAL, f"{self.bdf}: BAR0 (size "
                            f"{region.size:#x}) is not mmap-able")
        reserved = -(-region.size // PAGE_SIZE) * PAGE_SIZE
        base = mmap_at(0, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        try:
            for off, size in areas:
                if off < 0 or size <= 0 or off + size > reserved:
                    raise OSError(errno.EINVAL, f"sparse area [{off:#x}, +{size:#x}) lies "
                                                f"outside the {region.size:#x}-byte BAR")
                mmap_at(base + off, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                        self.fd, region.offset + off)
        except OSError as e:
            munmap(base, reserved)
            raise VfioError("mmap BAR0", e.errno, str(e)) from None
        self.bar0_addr, self._bar0_reserved = base, reserved
        self.bar0_size = mapped_prefix(areas, region.size)

    def _reg(self, offset: int, width: int) -> int:
        self._check_open()
        if offset < 0 or offset % width or offset + width > self.bar0_size:
            raise ValueError(f"BAR0 offset {offset:#x} (width {width}) is outside the "
                             f"{self.bar0_size:#x} mapped bytes of the BAR or unaligned")
        return self.bar0_addr + offset

    def read32(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self._reg(offset, 4)).value

    def write32(self, offset: int, value: int) -> None:
        ctypes.c_uint32.from_address(self._reg(offset, 4)).value = value

    def read64(self, offset: int) -> int:
        # NVMe base spec: 64-bit registers may be accessed as two dwords, low first
        self._reg(offset, 8)
        return self.read32(offset) | self.read32(offset + 4) << 32

    def write64(self, offset: int, value: int) -> None:
        self._reg(offset, 8)
        self.write32(offset, value & 0xFFFFFFFF)
        self.write32(offset + 4, value >> 32)

    # ---- config space (region 7) -------------------------------------------------------------

    def config_read(self, offset: int, size: int = 4) -> int:
        """Little-endian read of 1, 2 or 4 bytes of config space."""
        data = self.config_read_bytes(offset, size)
        return int.from_bytes(data, "little")

    def config_read_bytes(self, offset: int, length: int) -> bytes:
        self._check_open()
        data = os.pread(self.fd, length, self.config_region.offset + offset)
        if len(data) != length:
            raise VfioError("pread config space", errno.EIO, f"{self.bdf}: short read at "
                            f"{offset:#x}")
        return data

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self._check_open()
        n = os.pwrite(self.fd, value.to_bytes(size, "little"), self.config_region.offset + offset)
        if n != size:
            raise VfioError("pwrite config space", errno.EIO, f"{self.bdf}: short write at "
                            f"{offset:#x}")

    @property
    def vendor_id(self) -> int:
        return self.config_read(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config_read(PCI_DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.config_read(PCI_CLASS_REVISION, 4) >> 8

    @property
    def bus_master(self) -> bool:
        return bool(self.config_read(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    def enable_bus_master(self, on: bool = True) -> None:
        """Set (or clear) PCI_COMMAND bit 2; memory space decoding is kept on."""
        cmd = self.config_read(PCI_COMMAND, 2) | PCI_COMMAND_MEMORY
        cmd = cmd | PCI_COMMAND_MASTER if on else cmd & ~PCI_COMMAND_MASTER
        self.config_write(PCI_COMMAND, cmd, 2)

    # ---- reset -------------------------------------------------------------------------------

    @property
    def can_reset(self) -> bool:
        return bool(self.device_info.flags & vfio.VFIO_DEVICE_FLAGS_RESET)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (FLR on the bench); bus mastering is restored if it was on."""
        self._check_open()
        master = self.bus_master
        vfio.device_reset(self.fd)
        if master and not self.bus_master:
            self.enable_bus_master()

    # ---- MSI-X -------------------------------------------------------------------------------

    def irq_info(self, index: int = vfio.VFIO_PCI_MSIX_IRQ_INDEX) -> vfio.IrqInfo:
        self._check_open()
        return vfio.device_get_irq_info(self.fd, index)

    def enable_msix(self, count: int, nonblocking: bool = False) -> list[int]:
        """Wire MSI-X vectors 0..count-1 to new eventfds (returned; closed by disable_msix)."""
        self._check_open()
        have = self.irq_info().count
        if not 0 < count <= have:
            raise ValueError(f"{self.bdf} has {have} MSI-X vectors; asked for {count}")
        if self.msix_fds:
            self.disable_msix()
        fds = [eventfd(nonblocking) for _ in range(count)]
        try:
            vfio.set_irq_eventfds(self.fd, vfio.VFIO_PCI_MSIX_IRQ_INDEX, 0, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.msix_fds = fds
        return list(fds)

    def enable_request_irq(self) -> int | None:
        """An eventfd the kernel signals when it wants the device back (unbind, hot removal:
        VFIO_PCI_REQ_IRQ_INDEX); None when the kernel offers no such interrupt. Closed by
        close()."""
        self._check_open()
        if self.request_fd is None:
            try:
                if self.irq_info(vfio.VFIO_PCI_REQ_IRQ_INDEX).count < 1:
                    return None
            except VfioError:
                return None
            fd = eventfd(True)
            try:
                vfio.set_irq_eventfds(self.fd, vfio.VFIO_PCI_REQ_IRQ_INDEX, 0, [fd])
            except BaseException:
                os.close(fd)
                raise
            self.request_fd = fd
        return self.request_fd

    def disable_msix(self) -> None:
        self._check_open()
        vfio.disable_irqs(self.fd, vfio.VFIO_PCI_MSIX_IRQ_INDEX)
        for fd in self.msix_fds:
            os.close(fd)
        self.msix_fds = []

    def trigger_msix(self, vector: int) -> None:
        """Loopback: the kernel signals the vector's eventfd as the device would."""
        self._check_open()
        vfio.trigger_irqs(self.fd, vfio.VFIO_PCI_MSIX_IRQ_INDEX, vector)

    def mask_msix(self, vector: int) -> None:
        self._check_open()
        vfio.mask_irqs(self.fd, vfio.VFIO_PCI_MSIX_IRQ_INDEX, vector)

    def unmask_msix(self, vector: int) -> None:
        self._check_open()
        vfio.unmask_irqs(self.fd, vfio.VFIO_PCI_MSIX_IRQ_INDEX, vector)
