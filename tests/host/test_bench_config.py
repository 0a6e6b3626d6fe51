"""Bench configurations turn into the right QEMU options (no guest needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from iommu_dma.testing.bench import (
    BENCHES,
    Bench,
    ControllerConfig,
    NamespaceConfig,
    blkdebug_config,
    memory_bytes,
    qmp_socket_path,
    subsystem_nqn,
)

# a kernel path for command-line tests (never booted)
TEST_KERNEL = Path("/boot/vmlinuz-test")


def test_qemu_args_for_two_controllers(tmp_path: Path) -> None:
    args = BENCHES["two_ctrl"].qemu_args(tmp_path)
    text = " ".join(args)
    assert "intel-iommu,intremap=on,aw-bits=48" in text
    assert "nvme,id=nvme0,serial=IDMAA001,mdts=5" in text
    assert "nvme,id=nvme1,serial=IDMAB002,mdts=6" in text
    assert "nvme-ns,id=c1n1dev,drive=c1n1,bus=nvme1,nsid=1,logical_block_size=512" in text
    assert (tmp_path / "c0n1.img").stat().st_size == 32 << 20
    # the IOMMU comes before the devices it translates
    assert text.index("intel-iommu") < text.index("nvme,")


def test_null_backing_creates_no_image(tmp_path: Path) -> None:
    args = " ".join(BENCHES["perf"].qemu_args(tmp_path))
    assert "driver=null-co,node-name=c0n1,size=1073741824,read-zeroes=on" in args
    assert not list(tmp_path.iterdir())


def test_json_round_trip() -> None:
    for bench in BENCHES.values():
        assert Bench.from_json(bench.to_json()) == bench


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NamespaceConfig(lba_size=1024), "512 or 4096"),
        (lambda: NamespaceConfig(size=1000, lba_size=512), "multiple of 512"),
        (lambda: ControllerConfig("X", model="Other"), "cannot set the model"),
        (lambda: ControllerConfig("S" * 21), "1..20"),
        (lambda: Bench("b", (ControllerConfig("A"),), aw_bits=40), "39 or 48"),
        (lambda: NamespaceConfig(ms=7), "0, 8, 16 or 64"),
        (lambda: NamespaceConfig(mset=2, ms=8), "mset must be 0"),
        (lambda: NamespaceConfig(mset=1), "needs metadata"),
        (lambda: ControllerConfig("X", mdts=16), "mdts must be 0..15"),
        (lambda: ControllerConfig("X", subsystem="bad name"), "must be a QEMU id"),
        (lambda: ControllerConfig("X", subsystem="a,b=c"), "must be a QEMU id"),
        (lambda: Bench("b", (ControllerConfig("A"),), kernel_args=("a b",)), "no blanks"),
        (lambda: Bench("b", (ControllerConfig("A"),), kernel_args="nvme_core.multipath=Y"),
         "tuple of options"),
        (lambda: Bench("b", (ControllerConfig("A"), ControllerConfig("A"))), "must differ"),
        (lambda: Bench("b", (ControllerConfig("A"),), memory="lots"), "not a size"),
        (lambda: NamespaceConfig(size=1 << 20, read_errors=(256,)),
         r"read_errors: LBA 256 is outside the namespace \(0..255\)"),
        (lambda: NamespaceConfig(write_errors=(-1,)), "write_errors: LBA -1 is outside"),
        (lambda: NamespaceConfig(read_errors=[1]), "must be a tuple of LBAs"),
        (lambda: NamespaceConfig(read_errors=(1.5,)), "LBA 1.5 is not an integer"),
        (lambda: NamespaceConfig(read_errors=(True,)), "LBA True is not an integer"),
        (lambda: NamespaceConfig(write_errors=(3, 3)), "LBAs repeat"),
        (lambda: NamespaceConfig(backing="null", read_errors=(1,)), "need backing='file'"),
        (lambda: NamespaceConfig(backing="null", stallable=True), "need backing='file'"),
        (lambda: NamespaceConfig(stallable=1), "stallable must be True or False"),
        (lambda: ControllerConfig("X", hotplug="yes"), "hotplug must be True or False"),
        (lambda: NamespaceConfig(pi=4, ms=8), "PI type 1..3"),
        (lambda: NamespaceConfig(pi=1), r"needs at least 8 bytes of metadata"),
        (lambda: NamespaceConfig(pi=1, ms=8, pil=2), "pil must be 0"),
        (lambda: NamespaceConfig(zoned=True, zone_size=3 << 20), "divides the namespace size"),
        (lambda: NamespaceConfig(zoned=True, zone_capacity=2 << 20), "no larger than zone_size"),
        (lambda: NamespaceConfig(zoned=True, ms=8), "cannot also have metadata"),
        (lambda: ControllerConfig("X", (NamespaceConfig(detached=True),)),
         "needs the controller in an NVM subsystem"),
        (lambda: Bench("b", (ControllerConfig("A", hotplug=True), ControllerConfig("B"))),
         "hotplug controllers must come after all others"),
    ],
)
def test_bad_configuration_is_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_edge_bench_layout() -> None:
    """Others' tests index the "edge" controllers: keep this layout."""
    edge = BENCHES["edge"]
    assert edge.aw_bits == 48
    assert "nvme_core.multipath=Y" in edge.kernel_args
    c0, c1, c2 = edge.controllers
    assert (c0.serial, c0.mdts, c0.subsystem) == ("IDMAE000", 0, "")
    assert c0.namespaces == (NamespaceConfig(64 << 20, 4096, "file"),)
    assert c1.serial == "IDMAE001" and c1.subsystem
    assert c1.namespaces == (NamespaceConfig(32 << 20, 4096, "file"),)
    assert c2.serial == "IDMAE002" and not c2.subsystem
    assert c2.namespaces == (NamespaceConfig(16 << 20, 4096, "file", ms=8, mset=0),
                             NamespaceConfig(16 << 20, 4096, "file", ms=8, mset=1))


