"""Bench configurations: which emulated NVMe controllers and namespaces a test guest gets.

Fault injection (see also iommu_dma.testing.qmp):

- `NamespaceConfig.read_errors` / `write_errors`: LBAs at which QEMU's blkdebug fails every
  read / write with EIO. QEMU's nvme completes such a command with Unrecovered Read Error
  (SCT 2h, SC 81h) / Write Fault (SCT 2h, SC 80h). The namespace is built as
  raw -> blkdebug -> file (blkdebug raises its read_aio/write_aio events only below a format
  driver); the image file stays at image_path(), so tests can still compare with it.
- `NamespaceConfig.stallable`: the same raw -> blkdebug -> file stack without error rules, so
  `Qmp.stall()` can set a blkdebug breakpoint that suspends the next request.
- `ControllerConfig.hotplug`: the controller sits behind its own pcie-root-port (devices on
  q35's pcie.0 cannot be hot-unplugged), so QMP `device_del nvme{ci}` removes it. Hotplug
  controllers come after all others (the guest enumerates them on buses 01+, after bus 00).
- Every nvme-ns device has the qdev id `c{ci}n{nsid}dev` (block_set_io_throttle id=...).
- QEMU monitors: every bench has a QMP unix socket on the host, `qmp_socket_path(work_dir)`;
  a bench with fault injection (`Bench.fault_injection`) also has a second QMP monitor the
  guest reaches through the virtio-serial port `GUEST_QMP_PORT` (see qmp.py).
"""

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
# the virtio-serial port through which a guest reaches its QEMU's second QMP monitor
GUEST_QMP_PORT = "org.iommu-dma.qmp"
QMP_ENV = "IOMMU_DMA_QMP"                # in such a guest: the port's name
HOST_QMP_SOCKET = "qmp.sock"             # in the work directory
_GUEST_QMP_SOCKET = "guest-qmp.sock"     # internal: joins the guest's monitor to its port


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
    # Fault injection (file backing only): LBAs whose reads / writes fail with EIO (QEMU's
    # nvme: Unrecovered Read Error / Write Fault), and whether the monitor can stall requests.
    read_errors: tuple[int, ...] = ()
    write_errors: tuple[int, ...] = ()
    stallable: bool = False
    # End-to-end protection (QEMU nvme-ns `pi`, `pil`): 0 none, 1..3 the PI type; needs ms >= 8.
    # pil=0: the 8-byte PI is the last bytes of the metadata, 1: the first.
    pi: int = 0
    pil: int = 0
    # Zoned Namespace Command Set (QEMU nvme-ns `zoned=on`): zone size and capacity in bytes
    # (capacity 0 = the zone size), open / active zone limits (0 = no limit).
    zoned: bool = False
    zone_size: int = 1 << 20
    zone_capacity: int = 0
    max_open: int = 0
    max_active: int = 0
    # Not attached to any controller at boot (QEMU nvme-ns `detached=on`): Namespace Attachment
    # attaches it. Needs the controller to be in an NVM subsystem.
    detached: bool = False

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
        if not isinstance(self.stallable, bool):
            raise ValueError(f"stallable must be True or False, not {self.stallable!r}")
        for field in ("read_errors", "write_errors"):
            lbas = getattr(self, field)
            if not isinstance(lbas, tuple):
                raise ValueError(f"{field} must be a tuple of LBAs, not {lbas!r}")
            for lba in lbas:
                if isinstance(lba, bool) or not isinstance(lba, int):
                    raise ValueError(f"{field}: LBA {lba!r} is not an integer")
                if not 0 <= lba < self.blocks:
                    raise ValueError(f"{field}: LBA {lba} is outside the namespace "
                                     f"(0..{self.blocks - 1})")
            if len(set(lbas)) != len(lbas):
                raise ValueError(f"{field}: LBAs repeat: {lbas}")
        self._check_pi()
        self._check_zoned()
        if self.fault_injection and self.backing != "file":
            raise ValueError("read_errors, write_errors and stallable need backing='file' "
                             "(QEMU's blkdebug sits between the raw format and the image file)")

    def _check_pi(self) -> None:
        if self.pi not in (0, 1, 2, 3):
            raise ValueError(f"pi must be 0 (none) or a PI type 1..3, not {self.pi!r}")
        if self.pil not in (0, 1):
            raise ValueError(f"pil must be 0 (PI last in the metadata) or 1 (first), "
                             f"not {self.pil!r}")
        if self.pi and self.ms < 8:
            raise ValueError(f"pi={self.pi} needs at least 8 bytes of metadata (ms >= 8)")

    def _check_zoned(self) -> None:
        if not isinstance(self.zoned, bool) or not isinstance(self.detached, bool):
            raise ValueError("zoned and detached must be True or False")
        if not self.zoned:
            return
        if self.ms:
            raise ValueError("a zoned bench namespace cannot also have metadata (ms)")
        if self.zone_size <= 0 or self.zone_size % self.lba_size or self.size % self.zone_size:
            raise ValueError(f"zone_size {self.zone_size} must be a positive multiple of the "
                             f"block size that divides the namespace size {self.size}")
        if not 0 <= self.zone_capacity <= self.zone_size or self.zone_capacity % self.lba_size:
            raise ValueError(f"zone_capacity {self.zone_capacity} must be 0 or a multiple of "
                             f"{self.lba_size} no larger than zone_size {self.zone_size}")
        if self.max_open < 0 or self.max_active < 0:
            raise ValueError("max_open and max_active must be >= 0")

    @property
    def zones(self) -> int:
        """Zones of a zoned namespace (0 otherwise)."""
        return self.size // self.zone_size if self.zoned else 0

    @property
    def fault_injection(self) -> bool:
        """True when the namespace is built over blkdebug (errors or stallable)."""
        return bool(self.read_errors or self.write_errors or self.stallable)

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
    # behind its own pcie-root-port, so that QMP device_del can hot-unplug it
    hotplug: bool = False

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
        if not isinstance(self.hotplug, bool):
            raise ValueError(f"controller {self.serial}: hotplug must be True or False, "
                             f"not {self.hotplug!r}")
        if any(ns.detached for ns in self.namespaces) and not self.subsystem:
            raise ValueError(f"controller {self.serial}: a detached namespace needs the "
                             "controller in an NVM subsystem (subsystem=...)")


