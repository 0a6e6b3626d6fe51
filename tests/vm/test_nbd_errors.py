"""NBD errors of `iommu-dma serve` on the faults bench: a media error reaches the client as
EIO and the server's log names the NVMe status (one line, no traceback); the server goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.nbd_clients import qemu_io, serving

pytestmark = pytest.mark.iommu_dma_vm(bench="faults")

BLOCK = 4096
BAD_READ, BAD_WRITE = 1000, 3000        # the bench's read_errors / write_errors LBAs (ns 1)


def test_media_errors_are_eio_named_in_the_log(vfio_bdfs: list[str], tmp_path: Path) -> None:
    # 4 threads per connection on a controller of 8 queue pairs: some share the default queue
    with serving(vfio_bdfs[0], 1, tmp_path / "s", "--threads", "4") as s:
        bad = qemu_io(s.uri, f"read {BAD_READ * BLOCK} {BLOCK}", check=False)
        assert "Input/output error" in bad.stdout + bad.stderr, bad
        bad = qemu_io(s.uri, f"write -P 0x33 {BAD_WRITE * BLOCK} {BLOCK}", check=False)
        assert "Input/output error" in bad.stdout + bad.stderr, bad
        span = qemu_io(s.uri, f"read {(BAD_READ - 1) * BLOCK} {3 * BLOCK}", check=False)
        assert "Input/output error" in span.stdout + span.stderr, span
        good = qemu_io(s.uri, "write -P 0x44 0 8192", "read -P 0x44 0 8192")
        assert "Pattern verification failed" not in good.stdout
        assert s.stop() == 0
    log = s.text()
    print(log)
    assert "Traceback" not in log
    reads = [line for line in log.splitlines() if "Unrecovered Read Error" in line]
    writes = [line for line in log.splitlines() if "Write Fault" in line]
    assert reads and all(line.startswith("iommu-dma serve: read: ") and "[EIO]" in line
                         for line in reads), log
    assert f"LBAs {BAD_READ}+1" in reads[0], reads
    assert writes and "[EIO]" in writes[0], log
