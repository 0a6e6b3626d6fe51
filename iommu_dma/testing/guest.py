"""Helpers for code running inside a bench guest."""

from __future__ import annotations

from pathlib import Path

PCI_DEVICES = Path("/sys/bus/pci/devices")
NVME_CLASS_PREFIX = "0x0108"  # mass storage / non-volatile memory controller


def nvme_bdfs() -> list[str]:
    """BDFs of the guest's NVMe controllers in PCI order: the bench's controllers in order."""
    return sorted(
        d.name for d in PCI_DEVICES.iterdir()
        if (d / "class").read_text().startswith(NVME_CLASS_PREFIX)
    )


def driver_of(bdf: str) -> str | None:
    link = PCI_DEVICES / bdf / "driver"
    return link.resolve().name if link.exists() else None


NVME_SUBSYSTEMS = Path("/sys/class/nvme-subsystem")


def nvme_ctrl_name(bdf: str) -> str:
    """The kernel's name of the controller at bdf (nvme3) while it is on the nvme driver."""
    names = [p.name for p in (PCI_DEVICES / bdf / "nvme").iterdir()]
    if len(names) != 1:
        raise LookupError(f"{bdf}: expected one nvme controller under it, saw {names}")
    return names[0]


def nvme_subsystem(bdf: str) -> Path | None:
    """/sys/class/nvme-subsystem/nvme-subsysN the controller at bdf belongs to."""
    ctrl = nvme_ctrl_name(bdf)
    for subsys in sorted(NVME_SUBSYSTEMS.glob("nvme-subsys*")):
        if (subsys / ctrl).exists():
            return subsys
    return None


def multipath_heads(bdf: str) -> list[Path]:
    """Native-multipath head block devices (sysfs dirs nvmeXnY under the subsystem) the
    controller at bdf is a path of; empty when the kernel made none."""
    subsys = nvme_subsystem(bdf)
    if subsys is None:
        return []
    return sorted(h for h in subsys.glob("nvme*n*") if (h / "dev").exists())
