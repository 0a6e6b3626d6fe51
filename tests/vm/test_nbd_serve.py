"""`iommu-dma serve`: the namespace over NBD, used by real clients (qemu-img, qemu-io, nbdinfo,
nbd-client with ext4, libnbd), the data checked in the backing image or through the kernel's
nvme driver. Bench two_ctrl: controller 0 has 4 KiB blocks, controller 1 has 512-byte blocks.

The tests of the command itself (its URI line, exit statuses, signals) run `iommu-dma serve`;
the tests of what clients see start the same nbdkit server from the test process."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from iommu_dma.demo import kernel_block_device
from iommu_dma.nbd.export import NamespaceExport
from iommu_dma.nvme.controller import Controller
from iommu_dma.testing.bench import image_path
from tests.conftest import setup_vfio
from tests.vm.nbd_clients import (
    Writer,
    block_pattern,
    nbdinfo,
    qemu_io,
    run,
    serving,
    serving_here,
)

pytestmark = pytest.mark.iommu_dma_vm(bench="two_ctrl")

SIZE = 32 << 20                     # both namespaces of the bench


def identify_caps(bdf: str) -> dict[str, bool]:
    """What the export must advertise, from the controller's own Identify data."""
    with Controller.open(bdf) as ctrl:
        export = NamespaceExport(ctrl.namespace(1))
        export.close()
        c = export.caps
    return {"can_trim": c.can_trim, "can_fast_zero": c.cheap_zero, "can_zero": True,
            "can_flush": True, "can_fua": True, "can_multi_conn": True,
            "is_read_only": False, "is_rotational": False}


def test_nbdinfo_shows_size_and_capabilities(vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[1]
    want = identify_caps(bdf)
    assert want["can_trim"]                     # QEMU's nvme: ONCS has Dataset Management
    with serving(bdf, 1, tmp_path / "s") as s:
        info = nbdinfo(s.uri)
        print(info)
        assert info["export-size"] == SIZE
        assert {k: info[k] for k in want} == want
    with serving(bdf, 1, tmp_path / "s", "--readonly") as s:
        info = nbdinfo(s.uri)
        assert info["is_read_only"] is True and info["can_trim"] is False
        out = qemu_io(s.uri, "write -P 0x11 0 4096", check=False)
        # qemu-io opens the read-only export for writing and is refused (EPERM)
        assert out.returncode != 0 and "permission denied" in out.stderr.lower(), out


def test_qemu_img_convert_and_compare(vfio_bdfs: list[str], tmp_path: Path,
                                      idma_bench_images: Path) -> None:
    """A random image written with qemu-img convert equals the export (qemu-img compare) and,
    after the server stopped, the backing image of the namespace."""
    source = tmp_path / "random.img"
    source.write_bytes(random.randbytes(SIZE))
    with serving_here(vfio_bdfs[0], 1, tmp_path / "s") as s:
        t = time.monotonic()
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), s.uri)
        print(f"qemu-img convert: {SIZE >> 20} MiB in {time.monotonic() - t:.1f} s")
        out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), s.uri)
        assert "Images are identical" in out.stdout
        assert s.stop() == 0
    assert "shut down" in s.text(), s.text()
    assert image_path(idma_bench_images, 0, 1).read_bytes() == source.read_bytes()


def test_unaligned_writes_zero_and_trim_on_512_byte_blocks(
        vfio_bdfs: list[str], tmp_path: Path, idma_bench_images: Path) -> None:
    """Requests smaller than a block (read-modify-write in nbdkit's blocksize filter), write
    zeroes and trim, checked in the backing image."""
    image = image_path(idma_bench_images, 1, 1)
    with serving_here(vfio_bdfs[1], 1, tmp_path / "s") as s:
        qemu_io(s.uri, "write -P 0x66 0 65536", "write -P 0x5a 1000 3001",
                "write -z 20480 8192", "write -P 0x77 1048576 1048576",
                "discard 1048576 1048576", "flush")
        out = qemu_io(s.uri, "read -P 0x5a 1000 3001", "read -P 0 20480 8192",
                      "read -P 0x66 0 1000", "read -P 0x66 4001 16479")
        assert "Pattern verification failed" not in out.stdout, out.stdout
        assert s.stop() == 0
    data = image.read_bytes()
    assert data[:1000] == b"\x66" * 1000
    assert data[1000:4001] == b"\x5a" * 3001
    assert data[4001:20480] == b"\x66" * (20480 - 4001)
    assert data[20480:28672] == bytes(8192)
    assert data[28672:65536] == b"\x66" * (65536 - 28672)
    # deallocated blocks read as zeroes here (QEMU: DLFEAT 1, file with discard=unmap)
    assert data[1 << 20:2 << 20] in (bytes(1 << 20), b"\x77" * (1 << 20))


