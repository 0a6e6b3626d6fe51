"""Bench configurations turn into the right QEMU options (no guest needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iommu_dma.testing.bench import BENCHES, Bench, ControllerConfig, NamespaceConfig


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
    ],
)
def test_bad_configuration_is_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
