"""Bench configurations turn into the right QEMU options (no guest needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iommu_dma.testing.bench import (
    BENCHES,
    Bench,
    ControllerConfig,
    NamespaceConfig,
    memory_bytes,
    subsystem_nqn,
)


def test_qemu_args_for_two_controllers(tmp_path: Path) -> None:
    args = BENCHES["two_ctrl"].qemu_args(tmp_path)
    text = " ".join(args)
    assert "intel-iommu,intremap=on,aw-bits=48" in text
    assert "nvme,id=nvme0,serial=IDMAA001,mdts=5" in text
    assert "nvme,id=nvme1,serial=IDMAB002,mdts=6" in text
    assert "nvme-ns,drive=c1n1,bus=nvme1,nsid=1,logical_block_size=512" in text
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
        "nvme-ns,drive=c0n1,bus=nvme0,nsid=1,logical_block_size=4096,physical_block_size=4096",
        # the subsystem precedes the controller that names it
        f"nvme-subsys,id={name},nqn={name}",
        f"nvme,id=nvme1,serial=IDMAE001,mdts=7,max_ioqpairs=8,subsys={name}",
        "nvme-ns,drive=c1n1,bus=nvme1,nsid=1,logical_block_size=4096,physical_block_size=4096",
        "nvme,id=nvme2,serial=IDMAE002,mdts=7,max_ioqpairs=8",
        "nvme-ns,drive=c2n1,bus=nvme2,nsid=1,logical_block_size=4096,physical_block_size=4096,"
        "ms=8,mset=0",
        "nvme-ns,drive=c2n2,bus=nvme2,nsid=2,logical_block_size=4096,physical_block_size=4096,"
        "ms=8,mset=1",
    ]
    assert subsystem_nqn(name) == f"nqn.2019-08.org.qemu:{name}"
    # file images in the work dir; QEMU keeps the metadata after the data, in the same image
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
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


def test_vng_gets_the_bench_kernel_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iommu_dma.testing import vm

    monkeypatch.setattr(vm, "find_kernel", lambda: Path("/boot/vmlinuz-test"))
    cmd = vm.vng_command(BENCHES["edge"], tmp_path, "true", tmp_path)
    assert "--append=intel_iommu=on iommu=pt nvme_core.multipath=Y" in cmd


@pytest.mark.parametrize("text, size", [("2G", 2 << 30), ("512M", 512 << 20), ("1024", 1 << 30),
                                        ("4GiB", 4 << 30), ("64k", 64 << 10)])
def test_memory_sizes(text: str, size: int) -> None:
    assert memory_bytes(text) == size