def test_qemu_args_for_edge(tmp_path: Path) -> None:
    edge = BENCHES["edge"]
    args = edge.qemu_args(tmp_path)
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    name = edge.controllers[1].subsystem
    assert devices == [
        "intel-iommu,intremap=on,aw-bits=48",
        "nvme,id=nvme0,serial=IDMAE000,mdts=0,max_ioqpairs=8",
        "nvme-ns,id=c0n1dev,drive=c0n1,bus=nvme0,nsid=1,logical_block_size=4096,"
        "physical_block_size=4096",
        # the subsystem precedes the controller that names it
        f"nvme-subsys,id={name},nqn={name}",
        f"nvme,id=nvme1,serial=IDMAE001,mdts=7,max_ioqpairs=8,subsys={name}",
        "nvme-ns,id=c1n1dev,drive=c1n1,bus=nvme1,nsid=1,logical_block_size=4096,"
        "physical_block_size=4096",
        "nvme,id=nvme2,serial=IDMAE002,mdts=7,max_ioqpairs=8",
        "nvme-ns,id=c2n1dev,drive=c2n1,bus=nvme2,nsid=1,logical_block_size=4096,"
        "physical_block_size=4096,ms=8,mset=0",
        "nvme-ns,id=c2n2dev,drive=c2n2,bus=nvme2,nsid=2,logical_block_size=4096,"
        "physical_block_size=4096,ms=8,mset=1",
    ]
    assert subsystem_nqn(name) == f"nqn.2019-08.org.qemu:{name}"
    # file images in the work dir; QEMU keeps the metadata after the data, in the same image
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.suffix == ".img"}
    assert sizes == {"c0n1.img": 64 << 20, "c1n1.img": 32 << 20,
                     "c2n1.img": 4096 * (4096 + 8), "c2n2.img": 4096 * (4096 + 8)}
    assert edge.kernel_command_line == "intel_iommu=on iommu=pt nvme_core.multipath=Y"


def test_controllers_share_a_named_subsystem(tmp_path: Path) -> None:
    bench = Bench("mp", (ControllerConfig("A", subsystem="s"),
                         ControllerConfig("B", subsystem="s")))
    devices = [a for a in bench.qemu_args(tmp_path) if a.startswith("nvme")]
    assert [d for d in devices if d.startswith("nvme-subsys")] == ["nvme-subsys,id=s,nqn=s"]
    assert sum(d.endswith(",subsys=s") for d in devices) == 2


def test_kernel_command_line_default() -> None:
    assert BENCHES["default"].kernel_command_line == "intel_iommu=on iommu=pt"


