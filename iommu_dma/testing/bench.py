"""Bench configurations: which emulated NVMe controllers and namespaces a test guest gets."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# QEMU 7.2's nvme device has no "model" property: every controller reports this model number.
QEMU_MODEL = "QEMU NVMe Ctrl"
QEMU_VENDOR_DEVICE = "1b36:0010"
BENCH_ENV = "IOMMU_DMA_BENCH"


@dataclass(frozen=True)
class NamespaceConfig:
    """One `nvme-ns`: size in bytes, logical block size, file-backed (data kept) or null-co."""

    size: int = 64 << 20
    lba_size: int = 4096
    # "file" keeps data; "null" is QEMU's null-co (reads zeroes, drops writes)
    backing: str = "file"

    def __post_init__(self) -> None:
        if self.lba_size not in (512, 4096):
            raise ValueError(f"lba_size must be 512 or 4096, not {self.lba_size}")
        if self.backing not in ("file", "null"):
            raise ValueError(f"backing must be 'file' or 'null', not {self.backing!r}")
        if self.size <= 0 or self.size % self.lba_size:
            raise ValueError(f"size {self.size} is not a positive multiple of {self.lba_size}")

    @property
    def blocks(self) -> int:
        return self.size // self.lba_size


@dataclass(frozen=True)
class ControllerConfig:
    """One emulated `nvme` controller. NSIDs are 1..len(namespaces) in order."""

    serial: str
    namespaces: tuple[NamespaceConfig, ...] = (NamespaceConfig(),)
    mdts: int = 7
    max_ioqpairs: int = 64
    model: str = QEMU_MODEL

    def __post_init__(self) -> None:
        if not self.namespaces:
            raise ValueError(f"controller {self.serial}: needs at least one namespace")
        if self.model != QEMU_MODEL:
            raise ValueError(f"QEMU 7.2 cannot set the model number; it is always {QEMU_MODEL!r}")
        if not 1 <= len(self.serial) <= 20:
            raise ValueError(f"serial {self.serial!r} must be 1..20 characters (Identify SN)")


@dataclass(frozen=True)
class Bench:
    """A guest: an emulated Intel IOMMU of aw_bits width and 1..N NVMe controllers."""

    name: str
    controllers: tuple[ControllerConfig, ...]
    aw_bits: int = 48
    memory: str = "2G"
    cpus: int = 2

    def __post_init__(self) -> None:
        if self.aw_bits not in (39, 48):
            raise ValueError(f"aw_bits must be 39 or 48, not {self.aw_bits}")
        if not self.controllers:
            raise ValueError(f"bench {self.name}: needs at least one controller")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Bench:
        raw = json.loads(text)
        ctrls = tuple(
            ControllerConfig(**{**c, "namespaces": tuple(NamespaceConfig(**n)
                                                         for n in c["namespaces"])})
            for c in raw.pop("controllers")
        )
        return cls(controllers=ctrls, **raw)

    def qemu_args(self, image_dir: Path) -> list[str]:
        """QEMU options for the IOMMU and the NVMe devices; creates file images in image_dir."""
        args = [
            "-cpu", "max",
            "-machine", "q35,kernel-irqchip=split",
            # The IOMMU must precede the devices it translates.
            "-device", f"intel-iommu,intremap=on,aw-bits={self.aw_bits}",
        ]
        for ci, ctrl in enumerate(self.controllers):
            args += ["-device", f"nvme,id=nvme{ci},serial={ctrl.serial},mdts={ctrl.mdts},"
                     f"max_ioqpairs={ctrl.max_ioqpairs}"]
            for ni, ns in enumerate(ctrl.namespaces, start=1):
                node = f"c{ci}n{ni}"
                args += ["-blockdev", _blockdev(ns, node, image_dir)]
                args += ["-device", f"nvme-ns,drive={node},bus=nvme{ci},nsid={ni},"
                         f"logical_block_size={ns.lba_size},physical_block_size={ns.lba_size}"]
        return args


def image_path(image_dir: Path, ctrl_index: int, nsid: int) -> Path:
    """Where the backing file of controller ctrl_index, namespace nsid lives on the host."""
    return image_dir / f"c{ctrl_index}n{nsid}.img"


def _blockdev(ns: NamespaceConfig, node: str, image_dir: Path) -> str:
    if ns.backing == "null":
        return f"driver=null-co,node-name={node},size={ns.size},read-zeroes=on"
    ci, ni = node[1:].split("n")
    path = image_path(image_dir, int(ci), int(ni))
    with open(path, "wb") as f:
        f.truncate(ns.size)
    # discard=unmap: Dataset Management deallocate punches holes, so reads return zeroes
    return (f"driver=raw,node-name={node},discard=unmap,file.driver=file,"
            f"file.filename={path}")


def _file_ns(size_mib: int, lba: int) -> NamespaceConfig:
    return NamespaceConfig(size=size_mib << 20, lba_size=lba, backing="file")


# The configurations tests ask for by name. "default" is what `make demo` boots.
BENCHES: dict[str, Bench] = {
    b.name: b
    for b in (
        Bench("default", (ControllerConfig("IDMA0001", (_file_ns(64, 4096), _file_ns(32, 512)),
                                           mdts=5, max_ioqpairs=8),)),
        Bench("aw39", (ControllerConfig("IDMA3901", (_file_ns(64, 4096), _file_ns(32, 512)),
                                        mdts=5, max_ioqpairs=8),), aw_bits=39),
        Bench("two_ctrl", (ControllerConfig("IDMAA001", (_file_ns(32, 4096),), mdts=5),
                           ControllerConfig("IDMAB002", (_file_ns(32, 512),), mdts=6))),
        Bench("perf", (ControllerConfig("IDMAPERF", (NamespaceConfig(1 << 30, 4096, "null"),)),)),
    )
}


def get_bench(name: str) -> Bench:
    try:
        return BENCHES[name]
    except KeyError:
        raise KeyError(f"unknown bench {name!r}; known: {', '.join(sorted(BENCHES))}") from None


def current_bench() -> Bench | None:
    """Inside a bench guest: the configuration it was booted with (None on the host)."""
    path = os.environ.get(BENCH_ENV)
    if not path:
        return None
    return Bench.from_json(Path(path).read_text())
