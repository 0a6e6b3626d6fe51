"""`list`, `bind`, `unbind`: which controllers exist, and who drives them."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import iommu_dma
from iommu_dma.cli import output
from iommu_dma.cli.common import PROG, CliError, add_output_format, cli_hints, set_handler
from iommu_dma.discovery import PCI_DEVICES, VFIO_DRIVER, PciInfo, list_nvme, normalize_bdf
from iommu_dma.errors import IommuDmaError

SETUP_SCRIPT = Path(iommu_dma.__file__).resolve().parent / "data" / "setup_vfio.sh"
SECTOR = 512                                   # sysfs block `size` is in 512-byte sectors
_NS_DIR = re.compile(r"^nvme\d+(?:c\d+)?n(\d+)$")


@dataclass
class NamespaceInfo:
    nsid: int
    blocks: int
    lba_size: int
    block_device: str | None = None

    @property
    def size(self) -> int:
        return self.blocks * self.lba_size


@dataclass
class ControllerInfo:
    bdf: str
    driver: str | None
    iommu_group: int | None
    serial: str = ""
    model: str = ""
    firmware: str = ""
    namespaces: list[NamespaceInfo] = field(default_factory=list)
    error: str | None = None
    # the IOMMU backend we opened it through ("container" or "iommufd"; None: kernel driver)
    iommu_backend: str | None = None

    @property
    def capacity(self) -> int:
        return sum(ns.size for ns in self.namespaces)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for ns, nsd in zip(self.namespaces, d["namespaces"]):
            nsd["size"] = ns.size
        d["capacity"] = self.capacity
        return d


# ---- list -----------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _kernel_namespaces(ctrl_dir: Path) -> list[NamespaceInfo]:
    """Namespaces of an nvme-bound controller from sysfs (head or per-path disk nodes)."""
    found: dict[int, NamespaceInfo] = {}
    for d in sorted(ctrl_dir.glob("nvme*n*")):
        m = _NS_DIR.match(d.name)
        if m is None or int(m.group(1)) in found:
            continue
        lba = int(_read(d / "queue" / "logical_block_size") or SECTOR)
        sectors = int(_read(d / "size") or 0)
        dev = f"/dev/{d.name}" if Path(f"/dev/{d.name}").exists() else None
        found[int(m.group(1))] = NamespaceInfo(int(m.group(1)), sectors * SECTOR // lba, lba, dev)
    return [found[k] for k in sorted(found)]


def from_kernel(info: PciInfo) -> ControllerInfo:
    c = ControllerInfo(info.bdf, info.driver, info.iommu_group)
    ctrl_dirs = sorted((PCI_DEVICES / info.bdf / "nvme").glob("nvme*"))
    if not ctrl_dirs:
        c.error = "no nvme controller node in sysfs (yet)"
        return c
    d = ctrl_dirs[0]
    c.serial, c.model, c.firmware = (_read(d / n) for n in ("serial", "model", "firmware_rev"))
    c.namespaces = _kernel_namespaces(d)
    return c


def from_vfio(info: PciInfo) -> ControllerInfo:
    from iommu_dma.nvme.controller import Controller

    c = ControllerInfo(info.bdf, info.driver, info.iommu_group)
    try:
        with Controller.open(info.bdf) as ctrl:
            c.iommu_backend = ctrl.container.backend_name
            idc = ctrl.identify
            c.serial, c.model, c.firmware = idc.sn, idc.mn, idc.fr
            for nsid in ctrl.active_namespaces():
                idn = ctrl.identify_namespace(nsid)
                c.namespaces.append(NamespaceInfo(nsid, idn.nsze, idn.lba_size))
    except IommuDmaError as e:
        c.error = cli_hints(str(e))
    return c


def collect() -> list[ControllerInfo]:
    out = []
    for info in list_nvme():
        if info.driver == "nvme":
            out.append(from_kernel(info))
        elif info.driver == VFIO_DRIVER:
            out.append(from_vfio(info))
        else:
            out.append(ControllerInfo(info.bdf, info.driver, info.iommu_group,
                                      error="not bound to nvme or vfio-pci"))
    return out


def list_row(c: ControllerInfo) -> list[str]:
    nss = ",".join(str(ns.nsid) for ns in c.namespaces) or "-"
    return [c.bdf, c.driver or "-", "-" if c.iommu_group is None else str(c.iommu_group),
            c.iommu_backend or "-", c.serial or "-", c.model or "-", nss,
            output.human_bytes(c.capacity) if c.namespaces else "-"]


LIST_HEADERS = ("BDF", "Driver", "Group", "Backend", "Serial", "Model", "Namespaces", "Capacity")


def list_lines(ctrls: list[ControllerInfo]) -> list[str]:
    if not ctrls:
        return ["no NVMe controller found"]
    lines = output.table(LIST_HEADERS, [list_row(c) for c in ctrls])
    lines += [f"{c.bdf}: {c.error}" for c in ctrls if c.error]
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    ctrls = collect()
    if args.output_format == "json":
        output.emit_json({"controllers": [c.to_dict() for c in ctrls]})
    else:
        output.print_lines(list_lines(ctrls))
    return 0


# ---- bind / unbind ----------------------------------------------------------------------------

def setup_command(action: str, args: argparse.Namespace) -> list[str]:
    cmd = ["bash", str(SETUP_SCRIPT)]
    if args.force:
        cmd.append("--force")
    if args.user:
        cmd += ["--user", args.user]
    return cmd + [action, *(normalize_bdf(b) for b in args.bdfs)]


def script_text(text: str) -> str:
    """The setup script's messages as the CLI's: `setup_vfio.sh: ...` -> `iommu-dma: ...`,
    and its hints (`setup_vfio.sh bind`, `setup_vfio.sh status`) as iommu-dma commands."""
    name = SETUP_SCRIPT.name
    text = text.replace(f"{name} status", f"{PROG} list")
    return text.replace(f"{name}: ", f"{PROG}: ").replace(f"{name} ", f"{PROG} ")


def run_setup(action: str, args: argparse.Namespace) -> int:
    if not SETUP_SCRIPT.is_file():
        raise CliError(f"{SETUP_SCRIPT} is missing: the iommu-dma installation is incomplete; "
                       "reinstall the package")
    proc = subprocess.run(setup_command(action, args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    sys.stdout.write(script_text(proc.stdout))
    sys.stdout.flush()
    sys.stderr.write(script_text(proc.stderr))
    return proc.returncode


def cmd_bind(args: argparse.Namespace) -> int:
    return run_setup("bind", args)


def cmd_unbind(args: argparse.Namespace) -> int:
    return run_setup("unbind", args)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("list", parents=[common], help="NVMe controllers, drivers, namespaces",
                       description="List NVMe controllers: on the kernel nvme driver (read "
                                   "from sysfs) or on vfio-pci (opened and identified; Backend: "
                                   "the IOMMU interface used, container or iommufd).")
    add_output_format(p)
    set_handler(p, cmd_list)
    for name, func, what in (("bind", cmd_bind, "bind controllers to vfio-pci"),
                             ("unbind", cmd_unbind, "give controllers back to the nvme driver")):
        p = sub.add_parser(name, parents=[common], help=what,
                           description=f"{what[0].upper()}{what[1:]} (runs the "
                                       f"setup_vfio.sh shipped in the package: {name}; needs "
                                       "root). Without a BDF: every NVMe controller that "
                                       "qualifies.")
        p.add_argument("bdfs", nargs="*", metavar="BDF", help="PCI address, e.g. 0000:00:04.0")
        p.add_argument("--user", metavar="NAME", help="give NAME the /dev/vfio/N nodes")
        p.add_argument("--force", action="store_true",
                       help="bind a controller in use / unbind one whose vfio node is open")
        set_handler(p, func)
