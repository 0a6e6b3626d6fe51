"""The "edge" bench: a controller without a transfer limit (MDTS 0) and namespaces with
metadata. Data is checked against the backing image."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.nvme.controller import MAX_TRANSFER_CAP
from iommu_dma.testing.bench import Bench, image_path
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="edge")


def test_unlimited_mdts_moves_8_mib_in_2_mib_commands(vfio_bdfs: list[str],
                                                             idma_bench_images: Path) -> None:
    with Controller.open(vfio_bdfs[0]) as c:
        assert c.identify.mdts == 0                    # no limit: capped at the PRP lists
        assert c.max_transfer == MAX_TRANSFER_CAP == 2 << 20
        ns = c.namespace(1)
        size = 8 << 20
        data = random.randbytes(size)
        buf = c.alloc(size + 4096)
        view = buf.view[512:512 + size]                # not page aligned: PRP1 has an offset
        view[:] = data
        req = ns.write_async(16, view, size // 4096)
        assert len(req.futures) == 4                   # four 2 MiB commands, 513 pages each
        req.result(60)
        with open(image_path(idma_bench_images, 0, 1), "rb") as f:
            f.seek(16 * 4096)
            assert f.read(size) == data
        view[:] = bytes(size)
        ns.read_into(16, view, size // 4096)
        assert bytes(view) == data
        buf.free()


@pytest.mark.parametrize("nsid", [1, 2])
def test_metadata_formats_separate_and_extended(cli: Cli, vfio_bdfs: list[str], nsid: int,
                                                idma_bench: Bench, idma_bench_images: Path
                                                ) -> None:
    """8 bytes of metadata per block, no PI: nsid 1 in a separate buffer (MPTR), nsid 2
    extended LBAs. QEMU keeps every block's metadata after all the data in the image."""
    blocks = idma_bench.controllers[2].namespaces[nsid - 1].blocks
    data, meta = random.randbytes(2 * 4096), random.randbytes(2 * 8)
    with Controller.open(vfio_bdfs[2]) as c:
        ns = c.namespace(nsid)
        assert (ns.ms, ns.extended, ns.pi) == (8, nsid == 2, None)
        ns.write(3, data, metadata=meta)
        assert ns.read_metadata(3, 2) == (data, meta)
        if nsid == 1:
            with pytest.raises(ValueError, match="8 bytes of metadata per block in a separate "
                                                 r"buffer \(MPTR\); pass metadata="):
                ns.read(3, 2)
        else:
            assert ns.read(3, 2) == data[:4096] + meta[:8] + data[4096:] + meta[8:]
    with open(image_path(idma_bench_images, 2, nsid), "rb") as f:
        f.seek(3 * 4096)
        assert f.read(len(data)) == data
        f.seek(blocks * 4096 + 3 * 8)
        assert f.read(len(meta)) == meta
    if nsid == 1:       # the CLI names the missing metadata
        r = cli.fails("read", vfio_bdfs[2], "-n", "1", "-s", "0", "-c", "1", "-d", "/dev/null",
                      message="8 bytes of metadata")
        assert "8 bytes of metadata" in r.err.strip().splitlines()[-1]
