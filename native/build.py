"""cffi build script: compiles every C file in native/ into iommu_dma._native.

`python native/build.py --asan` builds the same sources with AddressSanitizer and UBSan as
iommu_dma._native_asan, in place in iommu_dma/ (intermediate files under build/asan/);
iommu_dma.native loads it when IOMMU_DMA_NATIVE=asan (the process must preload libasan).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil

from cffi import FFI

NATIVE = pathlib.Path(__file__).resolve().parent
ROOT = NATIVE.parent
CDEF = re.compile(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", re.S)
CFLAGS = ["-Wall", "-Wextra", "-std=gnu11"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
ASAN_CFLAGS = ["-g", "-O1", "-fno-wrapv"]     # Python's -fwrapv would hide signed overflow


def _headers() -> list[pathlib.Path]:
    return sorted(NATIVE.glob("*.h"))


def _cdef_text() -> str:
    """Declarations between CDEF markers of every header: what Python may call."""
    blocks = [block for h in _headers() for block in CDEF.findall(h.read_text())]
    if not blocks:
        raise RuntimeError(f"{NATIVE}: no CDEF BEGIN/END blocks in any header")
    return "\n".join(blocks)


def make_builder(module: str = "iommu_dma._native", *, asan: bool = False) -> FFI:
    """An FFI builder of the engine as `module`; asan: sanitized, -O1 -g, absolute paths
    (cffi compiles it from inside its tmpdir; setuptools wants the relative ones)."""
    builder = FFI()
    builder.cdef(_cdef_text())
    flags = CFLAGS + (SANITIZE + ASAN_CFLAGS if asan else ["-O2"])

    def path(p: pathlib.Path) -> str:
        return str(p if asan else p.relative_to(ROOT))

    builder.set_source(
        module,
        "".join(f'#include "{h.name}"\n' for h in _headers()),
        sources=[path(p) for p in sorted(NATIVE.glob("*.c"))],
        include_dirs=[path(NATIVE)],
        extra_compile_args=flags,
        extra_link_args=SANITIZE if asan else [],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()


def build_asan() -> pathlib.Path:
    """Compile iommu_dma._native_asan into iommu_dma/ (object files in build/asan)."""
    tmp = ROOT / "build" / "asan"
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.rglob("_native_asan*.so"):  # distutils compares whole-second mtimes:
        old.unlink()                            # always rebuild
    built = pathlib.Path(make_builder("iommu_dma._native_asan", asan=True)
                         .compile(tmpdir=str(tmp), verbose=False))
    target = ROOT / "iommu_dma" / built.name
    shutil.copy2(built, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asan", action="store_true",
                    help="build iommu_dma._native_asan (ASan + UBSan) in place")
    args = ap.parse_args()
    if args.asan:
        print(f"built {build_asan().relative_to(ROOT)}")
    else:
        ffibuilder.compile(verbose=True)


if __name__ == "__main__":
    main()
