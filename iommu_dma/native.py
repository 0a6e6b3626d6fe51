"""The one binding to the compiled queue engine (native/, built by cffi as iommu_dma._native).

Every Python call into C goes through `ffi` and `lib` from here. With IOMMU_DMA_NATIVE=asan the
engine built with AddressSanitizer and UBSan (`make test-asan` builds it as
iommu_dma._native_asan) is used instead; the process must then preload libasan. With
IOMMU_DMA_NATIVE=sim it is the engine whose doorbells drive the simulated controller of
native/sim/ (`python native/build.py --sim` builds it as iommu_dma._native_sim; it is for the
engine-cost benchmark and its tests, never for a device).
"""

from __future__ import annotations

import os
from typing import Any

SANITIZE_ENV = "IOMMU_DMA_NATIVE"

ffi: Any
lib: Any

if os.environ.get(SANITIZE_ENV) == "asan":
    from iommu_dma._native_asan import ffi, lib  # type: ignore[import-not-found,no-redef]
elif os.environ.get(SANITIZE_ENV) == "sim":
    from iommu_dma._native_sim import ffi, lib  # type: ignore[import-not-found,no-redef]
else:
    from iommu_dma._native import ffi, lib  # type: ignore[import-not-found,no-redef]


def version() -> str:
    """Version string of the compiled engine (proves the cffi build is present)."""
    return str(ffi.string(lib.idma_version()).decode())
