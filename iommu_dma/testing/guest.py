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
