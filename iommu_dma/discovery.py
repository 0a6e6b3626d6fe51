"""Find NVMe controllers (PCI class 0x0108xx) and their VFIO state through udev/sysfs."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

import pyudev

from iommu_dma.errors import IommuDmaError, NotNvmeError, UnknownDeviceError

NVME_CLASS = 0x0108        # PCI base class 01h (mass storage), subclass 08h (NVM)
VFIO_DRIVER = "vfio-pci"
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
PCI_DEVICES = Path("/sys/bus/pci/devices")
_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


@dataclass(frozen=True)
class PciInfo:
    """One PCI function and its VFIO state."""

    bdf: str
    vendor_id: int
    device_id: int
    class_code: int
    driver: str | None
    iommu_group: int | None
    group_members: tuple[tuple[str, str | None], ...]   # the OTHER devices: (bdf, driver)
    vfio_path: str | None           # /dev/vfio/N when it exists
    vfio_owner: str | None          # owner of vfio_path (user name, or uid if unnamed)

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def is_nvme(self) -> bool:
        return self.class_code >> 8 == NVME_CLASS


def normalize_bdf(bdf: str) -> str:
    """'00:09.0' or '0000:00:09.0' -> '0000:00:09.0'; ValueError-derived error otherwise."""
    m = _BDF.match(bdf.strip())
    if m is None:
        raise BadAddressError(bdf)
    domain, bus, dev, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


class BadAddressError(IommuDmaError, ValueError):
    """Not a PCI address."""

    def __init__(self, text: str) -> None:
        super().__init__(f"{text!r} is not a PCI address (expected DDDD:BB:DD.F, e.g. "
                         "0000:00:0a.0)")


def _context() -> pyudev.Context:
    return pyudev.Context()


def _hex_attr(dev: pyudev.Device, name: str) -> int:
    raw = dev.attributes.get(name)
    return int(raw.decode().strip(), 16) if raw is not None else 0


def driver_of(bdf: str) -> str | None:
    link = PCI_DEVICES / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def group_of(bdf: str) -> int | None:
    link = PCI_DEVICES / bdf / "iommu_group"
    return int(os.path.basename(os.readlink(link))) if link.is_symlink() else None


def group_devices(group: int) -> list[tuple[str, str | None]]:
    """Every device of IOMMU group `group` with its driver, in BDF order."""
    folder = IOMMU_GROUPS / str(group) / "devices"
    if not folder.is_dir():
        return []
    return [(d.name, driver_of(d.name)) for d in sorted(folder.iterdir())]


def vfio_node(group: int | None) -> tuple[str | None, str | None]:
    """(/dev/vfio/N, its owner) when the node exists."""
    if group is None:
        return None, None
    path = f"/dev/vfio/{group}"
    try:
        uid = os.stat(path).st_uid
    except FileNotFoundError:
        return None, None
    try:
        return path, pwd.getpwuid(uid).pw_name
    except KeyError:
        return path, str(uid)


def _info(dev: pyudev.Device) -> PciInfo:
    bdf = dev.sys_name
    group = group_of(bdf)
    members = tuple(m for m in group_devices(group) if m[0] != bdf) if group is not None else ()
    path, owner = vfio_node(group)
    return PciInfo(bdf, _hex_attr(dev, "vendor"), _hex_attr(dev, "device"),
                   _hex_attr(dev, "class"), dev.driver, group, members, path, owner)


def list_pci() -> list[PciInfo]:
    """Every PCI function, in BDF order."""
    devs = _context().list_devices(subsystem="pci")
    return sorted((_info(d) for d in devs), key=lambda i: i.bdf)


def list_nvme() -> list[PciInfo]:
    """Every NVMe controller (class 0x0108xx), in BDF order."""
    return [i for i in list_pci() if i.is_nvme]


def find(bdf: str, *, nvme: bool = True) -> PciInfo:
    """The device at bdf; UnknownDeviceError if absent, NotNvmeError if nvme and not NVMe."""
    bdf = normalize_bdf(bdf)
    try:
        dev = pyudev.Devices.from_sys_path(_context(), str(PCI_DEVICES / bdf))
    except pyudev.DeviceNotFoundError:
        raise UnknownDeviceError(bdf, [i.bdf for i in list_nvme()]) from None
    info = _info(dev)
    if nvme and not info.is_nvme:
        raise NotNvmeError(bdf, info.class_code)
    return info