def test_vng_gets_the_bench_kernel_args(tmp_path: Path) -> None:
    from iommu_dma.testing import vm

    cmd = vm.vng_command(BENCHES["edge"], tmp_path, "true", tmp_path, TEST_KERNEL)
    assert "--append=intel_iommu=on iommu=pt nvme_core.multipath=Y" in cmd


@pytest.mark.parametrize("text, size", [("2G", 2 << 30), ("512M", 512 << 20), ("1024", 1 << 30),
                                        ("4GiB", 4 << 30), ("64k", 64 << 10)])
def test_memory_sizes(text: str, size: int) -> None:
    assert memory_bytes(text) == size


def test_faults_bench_layout() -> None:
    """tests/vm/test_fault_bench.py and others' removal tests index these: keep the layout."""
    faults = BENCHES["faults"]
    assert faults.memory == "2G" and faults.fault_injection
    c0, c1 = faults.controllers
    assert (c0.serial, c0.mdts, c0.max_ioqpairs, c0.hotplug) == ("IDMAF000", 5, 8, False)
    assert c0.namespaces == (
        NamespaceConfig(64 << 20, 4096, "file", read_errors=(1000, 5000, 12000),
                        write_errors=(3000,), stallable=True),
        NamespaceConfig(32 << 20, 4096, "file", stallable=True))
    assert (c1.serial, c1.hotplug) == ("IDMAF001", True)
    assert c1.namespaces == (NamespaceConfig(32 << 20, 4096, "file"),)
    assert not any(b.fault_injection for n, b in BENCHES.items() if n != "faults")


