"""iommu-dma: user-space NVMe over Linux VFIO, with IOVA = VA DMA mapping."""

from __future__ import annotations

__version__ = "0.1.0"


def native_version() -> str:
    """Version string of the compiled native engine (proves the cffi build is present)."""
    from iommu_dma._native import ffi, lib

    return ffi.string(lib.idma_version()).decode()