KERNELS = ("host", "bench")
IOMMUS = ("intel", "virtio")
# Without interrupt remapping (virtio-iommu) VFIO attaches only with these, per backend.
UNSAFE_INTERRUPT_ARGS = ("iommufd.allow_unsafe_interrupts=1",
                         "vfio_iommu_type1.allow_unsafe_interrupts=1")


@dataclass(frozen=True)
class Bench:
    """A guest: an emulated IOMMU (Intel of aw_bits width, or virtio-iommu) and 1..N NVMe
    controllers, booted on a kernel: "host" (the host's Debian kernel, no iommufd) or "bench"
    (the kernel `make bench-kernel` builds: iommufd, VFIO cdev, virtio-iommu)."""

    name: str
    controllers: tuple[ControllerConfig, ...]
    aw_bits: int = 48
    memory: str = "2G"
    cpus: int = 2
    # added to the guest kernel's command line after the IOMMU options
    kernel_args: tuple[str, ...] = ()
    kernel: str = "host"
    iommu: str = "intel"
    # boot with UNSAFE_INTERRUPT_ARGS (VFIO attaches without interrupt remapping)
    unsafe_interrupts: bool = False

    def __post_init__(self) -> None:
        if self.aw_bits not in (39, 48):
            raise ValueError(f"aw_bits must be 39 or 48, not {self.aw_bits}")
        if self.kernel not in KERNELS:
            raise ValueError(f"bench {self.name}: kernel must be 'host' (the host's kernel) or "
                             f"'bench' (built by `make bench-kernel`), not {self.kernel!r}")
        if self.iommu not in IOMMUS:
            raise ValueError(f"bench {self.name}: iommu must be 'intel' or 'virtio', "
                             f"not {self.iommu!r}")
        if self.iommu == "virtio" and self.kernel != "bench":
            raise ValueError(f"bench {self.name}: virtio-iommu needs kernel='bench' (Debian's "
                             "kernels lack CONFIG_VIRTIO_IOMMU)")
        if not isinstance(self.unsafe_interrupts, bool):
            raise ValueError(f"bench {self.name}: unsafe_interrupts must be True or False")
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
        hotplug = [c.hotplug for c in self.controllers]
        if hotplug != sorted(hotplug):
            raise ValueError(f"bench {self.name}: hotplug controllers must come after all others "
                             "(the guest enumerates them on buses 01+, so PCI order, which "
                             "tests index, would no longer be bench order)")

    @property
    def fault_injection(self) -> bool:
        """Any namespace over blkdebug or any hotplug controller: the guest gets a monitor."""
        return any(c.hotplug or any(n.fault_injection for n in c.namespaces)
                   for c in self.controllers)

    @property
    def memory_bytes(self) -> int:
        return memory_bytes(self.memory)

    @property
    def kernel_command_line(self) -> str:
        """What the guest kernel gets appended: the IOMMU options, the unsafe-interrupt
        parameters when asked for, then kernel_args."""
        iommu = ("intel_iommu=on", "iommu=pt") if self.iommu == "intel" else ("iommu=pt",)
        unsafe = UNSAFE_INTERRUPT_ARGS if self.unsafe_interrupts else ()
        return " ".join((*iommu, *unsafe, *self.kernel_args))

    @property
    def iommu_text(self) -> str:
        """The IOMMU, said for people: "Intel IOMMU aw-bits=48" or "virtio-iommu"."""
        return f"Intel IOMMU aw-bits={self.aw_bits}" if self.iommu == "intel" else "virtio-iommu"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Bench:
        raw = json.loads(text)
        ctrls = tuple(
            ControllerConfig(**{**c, "namespaces": tuple(_namespace_from_dict(n)
                                                         for n in c["namespaces"])})
            for c in raw.pop("controllers")
        )
        raw["kernel_args"] = tuple(raw.get("kernel_args", ()))
        return cls(controllers=ctrls, **raw)

    def qemu_args(self, image_dir: Path) -> list[str]:
        """QEMU options for the IOMMU and the NVMe devices; creates file images in image_dir."""
        iommu = (f"intel-iommu,intremap=on,aw-bits={self.aw_bits}" if self.iommu == "intel"
                 else "virtio-iommu-pci")         # no interrupt remapping
        args = [
            "-cpu", "max",
            "-machine", "q35,kernel-irqchip=split",
            # The IOMMU must precede the devices it translates.
            "-device", iommu,
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
            if ctrl.hotplug:
                # its own root port (hot-pluggable slot); the controller is bus 01+ in the guest
                args += ["-device", f"pcie-root-port,id={root_port_id(ci)},chassis={ci + 1},"
                                    "slot=0"]
                ctrl_opts += f",bus={root_port_id(ci)}"
            args += ["-device", ctrl_opts]
            for ni, ns in enumerate(ctrl.namespaces, start=1):
                node = node_name(ci, ni)
                args += ["-blockdev", _blockdev(ns, node, image_dir)]
                ns_opts = (f"nvme-ns,id={ns_device_id(ci, ni)},drive={node},bus=nvme{ci},"
                           f"nsid={ni},logical_block_size={ns.lba_size},"
                           f"physical_block_size={ns.lba_size}")
                args += ["-device", ns_opts + _ns_extra_opts(ns)]
        args += monitor_args(image_dir, guest=self.fault_injection)
        return args


def _ns_extra_opts(ns: NamespaceConfig) -> str:
    """nvme-ns options for metadata, protection, zones and attachment."""
    opts = ""
    if ns.ms:
        opts += f",ms={ns.ms},mset={ns.mset}"
    if ns.pi:
        opts += f",pi={ns.pi},pil={ns.pil}"
    if ns.zoned:
        opts += (f",zoned=on,zoned.zone_size={ns.zone_size},"
                 f"zoned.zone_capacity={ns.zone_capacity},zoned.max_open={ns.max_open},"
                 f"zoned.max_active={ns.max_active}")
    if ns.detached:
        opts += ",detached=on"
    return opts


def node_name(ctrl_index: int, nsid: int) -> str:
    """Block node name of a namespace's raw format node (HMP qemu-io, query-named-block-nodes)."""
    return f"c{ctrl_index}n{nsid}"


def ns_device_id(ctrl_index: int, nsid: int) -> str:
    """qdev id of a namespace's nvme-ns device (block_set_io_throttle id=...)."""
    return f"c{ctrl_index}n{nsid}dev"


def controller_id(ctrl_index: int) -> str:
    """qdev id of controller ctrl_index's nvme device (device_del id=...)."""
    return f"nvme{ctrl_index}"


def root_port_id(ctrl_index: int) -> str:
    return f"idma_rp{ctrl_index}"


def qmp_socket_path(work_dir: Path) -> Path:
    """The host-side QMP unix socket of the guest booted with this work directory."""
    return work_dir / HOST_QMP_SOCKET


def monitor_args(work_dir: Path, *, guest: bool) -> list[str]:
    """QMP on a host unix socket; with guest=True also a QMP monitor on the virtio-serial port
    GUEST_QMP_PORT. QEMU joins the two itself: the monitor listens on an internal unix socket
    and the port's chardev connects to it when QEMU starts (before the guest runs), so the
    guest reads and writes a plain QMP stream on /dev/vportNpM (see qmp.find_guest_port)."""
    host = qmp_socket_path(work_dir)
    args = ["-chardev", f"socket,id=idma_qmp,path={host},server=on,wait=off",
            "-mon", "chardev=idma_qmp,mode=control"]
    if guest:
        inner = work_dir / _GUEST_QMP_SOCKET
        args += ["-chardev", f"socket,id=idma_gqmp,path={inner},server=on,wait=off",
                 "-mon", "chardev=idma_gqmp,mode=control",
                 "-chardev", f"socket,id=idma_gport,path={inner}",
                 "-device", "virtio-serial-pci,id=idma_vser",
                 "-device", f"virtserialport,bus=idma_vser.0,chardev=idma_gport,"
                            f"name={GUEST_QMP_PORT}"]
    return args


def blkdebug_config(ns: NamespaceConfig) -> str:
    """blkdebug rules for ns: one [inject-error] per failing LBA, in 512-byte sectors."""
    sections = []
    for event, iotype, lbas in (("read_aio", "read", ns.read_errors),
                                ("write_aio", "write", ns.write_errors)):
        for lba in lbas:
            # iotype: a rule activated by one kind of event must not fail the other kind
            sections.append(f'[inject-error]\nevent = "{event}"\niotype = "{iotype}"\n'
                            f'errno = "5"\nsector = "{lba * ns.lba_size // 512}"\n'
                            'once = "off"\n')
    return "\n".join(sections)


def blkdebug_config_path(image_dir: Path, ctrl_index: int, nsid: int) -> Path:
    return image_dir / f"c{ctrl_index}n{nsid}.blkdebug"


def _namespace_from_dict(raw: dict) -> NamespaceConfig:
    fields = dict(raw)
    for key in ("read_errors", "write_errors"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return NamespaceConfig(**fields)


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
    if not ns.fault_injection:
        return (f"driver=raw,node-name={node},discard=unmap,file.driver=file,"
                f"file.filename={path}")
    conf = blkdebug_config_path(image_dir, int(ci), int(ni))
    conf.write_text(blkdebug_config(ns))
    # raw above blkdebug: only a format driver raises the read_aio/write_aio events
    return (f"driver=raw,node-name={node},discard=unmap,file.driver=blkdebug,"
            f"file.config={conf},file.image.driver=file,file.image.filename={path}")


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
        # Fault injection (tests index the controllers): [0] ns1 fails reads of LBAs 1000,
        # 5000, 12000 and writes of LBA 3000, ns1 and ns2 can be stalled from the monitor;
        # [1] behind a pcie-root-port, so it can be hot-unplugged (device_del nvme1).
        Bench("faults", (
            ControllerConfig("IDMAF000", (
                NamespaceConfig(64 << 20, 4096, "file", read_errors=(1000, 5000, 12000),
                                write_errors=(3000,), stallable=True),
                NamespaceConfig(32 << 20, 4096, "file", stallable=True)),
                mdts=5, max_ioqpairs=8),
            ControllerConfig("IDMAF001", (_file_ns(32, 4096),), hotplug=True))),
        # Commands test engineers script (tests index the controllers and namespaces):
        # [0] nsid 1 zoned (16 zones of 1 MiB, capacity 768 KiB, at most 4 open / 6 active),
        #     nsid 2 plain; [1] protection information: nsid 1 PI type 1 (8 bytes of metadata,
        #     separate buffer), nsid 2 PI type 3 (16 bytes, extended LBA, PI first),
        #     nsid 3 PI type 2 with 512-byte blocks; [2] in an NVM subsystem: nsid 1 attached,
        #     nsid 2 detached (Namespace Attachment tests).
        Bench("cmds", (
            ControllerConfig("IDMAC000", (
                NamespaceConfig(16 << 20, 4096, "file", zoned=True, zone_size=1 << 20,
                                zone_capacity=768 << 10, max_open=4, max_active=6),
                _file_ns(16, 4096)), mdts=5, max_ioqpairs=8),
            ControllerConfig("IDMAC001", (
                NamespaceConfig(16 << 20, 4096, "file", ms=8, mset=0, pi=1),
                NamespaceConfig(16 << 20, 4096, "file", ms=16, mset=1, pi=3, pil=1),
                NamespaceConfig(8 << 20, 512, "file", ms=8, mset=0, pi=2)),
                mdts=5, max_ioqpairs=8),
            ControllerConfig("IDMAC002", (
                _file_ns(16, 4096), NamespaceConfig(16 << 20, 4096, "file", detached=True)),
                mdts=5, max_ioqpairs=8, subsystem="idmacmds"))),
        # On the bench kernel (`make bench-kernel`: iommufd, VFIO cdev, virtio-iommu): one
        # controller with two namespaces behind intel-iommu aw-bits 48 and 39, and behind
        # virtio-iommu (no interrupt remapping: booted with the unsafe-interrupt parameters).
        Bench("iommufd", (ControllerConfig("IDMAI001", (_file_ns(64, 4096), _file_ns(32, 512)),
                                           mdts=5, max_ioqpairs=8),), kernel="bench"),
        Bench("iommufd39", (ControllerConfig("IDMAI391", (_file_ns(64, 4096),
                                                          _file_ns(32, 512)),
                                             mdts=5, max_ioqpairs=8),),
              aw_bits=39, kernel="bench"),
        Bench("virtio", (ControllerConfig("IDMAV001", (_file_ns(64, 4096), _file_ns(32, 512)),
                                          mdts=5, max_ioqpairs=8),),
              kernel="bench", iommu="virtio", unsafe_interrupts=True),
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
