"""The bench guest is what its configuration says: IOMMU width, controllers, namespaces."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from iommu_dma.testing.bench import (
    QEMU_VENDOR_DEVICE,
    Bench,
    NamespaceConfig,
    image_path,
    subsystem_nqn,
)
from iommu_dma.testing.guest import (
    PCI_DEVICES,
    driver_of,
    multipath_heads,
    nvme_ctrl_name,
    nvme_subsystem,
)

BENCHES = ["default", "aw39", "two_ctrl", "edge", "faults"]
pytestmark = pytest.mark.iommu_dma_vm
every_bench = pytest.mark.parametrize("idma_bench", BENCHES, indirect=True)
edge = pytest.mark.parametrize("idma_bench", ["edge"], indirect=True)


def _mgaw_bits() -> int:
    # VT-d spec 11.4.2, Capability Register: MGAW (bits 21:16) is the address width minus one.
    cap = int(Path("/sys/class/iommu/dmar0/intel-iommu/cap").read_text(), 16)
    return ((cap >> 16) & 0x3F) + 1


def kernel_size(ns: NamespaceConfig) -> int:
    """Bytes the kernel's block device shows for ns. Linux 6.1 (nvme_update_disk_info) gives
    an extended-LBA namespace (metadata inline, mset=1) without protection information a
    capacity of 0 on PCIe: it cannot split the metadata off. Separate metadata is fine."""
    return 0 if ns.ms and ns.mset else ns.size


@every_bench
def test_iommu_width_matches_bench(idma_bench: Bench) -> None:
    assert _mgaw_bits() == idma_bench.aw_bits


@every_bench
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
        # nvmeXnY, or the per-path nvmeXcZnY of a multipath namespace
        sizes = sorted(
            (int(ns.name.rsplit("n", 1)[1]), int((ns / "size").read_text()) * 512,
             int((ns / "queue" / "logical_block_size").read_text()))
            for ns in nvme.glob("nvme*n*")
        )
        assert sizes == [(i, kernel_size(ns), ns.lba_size)
                         for i, ns in enumerate(ctrl.namespaces, 1)]


# ---- the "edge" bench ----------------------------------------------------------------------

def block_dir(name: str) -> Path:
    return Path("/sys/class/block") / name


@edge
def test_edge_serials_and_subsystems(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    serials = [(PCI_DEVICES / b / "nvme" / nvme_ctrl_name(b) / "serial").read_text().strip()
               for b in idma_nvme_bdfs]
    assert serials == ["IDMAE000", "IDMAE001", "IDMAE002"]
    nqns = [(PCI_DEVICES / b / "nvme" / nvme_ctrl_name(b) / "subsysnqn").read_text().strip()
            for b in idma_nvme_bdfs]
    # a controller outside an nvme-subsys is its own subsystem, named after its serial
    assert nqns == ["nqn.2019-08.org.qemu:IDMAE000", subsystem_nqn("idmasubsys1"),
                    "nqn.2019-08.org.qemu:IDMAE002"]
    assert Path("/sys/module/nvme_core/parameters/multipath").read_text().strip() == "Y"
    assert "nvme_core.multipath=Y" in Path("/proc/cmdline").read_text().split()


@edge
def test_edge_multipath_head(idma_bench: Bench, idma_nvme_bdfs: list[str],
                             idma_bench_images: Path) -> None:
    bdf = idma_nvme_bdfs[1]
    ctrl = nvme_ctrl_name(bdf)
    subsys = nvme_subsystem(bdf)
    assert subsys is not None and (subsys / ctrl).exists()
    [head] = multipath_heads(bdf)
    # the head lives under the subsystem, is a real block device with a /dev node ...
    assert head.parent == subsys and head.name.endswith("n1")
    node = Path("/dev") / head.name
    assert node.is_block_device()
    assert os.major(node.stat().st_rdev) == int((head / "dev").read_text().split(":")[0])
    assert int((head / "size").read_text()) * 512 == 32 << 20
    # ... and the controller's own namespace is a hidden path, nvmeXcYn1, with no device number
    [path] = (PCI_DEVICES / bdf / "nvme" / ctrl).glob("nvme*c*n1")
    assert (path / "hidden").read_text().strip() == "1"
    assert not (path / "dev").exists() and not (Path("/dev") / path.name).exists()
    # controllers outside a subsystem get no head
    for other in (idma_nvme_bdfs[0], idma_nvme_bdfs[2]):
        assert multipath_heads(other) == []
    # data written through the head reaches controller [1]'s image
    data = random.randbytes(64 * 1024)
    fd = os.open(node, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(image_path(idma_bench_images, 1, 1), "rb") as img:
        img.seek(1 << 20)
        assert img.read(len(data)) == data


@edge
def test_edge_no_transfer_limit(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    """mdts=0 on controller [0]: the kernel caps transfers by its own limit only."""
    assert idma_bench.controllers[0].mdts == 0
    unlimited = int(block_dir(f"{nvme_ctrl_name(idma_nvme_bdfs[0])}n1")
                    .joinpath("queue", "max_hw_sectors_kb").read_text())
    [head] = multipath_heads(idma_nvme_bdfs[1])
    limited = int((head / "queue" / "max_hw_sectors_kb").read_text())
    assert limited == 4 << idma_bench.controllers[1].mdts        # 4 KiB pages << MDTS
    assert unlimited > limited


@edge
def test_edge_metadata_namespaces(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    ctrl = nvme_ctrl_name(idma_nvme_bdfs[2])
    separate, extended = block_dir(f"{ctrl}n1"), block_dir(f"{ctrl}n2")
    # both namespaces are seen by the nvme driver and get a block device ...
    for ns in (separate, extended):
        assert ns.exists() and (Path("/dev") / ns.name).is_block_device()
        assert (ns / "queue" / "logical_block_size").read_text().strip() == "4096"
    # ... separate metadata (ms=8, mset=0): usable, 16 MiB, the metadata handled as a
    # no-PI integrity payload ("nop" profile) the block layer allocates
    assert int((separate / "size").read_text()) * 512 == 16 << 20
    assert (separate / "integrity" / "format").read_text().strip() == "nop"
    # ... extended LBAs (ms=8, mset=1): the kernel gives the disk capacity 0 (unusable)
    assert int((extended / "size").read_text()) == 0
    assert (extended / "integrity" / "format").read_text().strip() == "none"
