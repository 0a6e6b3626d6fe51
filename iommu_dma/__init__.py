"""iommu-dma: user-space NVMe over Linux VFIO, with IOVA = VA DMA mapping.

    from iommu_dma import Controller, Namespace, Container, DmaAllocator, DmaBuffer
    from iommu_dma import IommuDmaError, NvmeError, ClosedError
"""

from __future__ import annotations

from iommu_dma.container import Container
from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.memory import DmaAllocator, DmaBuffer
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.namespace import Namespace, Request
from iommu_dma.nvme.status import (
    ControllerFailedError,
    ControllerFatalError,
    ControllerResetError,
    DeviceGoneError,
    NvmeError,
    NvmeTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "Container",
    "Controller",
    "ControllerFailedError",
    "ControllerFatalError",
    "ControllerResetError",
    "DeviceGoneError",
    "DmaAllocator",
    "DmaBuffer",
    "IommuDmaError",
    "Namespace",
    "NvmeError",
    "NvmeTimeoutError",
    "Request",
    "native_version",
]


def native_version() -> str:
    """Version string of the compiled native engine (proves the cffi build is present)."""
    from iommu_dma.native import version

    return version()
