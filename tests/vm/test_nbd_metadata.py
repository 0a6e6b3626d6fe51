"""NBD exports of namespaces with metadata (bench "cmds", controller [1]): data only crosses
NBD, so a namespace is served only when the controller handles its metadata itself (PI in
exactly 8 bytes, inserted and stripped with PRACT); otherwise the export is refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iommu_dma.nbd.export import ExportError, NamespaceExport
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.pi import crc16_t10dif
from iommu_dma.testing.bench import Bench, image_path

pytestmark = pytest.mark.iommu_dma_vm(bench="cmds")

PI_CTRL = 1


def test_pi_only_namespace_is_served_with_pract_and_others_refused(
        idma_bench: Bench, vfio_bdfs: list[str], idma_bench_images: Path) -> None:
    cfg = idma_bench.controllers[PI_CTRL]
    with Controller.open(vfio_bdfs[PI_CTRL]) as ctrl:
        ns = ctrl.namespace(1)                       # PI type 1, 8 bytes, separate buffer
        assert (ns.ms, cfg.namespaces[0].pi) == (8, 1)
        export = NamespaceExport(ns)
        try:
            data = os.urandom(3 * ns.lba_size)
            export.pwrite(memoryview(data), 10 * ns.lba_size)
            back = bytearray(len(data))
            export.pread(memoryview(back), 10 * ns.lba_size)
            assert bytes(back) == data
            export.flush()
        finally:
            export.close()
        with open(image_path(idma_bench_images, PI_CTRL, 1), "rb") as img:
            img.seek(10 * ns.lba_size)
            assert img.read(len(data)) == data
        # the controller generated the PI (PRACT): the guard is the CRC of each block
        _, meta = ns.read_metadata(10, 3)
        for i in range(3):
            block = data[i * ns.lba_size:(i + 1) * ns.lba_size]
            assert int.from_bytes(meta[i * 8:i * 8 + 2], "big") == crc16_t10dif(block)
        ext = ctrl.namespace(2)                      # 16 bytes, extended LBAs
        with pytest.raises(ExportError, match="16 bytes of metadata per block "
                                              r"\(extended LBAs\), which NBD cannot carry"):
            NamespaceExport(ext)
