"""scripts/setup_vfio.sh inside the bench guest: binding, giving back, status, refusals."""

from __future__ import annotations

import mmap
import os
import random
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iommu_dma.testing.bench import Bench
from iommu_dma.testing.guest import PCI_DEVICES, driver_of, multipath_heads
from tests.conftest import setup_vfio

pytestmark = pytest.mark.iommu_dma_vm


def group_of(bdf: str) -> str:
    return (PCI_DEVICES / bdf / "iommu_group").resolve().name


def namespace_node(bdf: str, nsid: int) -> Path:
    ctrl = next((PCI_DEVICES / bdf / "nvme").iterdir()).name
    return Path(f"/dev/{ctrl}n{nsid}")


def write_and_read_back(dev: Path, offset: int, data: bytes) -> bytes:
    """O_DIRECT write then read of data at offset (aligned buffers from mmap)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
        back = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [back], offset) == len(data)
        return bytes(back)
    finally:
        os.close(fd)


@pytest.mark.parametrize("idma_bench", ["default", "aw39", "two_ctrl"], indirect=True)
def test_bind_status_unbind_and_data_intact(idma_bench: Bench, idma_nvme_bdfs: list[str],
                                            idma_bench_images: Path) -> None:
    out = setup_vfio("bind").stdout
    for bdf in idma_nvme_bdfs:
        assert driver_of(bdf) == "vfio-pci"
        group = group_of(bdf)
        assert Path(f"/dev/vfio/{group}").exists()
        assert f"{bdf} bound to vfio-pci: IOMMU group {group}" in out

    status = setup_vfio("status").stdout.splitlines()
    assert status[0].split()[:5] == ["BDF", "VEN:DEV", "DRIVER", "GROUP", "VFIO-NODE"]
    rows = {line.split()[0]: line.split() for line in status[1:]}
    assert sorted(rows) == idma_nvme_bdfs
    for bdf in idma_nvme_bdfs:
        assert rows[bdf][1:5] == ["1b36:0010", "vfio-pci", group_of(bdf),
                                  f"/dev/vfio/{group_of(bdf)}(root)"]

    setup_vfio("unbind")
    for ci, bdf in enumerate(idma_nvme_bdfs):
        assert driver_of(bdf) == "nvme"
        dev = namespace_node(bdf, 1)
        subprocess.run(["udevadm", "settle"], check=False)
        assert dev.exists(), f"{dev} did not come back after unbind"
        data = random.randbytes(256 * 1024)
        offset = 3 * 1024 * 1024
        assert write_and_read_back(dev, offset, data) == data
        # ... and the bytes reached the backing image on the host
        with open(idma_bench_images / f"c{ci}n1.img", "rb") as img:
            img.seek(offset)
            assert img.read(len(data)) == data


@pytest.mark.parametrize("idma_bench", ["default"], indirect=True)
def test_status_before_binding_shows_kernel_driver(idma_bench: Bench,
                                                   idma_nvme_bdfs: list[str]) -> None:
    rows = setup_vfio("status").stdout.splitlines()[1:]
    row = next(r.split() for r in rows if r.startswith(idma_nvme_bdfs[0]))
    assert row[2] == "nvme" and row[4] == "-"
    node = namespace_node(idma_nvme_bdfs[0], 1)
    assert row[6] == ",".join(p.name for p in sorted(node.parent.glob(f"{node.name[:-1]}*")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["bind", "0000:00:1d.7"], "no PCI device 0000:00:1d.7"),
        (["bind", "00:1f.2"], "0000:00:1f.2 is not an NVMe controller (class 0x010601"),
        (["bind", "banana"], "'banana' is not a PCI address"),
        (["unbind", "0000:00:1d.7"], "no PCI device 0000:00:1d.7"),
        (["bind", "--user", "no-such-user"], "no such user 'no-such-user'"),
        (["--user", "-G", "bind"], "'-G' is not a user name"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_is_refused_clearly(args: list[str], message: str,
                                      idma_nvme_bdfs: list[str]) -> None:
    proc = setup_vfio(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert all(driver_of(b) == "nvme" for b in idma_nvme_bdfs)   # nothing was touched


def test_mounted_namespace_is_refused_unless_forced(idma_nvme_bdfs: list[str],
                                                    tmp_path: Path) -> None:
    bdf = idma_nvme_bdfs[0]
    dev = namespace_node(bdf, 2)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dev)], check=True)
    subprocess.run(["mount", str(dev), str(tmp_path)], check=True)
    try:
        proc = setup_vfio("bind", bdf, check=False)
        assert proc.returncode == 1
        assert f"{bdf} is in use" in proc.stderr
        assert f"{dev} is mounted on {tmp_path}" in proc.stderr
        assert "--force" in proc.stderr and "Unmount" in proc.stderr
        assert driver_of(bdf) == "nvme"
        # without BDFs, the busy controller is skipped rather than taken
        proc = setup_vfio("bind", check=False)
        assert f"skipping {bdf}: in use" in proc.stdout
        assert driver_of(bdf) == "nvme"
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_user_and_hugepages(vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    proc = setup_vfio("--user", "nobody", "--hugepages", "8", "bind", bdf)
    node = Path(f"/dev/vfio/{group_of(bdf)}")
    owner = node.owner()
    os.chown(node, 0, 0)                 # the device stays bound for later tests: give it back
    assert owner == "nobody"
    assert "8 2 MiB hugepages reserved" in proc.stdout
    assert Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text() == "8\n"
    # nobody keeps the default memlock limit, far too low for DMA: the script says so and how
    assert "nobody's RLIMIT_MEMLOCK is" in proc.stderr
    assert "memlock unlimited" in proc.stderr
    setup_vfio("--hugepages", "0")


# ---- in-use detection by exclusive open, on the "edge" bench's multipath controller [1] -----

@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """mounted(node): a fresh ext4 on node's block device, mounted through node on a
    directory under /tmp; unmounted after the test (if it still is)."""
    mounts: list[Path] = []

    def mount(node: Path) -> Path:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(node)], check=True)
        where = tmp_path / f"mnt{len(mounts)}"
        where.mkdir()
        subprocess.run(["mount", str(node), str(where)], check=True)
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def head_node(bdf: str) -> Path:
    [head] = multipath_heads(bdf)
    return Path("/dev") / head.name


def assert_refused(bdf: str, dev: Path, where: Path) -> None:
    proc = setup_vfio("bind", bdf, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{bdf} is in use" in proc.stderr
    assert f"{dev} is mounted on {where}" in proc.stderr
    assert "Unmount it" in proc.stderr and "--force" in proc.stderr
    assert driver_of(bdf) == "nvme"


@pytest.mark.parametrize("idma_bench", ["edge"], indirect=True)
def test_mounted_multipath_head_is_refused(idma_bench: Bench, idma_nvme_bdfs: list[str],
                                           mounted: Callable[[Path], Path]) -> None:
    bdf = idma_nvme_bdfs[1]
    head = head_node(bdf)
    # the head is not among the controller's own namespaces (those are hidden paths)
    assert not list((PCI_DEVICES / bdf / "nvme").glob(f"*/{head.name}"))
    where = mounted(head)
    assert_refused(bdf, head, where)
    # without BDFs, the busy controller is skipped and the free ones are taken
    proc = setup_vfio("bind", check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {bdf}: in use ({head} is mounted on {where})" in proc.stdout
    assert driver_of(bdf) == "nvme"
    assert driver_of(idma_nvme_bdfs[0]) == driver_of(idma_nvme_bdfs[2]) == "vfio-pci"
    # after unmounting, bind takes it
    subprocess.run(["umount", str(where)], check=True)
    setup_vfio("bind", bdf)
    assert driver_of(bdf) == "vfio-pci"


@pytest.mark.parametrize("idma_bench", ["edge"], indirect=True)
def test_mount_through_a_root_like_node_is_refused(idma_bench: Bench, idma_nvme_bdfs: list[str],
                                                   mounted: Callable[[Path], Path],
                                                   tmp_path: Path) -> None:
    """/proc/mounts names the node the mount used (/dev/root, a private node), not /dev/nvme*:
    the exclusive open catches it all the same."""
    bdf = idma_nvme_bdfs[1]
    head = head_node(bdf)
    node = tmp_path / "root"
    os.mknod(node, 0o600 | stat.S_IFBLK, head.stat().st_rdev)
    where = mounted(node)
    assert f"{node} {where} " in Path("/proc/mounts").read_text()
    assert str(head) not in Path("/proc/mounts").read_text()
    assert_refused(bdf, head, where)
    subprocess.run(["umount", str(where)], check=True)
    setup_vfio("bind", bdf)
    assert driver_of(bdf) == "vfio-pci"


@pytest.mark.parametrize("idma_bench", ["edge"], indirect=True)
def test_held_namespace_without_mount_is_refused(idma_bench: Bench,
                                                 idma_nvme_bdfs: list[str]) -> None:
    """Another exclusive opener (no mount, no holder) is found too; --force overrides."""
    bdf = idma_nvme_bdfs[0]
    dev = namespace_node(bdf, 1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL);"
         "print('held', flush=True); sys.stdin.read()", str(dev)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        proc = setup_vfio("bind", bdf, check=False)
        assert proc.returncode == 1
        assert f"{dev} is open exclusively by another user" in proc.stderr
        assert driver_of(bdf) == "nvme"
        proc = setup_vfio("--force", "bind", bdf)
        assert "taken anyway (--force)" in proc.stderr
        assert driver_of(bdf) == "vfio-pci"
    finally:
        holder.kill()
        holder.wait()
