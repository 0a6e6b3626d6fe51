"""The bench guest is what its configuration says: IOMMU width, controllers, namespaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from iommu_dma.testing.bench import QEMU_VENDOR_DEVICE, Bench
from iommu_dma.testing.guest import PCI_DEVICES, driver_of

BENCHES = ["default", "aw39", "two_ctrl"]
pytestmark = [pytest.mark.iommu_dma_vm,
              pytest.mark.parametrize("idma_bench", BENCHES, indirect=True)]


def _mgaw_bits() -> int:
    # VT-d spec 11.4.2, Capability Register: MGAW (bits 21:16) is the address width minus one.
    cap = int(Path("/sys/class/iommu/dmar0/intel-iommu/cap").read_text(), 16)
    return ((cap >> 16) & 0x3F) + 1


def test_iommu_width_matches_bench(idma_bench: Bench) -> None:
    assert _mgaw_bits() == idma_bench.aw_bits


def test_controllers_match_bench(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    for bdf, ctrl in zip(idma_nvme_bdfs, idma_bench.controllers):
        dev = PCI_DEVICES / bdf
        ids = f"{(dev / 'vendor').read_text()[2:6]}:{(dev / 'device').read_text()[2:6]}"
        assert ids == QEMU_VENDOR_DEVICE
        assert (dev / "iommu_group").exists(), f"{bdf} has no IOMMU group"
        assert driver_of(bdf) == "nvme"
        nvme = next((dev / "nvme").iterdir())
        assert (nvme / "serial").read_text().strip() == ctrl.serial
        assert (nvme / "model").read_text().strip() == ctrl.model
        sizes = sorted(
            (int(ns.name.rsplit("n", 1)[1]), int((ns / "size").read_text()) * 512,
             int((ns / "queue" / "logical_block_size").read_text()))
            for ns in nvme.glob(f"{nvme.name}n*")
        )
        assert sizes == [(i, ns.size, ns.lba_size) for i, ns in enumerate(ctrl.namespaces, 1)]
