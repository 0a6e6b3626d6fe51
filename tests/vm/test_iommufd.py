"""Both IOMMU backends on the bench kernel (`make bench-kernel`): iommufd (IOAS, VFIO cdev) and
the legacy type1 container, behind intel-iommu aw-bits 48 and 39, and behind virtio-iommu (no
interrupt remapping: the guest boots with the unsafe-interrupt parameters, and we warn).

Data written through either backend is checked in the namespace's backing image on the host
and read back through the other backend.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iommu_dma import backends, iommufd
from iommu_dma.container import Container
from iommu_dma.discovery import group_of
from iommu_dma.errors import DeviceBusyError, VfioError
from iommu_dma.memory import DmaAllocator
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.perf import Workload, run
from iommu_dma.pci import PciDevice
from iommu_dma.testing.bench import Bench, image_path
from tests.conftest import setup_vfio
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm
INTEL = pytest.mark.parametrize("idma_bench", ["iommufd", "iommufd39"], indirect=True)
BACKENDS = ("iommufd", "container")

# bench-facts.md: the legacy container's IOVA ranges; IOMMU_IOAS_IOVA_RANGES must agree (the
# aperture of aw-bits, minus the MSI window [0xfee00000, 0xfeefffff])
RANGES = {
    48: ((0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)),
    39: ((0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)),
}
NVME_VS = 0x08
CHECKOUT = Path(__file__).resolve().parents[2]


def image_bytes(images: Path, nsid: int, offset: int, length: int) -> bytes:
    with open(image_path(images, 0, nsid), "rb") as f:
        f.seek(offset)
        return f.read(length)


@INTEL
def test_backend_choice_and_iova_ranges(idma_bench: Bench, vfio_bdfs: list[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bdf = vfio_bdfs[0]
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert os.path.exists("/dev/iommu")
    cdev = iommufd.cdev_path(bdf)
    assert cdev is not None and cdev.startswith("/dev/vfio/devices/vfio")
    with Container() as c:                          # automatic: /dev/iommu and the cdev exist
        assert c.backend_name is None
        group = c.attach(bdf)[0]
        assert c.backend_name == "iommufd" and c.groups == [group] and c.ioas_id is not None
        ranges, alignment = iommufd.ioas_iova_ranges(c.fd, c.ioas_id)
        print(f"aw-bits {idma_bench.aw_bits}: IOMMU_IOAS_IOVA_RANGES "
              f"{[(hex(s), hex(e)) for s, e in ranges]}, out_iova_alignment {alignment:#x}")
        assert ranges == c.iova_ranges == RANGES[idma_bench.aw_bits]
        assert 1 <= alignment <= 4096 and c.page_size == 4096 and c.dma_avail is None
    with Container(backend="container") as c:
        c.attach(bdf)
        assert c.backend_name == "container" and c.iova_ranges == RANGES[idma_bench.aw_bits]
        assert c.dma_avail == 65535
    monkeypatch.setenv(backends.BACKEND_ENV, "container")
    with Container() as c:
        c.attach(bdf)
        assert c.backend_name == "container"


@INTEL
@pytest.mark.parametrize("backend", BACKENDS)
def test_vfio_layer(idma_bench: Bench, vfio_bdfs: list[str], backend: str) -> None:
    bdf = vfio_bdfs[0]
    with Container(backend=backend) as c:
        dev = PciDevice(c, bdf)
        assert c.backend_name == backend
        assert dev.read32(NVME_VS) == 0x00010400     # NVMe 1.4 through the mmap'd BAR0
        mem = DmaAllocator(c)
        bufs = [mem.alloc(size) for size in (4096, 5000, 2 << 20, 100)]
        for buf in bufs:
            assert buf.iova == buf.addr and c.is_mapped(buf.iova, buf.size)
            assert any(s <= buf.addr and buf.addr + buf.size - 1 <= e
                       for s, e in RANGES[idma_bench.aw_bits])
        assert dev.can_reset
        dev.reset()
        assert dev.read32(NVME_VS) == 0x00010400
        fds = dev.enable_msix(2)
        dev.trigger_msix(1)
        assert int.from_bytes(os.read(fds[1], 8), "little") == 1
        dev.disable_msix()
        with Container(backend=backend) as other, pytest.raises(DeviceBusyError):
            other.attach(bdf)                         # one user of a device at a time
        assert c.mapping_count > 0
    with Container(backend=backend) as again:        # closing released the device
        again.attach(bdf)


def _round_trip(ctrl: Controller, images: Path, seed: int) -> dict[int, tuple[int, bytes]]:
    """Random data to both namespaces through DMA memory; checked in the backing images."""
    rng = random.Random(seed)
    written = {}
    for nsid in (1, 2):
        ns = ctrl.namespace(nsid)
        nlb = (256 << 10) // ns.lba_size
        lba = rng.randrange(0, ns.blocks - nlb)
        data = rng.randbytes(nlb * ns.lba_size)
        with ctrl.alloc(len(data)) as buf:
            buf.view[:] = data
            ns.write_from(lba, buf, nlb)
            buf.view[:] = b"\0" * len(data)
            ns.read_into(lba, buf, nlb)
            assert bytes(buf.view) == data
        assert ns.read(lba, nlb) == data
        assert image_bytes(images, nsid, lba * ns.lba_size, len(data)) == data
        written[nsid] = (lba, data)
    return written


def _check_each_other(bdf: str, images: Path) -> None:
    """What one backend wrote, the other reads."""
    for writer, reader in (BACKENDS, tuple(reversed(BACKENDS))):
        with Controller.open(bdf, backend=writer) as c:
            assert c.container.backend_name == writer
            written = _round_trip(c, images, seed=BACKENDS.index(writer))
        with Controller.open(bdf, backend=reader) as c:
            assert c.container.backend_name == reader
            for nsid, (lba, data) in written.items():
                ns = c.namespace(nsid)
                assert ns.read(lba, len(data) // ns.lba_size) == data, (writer, reader, nsid)


def _perf_side_by_side(bdf: str, label: str) -> dict[str, float]:
    """4 KiB random reads, QD32, 3 s, on each backend in this boot (printed for the report)."""
    iops = {}
    for backend in BACKENDS:
        with Controller.open(bdf, backend=backend) as c:
            res = run(c.namespace(1), Workload(rw="randread", bs=4096, iodepth=32, runtime=3))
            assert res.ios > 0
            iops[backend] = res.iops
    print(f"{label}: 4 KiB randread QD32 3 s: "
          + ", ".join(f"{b} {v:.0f} IOPS" for b, v in iops.items()))
    return iops


@INTEL
def test_nvme_data_on_both_backends(idma_bench: Bench, vfio_bdfs: list[str],
                                    idma_bench_images: Path) -> None:
    bdf = vfio_bdfs[0]
    cfg = idma_bench.controllers[0]
    for backend in BACKENDS:
        with Controller.open(bdf, backend=backend) as c:
            assert c.identify.sn == cfg.serial and c.active_namespaces() == [1, 2]
    _check_each_other(bdf, idma_bench_images)
    if idma_bench.name == "iommufd":
        _perf_side_by_side(bdf, f"bench {idma_bench.name}")


@INTEL
def test_list_json_names_the_backend(cli: Cli, idma_bench: Bench, vfio_bdfs: list[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    for forced, want in ((None, "iommufd"), ("container", "container")):
        if forced:                                  # read when a controller is opened
            monkeypatch.setenv(backends.BACKEND_ENV, forced)
        listed = cli.ok("list", "-o", "json").json()["controllers"]
        assert [c["bdf"] for c in listed] == vfio_bdfs
        assert listed[0]["iommu_backend"] == want and listed[0]["error"] is None
        human = cli.ok("list").text
        assert f" {want} " in human.splitlines()[2]


# The user's own process: Debian's interpreter (the checkout's venv may live under /root), our
# package and its dependencies by path; memlock raised as root before dropping to the user.
AS_NOBODY = """
import sys
from iommu_dma import Controller
with Controller.open(sys.argv[1]) as c:
    print(c.container.backend_name, c.identify.sn)