def _options(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_qemu_args_for_faults(tmp_path: Path) -> None:
    args = BENCHES["faults"].qemu_args(tmp_path)
    conf1, conf2 = tmp_path / "c0n1.blkdebug", tmp_path / "c0n2.blkdebug"
    assert _options(args, "-blockdev") == [
        # the raw format driver above blkdebug: only it raises read_aio/write_aio
        f"driver=raw,node-name=c0n1,discard=unmap,file.driver=blkdebug,file.config={conf1},"
        f"file.image.driver=file,file.image.filename={tmp_path / 'c0n1.img'}",
        f"driver=raw,node-name=c0n2,discard=unmap,file.driver=blkdebug,file.config={conf2},"
        f"file.image.driver=file,file.image.filename={tmp_path / 'c0n2.img'}",
        f"driver=raw,node-name=c1n1,discard=unmap,file.driver=file,"
        f"file.filename={tmp_path / 'c1n1.img'}",
    ]
    devices = _options(args, "-device")
    assert devices[1:] == [
        "nvme,id=nvme0,serial=IDMAF000,mdts=5,max_ioqpairs=8",
        "nvme-ns,id=c0n1dev,drive=c0n1,bus=nvme0,nsid=1,logical_block_size=4096,"
        "physical_block_size=4096",
        "nvme-ns,id=c0n2dev,drive=c0n2,bus=nvme0,nsid=2,logical_block_size=4096,"
        "physical_block_size=4096",
        # the hotplug controller behind its own root port
        "pcie-root-port,id=idma_rp1,chassis=2,slot=0",
        "nvme,id=nvme1,serial=IDMAF001,mdts=7,max_ioqpairs=64,bus=idma_rp1",
        "nvme-ns,id=c1n1dev,drive=c1n1,bus=nvme1,nsid=1,logical_block_size=4096,"
        "physical_block_size=4096",
        # the in-guest monitor's port, after the NVMe devices (their BDFs stay put)
        "virtio-serial-pci,id=idma_vser",
        "virtserialport,bus=idma_vser.0,chardev=idma_gport,name=org.iommu-dma.qmp",
    ]
    inner = tmp_path / "guest-qmp.sock"
    assert _options(args, "-chardev") == [
        f"socket,id=idma_qmp,path={tmp_path / 'qmp.sock'},server=on,wait=off",
        f"socket,id=idma_gqmp,path={inner},server=on,wait=off",
        f"socket,id=idma_gport,path={inner}",      # after its server: QEMU connects at start
    ]
    assert _options(args, "-mon") == ["chardev=idma_qmp,mode=control",
                                      "chardev=idma_gqmp,mode=control"]
    assert qmp_socket_path(tmp_path) == tmp_path / "qmp.sock"
    # sectors are 512 bytes: LBA 1000 of 4096-byte blocks is sector 8000
    text = conf1.read_text()
    assert text.count("[inject-error]") == 4
    assert ('[inject-error]\nevent = "read_aio"\niotype = "read"\nerrno = "5"\n'
            'sector = "8000"\nonce = "off"\n') in text
    for sector in (40000, 96000):
        assert f'sector = "{sector}"' in text
    assert ('event = "write_aio"\niotype = "write"\nerrno = "5"\nsector = "24000"\n'
            'once = "off"') in text
    assert conf2.read_text() == ""                     # stallable only: no rules
    assert (tmp_path / "c0n1.img").stat().st_size == 64 << 20


def test_blkdebug_sectors_for_512_byte_blocks(tmp_path: Path) -> None:
    ns = NamespaceConfig(1 << 20, 512, read_errors=(7,), write_errors=(9, 11))
    text = blkdebug_config(ns)
    assert [line for line in text.splitlines() if line.startswith("sector")] == [
        'sector = "7"', 'sector = "9"', 'sector = "11"']


def test_default_bench_gets_only_the_host_monitor(tmp_path: Path) -> None:
    args = BENCHES["default"].qemu_args(tmp_path)
    assert _options(args, "-chardev") == [
        f"socket,id=idma_qmp,path={tmp_path / 'qmp.sock'},server=on,wait=off"]
    assert not any("virtio-serial" in d or "pcie-root-port" in d
                   for d in _options(args, "-device"))
    assert not list(tmp_path.glob("*.blkdebug"))


def test_guest_script_names_the_monitor_port(tmp_path: Path) -> None:
    from iommu_dma.testing import vm

    vm.vng_command(BENCHES["faults"], tmp_path, "true", tmp_path, TEST_KERNEL)
    assert "export IOMMU_DMA_QMP=org.iommu-dma.qmp\n" in (tmp_path / "guest.sh").read_text()
    vm.vng_command(BENCHES["default"], tmp_path, "true", tmp_path, TEST_KERNEL)
    assert "IOMMU_DMA_QMP" not in (tmp_path / "guest.sh").read_text()


def test_run_prints_the_host_qmp_socket(tmp_path: Path) -> None:
    """A guest's output (vm.run_guest, under vm.run) starts with the monitor socket."""
    from iommu_dma.testing import vm

    lines: list[str] = []
    result = vm.run_guest(["sh", "-c", "echo guest output"], "faults", "true", work_dir=tmp_path,
                          timeout=60, on_line=lines.append, env=os.environ)
    assert result.returncode == 0
    sock = tmp_path / "qmp.sock"
    assert lines == [f"[iommu-dma] QMP monitor: {sock} (while the guest runs: "
                     f"python -m iommu_dma.testing.qmp {sock} query-status)", "guest output"]


def test_faults_json_round_trip_keeps_tuples() -> None:
    bench = BENCHES["faults"]
    back = Bench.from_json(bench.to_json())
    assert back == bench
    assert back.controllers[0].namespaces[0].read_errors == (1000, 5000, 12000)


def test_qemu_args_for_cmds(tmp_path: Path) -> None:
    """Zones, protection information and detached namespaces reach the nvme-ns options."""
    args = BENCHES["cmds"].qemu_args(tmp_path)
    ns = [a for a in args if a.startswith("nvme-ns,")]
    assert ns[0].endswith(",zoned=on,zoned.zone_size=1048576,zoned.zone_capacity=786432,"
                          "zoned.max_open=4,zoned.max_active=6")
    assert ns[2].endswith(",ms=8,mset=0,pi=1,pil=0")
    assert ns[3].endswith(",ms=16,mset=1,pi=3,pil=1")
    assert ns[-1].endswith(",detached=on")
    assert BENCHES["cmds"].controllers[0].namespaces[0].zones == 16


# ---- the bench kernel and virtio-iommu --------------------------------------------------------


def test_iommufd_benches_boot_the_bench_kernel(tmp_path: Path) -> None:
    for name, aw in (("iommufd", 48), ("iommufd39", 39)):
        bench = BENCHES[name]
        assert (bench.kernel, bench.iommu, bench.aw_bits) == ("bench", "intel", aw)
        assert len(bench.controllers) == 1 and len(bench.controllers[0].namespaces) == 2
        assert f"intel-iommu,intremap=on,aw-bits={aw}" in bench.qemu_args(tmp_path)
        assert bench.kernel_command_line == "intel_iommu=on iommu=pt"
    for bench in BENCHES.values():          # the older benches stay on the host's kernel
        if bench.name not in ("iommufd", "iommufd39", "virtio"):
            assert (bench.kernel, bench.iommu, bench.unsafe_interrupts) == ("host", "intel",
                                                                           False)


def test_virtio_bench_has_no_intel_iommu_and_the_unsafe_parameters(tmp_path: Path) -> None:
    bench = BENCHES["virtio"]
    args = bench.qemu_args(tmp_path)
    text = " ".join(args)
    assert "virtio-iommu-pci" in args and "intel-iommu" not in text
    assert text.index("virtio-iommu-pci") < text.index("nvme,")
    assert bench.kernel_command_line == ("iommu=pt iommufd.allow_unsafe_interrupts=1 "
                                         "vfio_iommu_type1.allow_unsafe_interrupts=1")
    safe = Bench("v", bench.controllers, kernel="bench", iommu="virtio")
    assert "allow_unsafe" not in safe.kernel_command_line
    assert Bench.from_json(bench.to_json()) == bench
    old = json.loads(BENCHES["default"].to_json())      # a file written before these fields
    for key in ("kernel", "iommu", "unsafe_interrupts"):
        del old[key]
    assert Bench.from_json(json.dumps(old)) == BENCHES["default"]


@pytest.mark.parametrize("make, message", [
    (lambda: Bench("b", (ControllerConfig("A"),), kernel="6.12"), "kernel must be 'host'"),
    (lambda: Bench("b", (ControllerConfig("A"),), iommu="amd"), "iommu must be 'intel'"),
    (lambda: Bench("b", (ControllerConfig("A"),), iommu="virtio"), "needs kernel='bench'"),
])
def test_bad_kernel_or_iommu_is_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_vng_boots_the_bench_kernel_without_modules(tmp_path: Path) -> None:
    from iommu_dma.testing import vm

    image = tmp_path / "bzImage"
    image.write_bytes(b"\0")
    probes = vm.HostProbes.reading({vm.BENCH_KERNEL_ENV: str(image)})
    assert vm.find_kernel(BENCHES["virtio"], probes) == image
    cmd = vm.vng_command(BENCHES["virtio"], tmp_path, "true", tmp_path, image)
    assert cmd[cmd.index("--run") + 1] == str(image) and "--skip-modules" in cmd
    assert any(a.startswith("--append=") and "iommufd.allow_unsafe_interrupts=1" in a
               for a in cmd)
    host = vm.vng_command(BENCHES["default"], tmp_path, "true", tmp_path, TEST_KERNEL)
    assert "--skip-modules" not in host and str(TEST_KERNEL) in host


def test_unbuilt_bench_kernel_fails_naming_make_bench_kernel() -> None:
    from iommu_dma.testing import vm

    probes = vm.HostProbes(which=lambda n: "/usr/bin/" + n, busybox=lambda: "/bin/busybox",
                           is_static=lambda p: True, vng=lambda: "/usr/bin/vng",
                           mem_available=lambda: 1 << 40,
                           bench_kernel=lambda: (None, "the bench kernel is not built"))
    with pytest.raises(vm.HostRequirementsError, match="make bench-kernel"):
        vm.check_host(BENCHES["iommufd"], probes)
    vm.check_host(BENCHES["default"], vm.HostProbes(**{**probes.__dict__,
                                                         "kernel": lambda: (Path("/k"), "")}))
    with pytest.raises(vm.VmError, match=r"bench 'virtio' boots the bench kernel.*make "
                                         r"bench-kernel"):
        vm.find_kernel(BENCHES["virtio"], probes)


def test_a_guest_died_unless_pytest_gave_its_own_status() -> None:
    from iommu_dma.testing.pytest_plugin import _pytest_ended

    assert all(_pytest_ended(rc) for rc in range(6))        # pytest's exit codes
    assert not any(_pytest_ended(rc) for rc in (255, 137, 139, -9, 6))