def test_ext4_through_nbd_client_read_by_the_kernel_nvme_driver(
        vfio_bdfs: list[str], tmp_path: Path) -> None:
    """nbd-client -> /dev/nbd0 -> mkfs.ext4, files, fsck; then the same namespace through the
    kernel nvme driver (after unbinding from vfio-pci) has the same files."""
    bdf = vfio_bdfs[0]
    files = {f"f{i}.bin": random.randbytes(random.randint(1, 3 << 20)) for i in range(6)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("modprobe", "nbd", "nbds_max=2")
    with serving_here(bdf, 1, tmp_path / "s") as s:
        sock = s.uri.split("socket=", 1)[1]
        run("nbd-client", "-u", sock, "/dev/nbd0", "-b", "4096", "-N", "")
        try:
            run("mkfs.ext4", "-q", "-F", "/dev/nbd0")
            run("mount", "/dev/nbd0", str(mnt))
            try:
                for name, data in files.items():
                    (mnt / name).write_bytes(data)
            finally:
                run("umount", str(mnt))
            run("fsck.ext4", "-n", "-f", "/dev/nbd0")
        finally:
            run("nbd-client", "-d", "/dev/nbd0")
        assert s.stop() == 0
    assert "shut down" in s.text(), s.text()
    setup_vfio("unbind", bdf)
    dev = kernel_block_device(bdf, 1)
    run("fsck.ext4", "-n", "-f", dev)
    run("mount", "-o", "ro", dev, str(mnt))
    try:
        for name, data in files.items():
            got = (mnt / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    finally:
        run("umount", str(mnt))


def _check_blocks(uri: str, count: int, block: int) -> None:
    out = qemu_io(uri, *(f"read -P {i % 251 + 1} {i * block + 8} {block - 8}"
                         for i in range(count)))
    assert "Pattern verification failed" not in out.stdout, out.stdout


def test_client_disconnecting_mid_write(vfio_bdfs: list[str], tmp_path: Path,
                                        idma_bench_images: Path) -> None:
    """A client killed while writing: every acknowledged write is there, the server goes on
    serving other clients."""
    block = 4096
    with serving_here(vfio_bdfs[0], 1, tmp_path / "s") as s:
        writer = Writer(s.uri, block, 2000)
        writer.wait_for(40)
        writer.kill()
        acked, _ = writer.finish()
        _check_blocks(s.uri, acked, block)
        qemu_io(s.uri, "write -P 0x42 8388608 4096", "read -P 0x42 8388608 4096")
        assert s.proc.poll() is None
        assert s.stop() == 0
    image = image_path(idma_bench_images, 0, 1).read_bytes()
    for i in range(acked):
        assert image[i * block:(i + 1) * block] == block_pattern(i, block), i
    print(f"{acked} writes acknowledged before the client was killed: all on the media")


def test_server_killed_mid_write_then_restarted(vfio_bdfs: list[str], tmp_path: Path,
                                                idma_bench_images: Path) -> None:
    """nbdkit SIGKILLed while a client writes: serve exits with an error; a new serve opens
    the controller again and every write acknowledged before the kill is intact."""
    block = 4096
    with serving(vfio_bdfs[0], 1, tmp_path / "s") as s:
        writer = Writer(s.uri, block, 4000)
        writer.wait_for(40)
        Path(f"/proc/{s.nbdkit_pid()}").stat()
        subprocess.run(["kill", "-KILL", str(s.nbdkit_pid())], check=True)
        acked, err = writer.finish()
        rc = s.proc.wait(120)
    assert rc == 1, s.text()
    assert "nbdkit ended with status -9" in s.text(), s.text()
    with serving(vfio_bdfs[0], 1, tmp_path / "s") as s:
        _check_blocks(s.uri, acked, block)
        assert s.stop(signal.SIGINT) == 0
    image = image_path(idma_bench_images, 0, 1).read_bytes()
    for i in range(acked):
        assert image[i * block:(i + 1) * block] == block_pattern(i, block), i
    print(f"{acked} writes acknowledged before nbdkit was killed: all on the media")


def test_each_nbdkit_thread_keeps_its_queue_pair(vfio_bdfs: list[str], tmp_path: Path) -> None:
    """nbdkit's worker threads enter Python with a new thread state per request; each still
    keeps one queue pair (they are keyed by the OS thread), not one per request."""
    with serving_here(vfio_bdfs[1], 1, tmp_path / "s", threads=2) as s:
        qemu_io(s.uri, *(f"read {i * 4096} 4096" for i in range(60)))
        assert s.stop() == 0
    m = re.search(r"\((\d+) I/O queue pairs were created while serving\)", s.text())
    assert m is not None, s.text()
    # one per nbdkit worker thread, and one for the flush at shutdown (nbdkit's main thread)
    assert 1 <= int(m.group(1)) <= 3, s.text()
