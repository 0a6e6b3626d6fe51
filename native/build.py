"""cffi build script: compiles every C file in native/ into iommu_dma._native."""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

NATIVE = pathlib.Path(__file__).resolve().parent
CDEF = re.compile(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", re.S)


def _headers() -> list[pathlib.Path]:
    return sorted(NATIVE.glob("*.h"))


def _cdef_text() -> str:
    """Declarations between CDEF markers of every header: what Python may call."""
    blocks = [block for h in _headers() for block in CDEF.findall(h.read_text())]
    if not blocks:
        raise RuntimeError(f"{NATIVE}: no CDEF BEGIN/END blocks in any header")
    return "\n".join(blocks)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "iommu_dma._native",
    "".join(f'#include "{h.name}"\n' for h in _headers()),
    sources=[str(p.relative_to(NATIVE.parent)) for p in sorted(NATIVE.glob("*.c"))],
    include_dirs=[str(NATIVE.relative_to(NATIVE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
