"""Bench configurations: which emulated NVMe controllers and namespaces a test guest gets."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

# QEMU 7.2's nvme device has no "model" property: every controller reports this model number.
QEMU_MODEL = "QEMU NVMe Ctrl"
QEMU_VENDOR_DEVICE = "1b36:0010"
BENCH_ENV = "IOMMU_DMA_BENCH"


@dataclass(frozen=True)
class NamespaceConfig:
    """One `nvme-ns`: data size in bytes, logical block size, file-backed (data kept) or null-co,
    and optional metadata: `ms` bytes per block, separate (mset=0) or extended LBAs (mset=1)."""

    size: int = 64 << 20
    lba_size: int = 4096
    # "file" keeps data; "null" is QEMU's null-co (reads zeroes, drops writes)
    backing: str = "file"
    ms: int = 0       # metadata bytes per logical block (QEMU nvme-ns `ms`)
    mset: int = 0     # 0: metadata in a separate buffer; 1: extended LBA (data+metadata inline)

    def __post_init__(self) -> None:
        if self.lba_size not in (512, 4096):
            raise ValueError(f"lba_size must be 512 or 4096, not {self.lba_size}")
        if self.backing not in ("file", "null"):
            raise ValueError(f"backing must be 'file' or 'null', not {self.backing!r}")
        if self.size <= 0 or self.size % self.lba_size:
            raise ValueError(f"size {self.size} is not a positive multiple of {self.lba_size}")
        if self.ms not in (0, 8, 16, 64):
            raise ValueError(f"ms (metadata bytes per block) must be 0, 8, 16 or 64, not {self.ms}")
        if self.mset not in (0, 1):
            raise ValueError(f"mset must be 0 (separate) or 1 (extended LBA), not {self.mset}")
        if self.mset and not self.ms:
            raise ValueError("mset=1 (extended LBA) needs metadata (ms > 0)")

    @property
    def blocks(self) -> int:
        return self.size // self.lba_size

    @property
    def image_size(self) -> int:
        """Bytes of the backing device: QEMU keeps the metadata of all blocks after the data,
        and derives the namespace size as image_size // (lba_size + ms)."""
        return self.blocks * (self.lba_size + self.ms)


@dataclass(frozen=True)
class ControllerConfig:
    """One emulated `nvme` controller. NSIDs are 1..len(namespaces) in order."""

    serial: str
    namespaces: tuple[NamespaceConfig, ...] = (NamespaceConfig(),)
    mdts: int = 7            # 0: no transfer limit
    max_ioqpairs: int = 64
    model: str = QEMU_MODEL
    # Name of an NVM subsystem (`nvme-subsys`) the controller belongs to ("" = none). In one, the
    # controller reports multi-controller support and the kernel's native multipath makes a head
    # block device under /sys/class/nvme-subsystem. Controllers naming the same one share it.
    subsystem: str = ""

    def __post_init__(self) -> None:
        if not self.namespaces:
            raise ValueError(f"controller {self.serial}: needs at least one namespace")
        if not 0 <= self.mdts <= 15:
            raise ValueError(f"controller {self.serial}: mdts must be 0..15, not {self.mdts}")
        if self.subsystem and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", self.subsystem):
            raise ValueError(f"controller {self.serial}: subsystem {self.subsystem!r} must be a "
                             "QEMU id (a letter, then letters, digits, '-' or '_'; <= 32)")
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
    # added to the guest kernel's command line after the IOMMU options
    kernel_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.aw_bits not in (39, 48):
            raise ValueError(f"aw_bits must be 39 or 48, not {self.aw_bits}")
        if not self.controllers:
            raise ValueError(f"bench {self.name}: needs at least one controller")
        if isinstance(self.kernel_args, str):
            raise ValueError("kernel_args is a tuple of options, not one string")
        for arg in self.kernel_args:
            if not arg or any(c.isspace() for c in arg) or "'" in arg or '"' in arg:
                raise ValueError(f"kernel argument {arg!r}: one option, no blanks or quotes")
        serials = [c.serial for c in self.controllers]
        if len(set(serials)) != len(serials):
            raise ValueError(f"bench {self.name}: controller serials must differ: {serials}")
        memory_bytes(self.memory)   # raises on a malformed size

    @property
    def memory_bytes(self) -> int:
        return memory_bytes(self.memory)

    @property
    def kernel_command_line(self) -> str:
        """What the guest kernel gets appended: the IOMMU options, then kernel_args."""
        return " ".join(("intel_iommu=on", "iommu=pt", *self.kernel_args))

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
        raw["kernel_args"] = tuple(raw.get("kernel_args", ()))
        return cls(controllers=ctrls, **raw)

    def qemu_args(self, image_dir: Path) -> list[str]:
        """QEMU options for the IOMMU and the NVMe devices; creates file images in image_dir."""
        args = [
            "-cpu", "max",
            "-machine", "q35,kernel-irqchip=split",
            # The IOMMU must precede the devices it translates.
            "-device", f"intel-iommu,intremap=on,aw-bits={self.aw_bits}",
        ]
        subsystems: list[str] = []
        for ci, ctrl in enumerate(self.controllers):
            ctrl_opts = (f"nvme,id=nvme{ci},serial={ctrl.serial},mdts={ctrl.mdts},"
                         f"max_ioqpairs={ctrl.max_ioqpairs}")
            if ctrl.subsystem:
                if ctrl.subsystem not in subsystems:
                    subsystems.append(ctrl.subsystem)
                    args += ["-device", f"nvme-subsys,id={ctrl.subsystem},nqn={ctrl.subsystem}"]
                ctrl_opts += f",subsys={ctrl.subsystem}"
            args += ["-device", ctrl_opts]
            for ni, ns in enumerate(ctrl.namespaces, start=1):
                node = f"c{ci}n{ni}"
                args += ["-blockdev", _blockdev(ns, node, image_dir)]
                ns_opts = (f"nvme-ns,drive={node},bus=nvme{ci},nsid={ni},"
                           f"logical_block_size={ns.lba_size},physical_block_size={ns.lba_size}")
                if ns.ms:
                    ns_opts += f",ms={ns.ms},mset={ns.mset}"
                args += ["-device", ns_opts]
        return args