"""


@pytest.mark.parametrize("idma_bench", ["iommufd"], indirect=True)
def test_bind_user_gets_the_iommufd_nodes(idma_bench: Bench, vfio_bdfs: list[str]) -> None:
    bdf = vfio_bdfs[0]
    group_node = Path(f"/dev/vfio/{group_of(bdf)}")
    cdev = iommufd.cdev_path(bdf)
    assert cdev is not None
    out = setup_vfio("--user", "nobody", "bind", bdf).stdout
    try:
        assert f"{cdev} now belongs to nobody" in out, out
        assert "/dev/iommu is now read-write for nobody (ACL)" in out, out
        assert Path(cdev).owner() == "nobody" and group_node.owner() == "nobody"
        acl = subprocess.run(["getfacl", "-c", "/dev/iommu"], capture_output=True, text=True,
                             check=True).stdout
        assert "user:nobody:rw-" in acl.splitlines(), acl
        site = next(p for p in sys.path if p.endswith("site-packages"))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{CHECKOUT}:{site}"}
        proc = subprocess.run(["prlimit", "--memlock=unlimited:unlimited", "setpriv",
                               "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "/usr/bin/python3", "-c", AS_NOBODY, bdf],
                              capture_output=True, text=True, env=env, cwd="/", timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["iommufd", idma_bench.controllers[0].serial]
    finally:
        os.chown(cdev, 0, 0)
        os.chown(group_node, 0, 0)
        subprocess.run(["setfacl", "-x", "u:nobody", "/dev/iommu"], check=False)


# ---- virtio-iommu: no interrupt remapping --------------------------------------------------


@pytest.mark.parametrize("idma_bench", ["virtio"], indirect=True)
def test_virtio_iommu_works_and_warns(idma_bench: Bench, vfio_bdfs: list[str],
                                      idma_bench_images: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    bdf = vfio_bdfs[0]
    assert not (Path("/sys/class/iommu").exists()
                and any(p.name.startswith("dmar") for p in Path("/sys/class/iommu").iterdir()))
    assert not backends.interrupt_remapping_seen()
    for backend in BACKENDS:
        assert backends.unsafe_interrupts_allowed(backend)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="iommu_dma"):
            with Controller.open(bdf, backend=backend) as c:
                assert c.container.backend_name == backend
                _round_trip(c, idma_bench_images, seed=7)
                ranges = c.container.iova_ranges
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        param = backends.UNSAFE_PARAMS[backend]
        assert any(param + "=1" in m and "interrupt remapping" in m for m in warned), warned
        print(f"virtio-iommu, {backend}: IOVA ranges {[(hex(s), hex(e)) for s, e in ranges]}")
    _check_each_other(bdf, idma_bench_images)
    start = time.monotonic()
    _perf_side_by_side(bdf, "bench virtio")
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("idma_bench", ["virtio"], indirect=True)
def test_setup_vfio_names_the_missing_interrupt_remapping(idma_bench: Bench,
                                                         idma_nvme_bdfs: list[str]) -> None:
    """On the kernel driver first (this test does not ask for vfio_bdfs); bind says that only
    the unsafe-interrupt parameter lets VFIO attach, instead of "the IOMMU is off"."""
    bdf = idma_nvme_bdfs[0]
    try:
        proc = setup_vfio("bind", bdf)
        assert "bound to vfio-pci" in proc.stdout
        assert "no interrupt remapping" in proc.stderr
        assert "allow_unsafe_interrupts=1 is set" in proc.stderr
        assert "IOMMU is off" not in proc.stdout + proc.stderr
    finally:
        setup_vfio("unbind", bdf)


@pytest.mark.parametrize("idma_bench", ["virtio"], indirect=True)
def test_virtio_iommu_without_the_parameter_is_refused_by_name(
        cli: Cli, idma_bench: Bench, vfio_bdfs: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench boots with the unsafe-interrupt parameters; both are writable at run time,
    so each is turned off here: VFIO then refuses to attach (EPERM) and the error names the
    missing interrupt remapping and the parameter, from the library and from the CLI."""
    bdf = vfio_bdfs[0]
    for backend in BACKENDS:
        module, param = backends.UNSAFE_PARAMS[backend].split(".")
        knob = Path("/sys/module") / module / "parameters" / param
        knob.write_text("N")
        try:
            assert not backends.unsafe_interrupts_allowed(backend)
            with pytest.raises(VfioError) as e:
                Controller.open(bdf, backend=backend)
            assert e.value.errno == errno.EPERM
            assert str(e.value).count(backends.missing_remapping_text(backend)) == 1, e.value
            monkeypatch.setenv(backends.BACKEND_ENV, backend)
            cli.fails("id-ctrl", bdf, message=f"{backends.UNSAFE_PARAMS[backend]}=1")
        finally:
            knob.write_text("Y")
    with Controller.open(bdf) as c:                 # attaches again once the parameter is back
        assert c.identify.sn == idma_bench.controllers[0].serial
