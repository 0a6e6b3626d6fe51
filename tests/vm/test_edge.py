"""The "edge" bench: a controller without a transfer limit (MDTS 0) and namespaces with
metadata. Data is checked against the backing image."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.nvme.controller import MAX_TRANSFER_CAP
from iommu_dma.nvme.namespace import UnsupportedFormatError
from iommu_dma.testing.bench import image_path

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


@pytest.mark.parametrize("nsid, layout", [(1, "separate metadata buffer"),
                                          (2, "extended LBA")])
def test_metadata_formats_are_refused_naming_the_format(vfio_bdfs: list[str], nsid: int,
                                                        layout: str) -> None:
    with Controller.open(vfio_bdfs[2]) as c:
        with pytest.raises(UnsupportedFormatError,
                           match=rf"namespace {nsid}: LBA format \d+ is 4096-byte blocks with 8 "
                                 rf"bytes of metadata \({layout}"):
            c.namespace(nsid)
    cli = [str(Path(sys.executable).parent / "iommu-dma"), "read", vfio_bdfs[2], "-n",
           str(nsid), "-s", "0", "-c", "1", "-d", "/dev/null"]
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "8 bytes of metadata" in proc.stderr.strip().splitlines()[-1]