def subsystem_nqn(name: str) -> str:
    """The NQN the guest sees for the bench's subsystem `name` (Identify SUBNQN, sysfs
    subsysnqn): QEMU 7.2 prefixes the nvme-subsys `nqn` property with its own."""
    return f"nqn.2019-08.org.qemu:{name}"


_MEMORY = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)


def memory_bytes(text: str) -> int:
    """QEMU-style memory size ("2G", "512M", "1024"; a bare number is MiB) in bytes."""
    m = _MEMORY.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"memory {text!r} is not a size like 2G or 512M")
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def image_path(image_dir: Path, ctrl_index: int, nsid: int) -> Path:
    """Where the backing file of controller ctrl_index, namespace nsid lives on the host."""
    return image_dir / f"c{ctrl_index}n{nsid}.img"


def _blockdev(ns: NamespaceConfig, node: str, image_dir: Path) -> str:
    if ns.backing == "null":
        return f"driver=null-co,node-name={node},size={ns.image_size},read-zeroes=on"
    ci, ni = node[1:].split("n")
    path = image_path(image_dir, int(ci), int(ni))
    with open(path, "wb") as f:
        f.truncate(ns.image_size)
    # discard=unmap: Dataset Management deallocate punches holes, so reads return zeroes
    return (f"driver=raw,node-name={node},discard=unmap,file.driver=file,"
            f"file.filename={path}")


def _file_ns(size_mib: int, lba: int, ms: int = 0, mset: int = 0) -> NamespaceConfig:
    return NamespaceConfig(size=size_mib << 20, lba_size=lba, backing="file", ms=ms, mset=mset)


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
        # Corner cases, in this order (tests index the controllers):
        # [0] no transfer limit; [1] in an NVM subsystem, so the kernel's native multipath makes
        # a head nvmeXnY under /sys/class/nvme-subsystem; [2] namespaces with 8 bytes of
        # metadata per block, nsid 1 separate (mset=0), nsid 2 extended LBAs (mset=1).
        Bench("edge", (ControllerConfig("IDMAE000", (_file_ns(64, 4096),), mdts=0, max_ioqpairs=8),
                       ControllerConfig("IDMAE001", (_file_ns(32, 4096),), max_ioqpairs=8,
                                        subsystem="idmasubsys1"),
                       ControllerConfig("IDMAE002", (_file_ns(16, 4096, ms=8, mset=0),
                                                     _file_ns(16, 4096, ms=8, mset=1)),
                                        max_ioqpairs=8)),
              aw_bits=48, kernel_args=("nvme_core.multipath=Y",)),
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
