"""cffi build script: compiles every C file in native/ into iommu_dma._native.

`python native/build.py --asan` builds the same sources with AddressSanitizer and UBSan as
iommu_dma._native_asan, in place in iommu_dma/ (intermediate files under build/asan/);
iommu_dma.native loads it when IOMMU_DMA_NATIVE=asan (the process must preload libasan).
`python native/build.py --sim` builds iommu_dma._native_sim (intermediate files under build/sim):
the engine at the production -O2, compiled with IDMA_SIM_DEVICE so that its doorbell writes go
to the simulated controller of native/sim/ (every command completed at once, in the caller's
thread), plus that controller's API; iommu_dma.native loads it when IOMMU_DMA_NATIVE=sim.
benchmarks/engine_cost.py counts its instructions per I/O under valgrind's callgrind.
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
SIM = NATIVE / "sim"                          # simulated controller: only in the --sim build


def _headers(sim: bool = False) -> list[pathlib.Path]:
    return sorted(NATIVE.glob("*.h")) + (sorted(SIM.glob("*.h")) if sim else [])


def _sources(sim: bool = False) -> list[pathlib.Path]:
    return sorted(NATIVE.glob("*.c")) + (sorted(SIM.glob("*.c")) if sim else [])


def _cdef_text(sim: bool = False) -> str:
    """Declarations between CDEF markers of every header: what Python may call."""
    blocks = [block for h in _headers(sim) for block in CDEF.findall(h.read_text())]
    if not blocks:
        raise RuntimeError(f"{NATIVE}: no CDEF BEGIN/END blocks in any header")
    return "\n".join(blocks)


def make_builder(module: str = "iommu_dma._native", *, asan: bool = False,
                 sim: bool = False) -> FFI:
    """An FFI builder of the engine as `module`; asan: sanitized, -O1 -g; sim: with the
    simulated controller (-O2 -g, IDMA_SIM_DEVICE). Both with absolute paths (cffi compiles
    them from inside its tmpdir; setuptools wants the relative ones)."""
    builder = FFI()
    builder.cdef(_cdef_text(sim))
    flags = CFLAGS + (SANITIZE + ASAN_CFLAGS if asan else ["-O2"])
    if sim:
        flags += ["-g", "-DIDMA_SIM_DEVICE"]    # -g: names and lines for callgrind_annotate

    def path(p: pathlib.Path) -> str:
        return str(p if asan or sim else p.relative_to(ROOT))

    builder.set_source(
        module,
        "".join(f'#include "{h.relative_to(NATIVE)}"\n' for h in _headers(sim)),
        sources=[path(p) for p in _sources(sim)],
        include_dirs=[path(NATIVE)],
        extra_compile_args=flags,
        extra_link_args=SANITIZE if asan else [],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()


def _build_variant(name: str, **kwargs: bool) -> pathlib.Path:
    """Compile iommu_dma._native_<name> into iommu_dma/ (object files in build/<name>)."""
    tmp = ROOT / "build" / name
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.rglob(f"_native_{name}*.so"):    # distutils compares whole-second mtimes:
        old.unlink()                                # always rebuild
    built = pathlib.Path(make_builder(f"iommu_dma._native_{name}", **kwargs)
                         .compile(tmpdir=str(tmp), verbose=False))
    target = ROOT / "iommu_dma" / built.name
    shutil.copy2(built, target)
    return target


def build_asan() -> pathlib.Path:
    """Compile iommu_dma._native_asan into iommu_dma/ (object files in build/asan)."""
    return _build_variant("asan", asan=True)


def sim_inputs() -> list[pathlib.Path]:
    """The files iommu_dma._native_sim is built from (to tell whether a build is stale)."""
    return _headers(True) + _sources(True) + [pathlib.Path(__file__).resolve()]


def build_sim() -> pathlib.Path:
    """Compile iommu_dma._native_sim into iommu_dma/ (object files in build/sim)."""
    return _build_variant("sim", sim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asan", action="store_true",
                    help="build iommu_dma._native_asan (ASan + UBSan) in place")
    ap.add_argument("--sim", action="store_true",
                    help="build iommu_dma._native_sim (simulated controller) in place")
    args = ap.parse_args()
    if args.asan:
        print(f"built {build_asan().relative_to(ROOT)}")
    if args.sim:
        print(f"built {build_sim().relative_to(ROOT)}")
    if not (args.asan or args.sim):
        ffibuilder.compile(verbose=True)


if __name__ == "__main__":
    main()
