"""Commands test engineers script, on the "cmds" bench's controller [2] (serial IDMAC002, in
NVM subsystem "idmacmds"; nsid 1 attached, nsid 2 allocated but detached at boot): Abort,
asynchronous events from the CLI, Namespace Attachment and the Identify lists, Copy, Write
Uncorrectable, Get/Set Features, and the commands QEMU 7.2 refuses (Namespace Management,
Sanitize, Device Self-test, Firmware, Security), reported by NVMe status name.

Every test leaves nsid 2 detached and the features as it found them.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.nvme import nsmgmt
from iommu_dma.nvme.constants import (
    FID_HOST_BEHAVIOR,
    FID_TEMPERATURE_THRESHOLD,
    FID_TIMESTAMP,
    LID_CHANGED_NS_LIST,
    ONCS_COPY,
    ONCS_WRITE_UNCORRECTABLE,
    SC_INVALID_OPCODE,
    SCT_GENERIC,
)
from iommu_dma.nvme.events import AEC_NAMESPACE_ATTRIBUTE, AET_NOTICE
from iommu_dma.nvme.features import get_feature, set_feature
from iommu_dma.nvme.namespace import InactiveNamespaceError
from iommu_dma.nvme.status import NvmeError
from iommu_dma.testing.bench import image_path
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="cmds")

CTRL = 2                    # IDMAC002
EVENT_TIMEOUT = 30.0
IOP = "Invalid Command Opcode (SCT 0x0, SC 0x01"


@pytest.fixture
def bdf(vfio_bdfs: list[str]) -> str:
    return vfio_bdfs[CTRL]


@pytest.fixture
def ctrl(bdf: str) -> Iterator[Controller]:
    with Controller.open(bdf) as c:
        c.recovery.retries = 0
        yield c


def _detach_if_attached(c: Controller) -> None:
    if 2 in c.active_namespaces():
        nsmgmt.detach_namespace(c, 2)


# ---- Abort ---------------------------------------------------------------------------------

def test_abort_answers_not_aborted(cli: Cli, ctrl: Controller, bdf: str) -> None:
    # QEMU 7.2 never aborts: CDW0 bit 0 = 1 ("command not aborted", Base §5.1)
    assert ctrl.abort(0, 0x1234) is False
    ctrl.close()
    r = cli.ok("abort", bdf, "-q", 0, "-c", 7, "-o", "json").json()
    assert r == {"sqid": 0, "cid": 7, "aborted": False, "cdw0_bit0": 1}
    assert "not aborted (CDW0 bit 0 = 1" in cli.ok("abort", bdf, "-c", 3).text
    # the CLI's own controller has no I/O queue 1: QEMU 7.2 refuses the SQID
    cli.fails("abort", bdf, "-q", 1, "-c", 7,
          message="Abort SQID 1 CID 7: Invalid Field in Command (SCT 0x0, SC 0x02, DNR)")


# ---- Namespace Attachment and the Identify lists ---------------------------------------------

def _changed_nsids(log: bytes) -> list[int]:
    return [n for n in struct.unpack_from("<1024I", log) if n]


def test_attach_do_io_detach(ctrl: Controller, idma_bench_images: Path) -> None:
    _detach_if_attached(ctrl)
    me = ctrl.identify.cntlid
    assert nsmgmt.subsystem_controllers(ctrl) == [me]                # CNS 13h
    assert nsmgmt.allocated_namespaces(ctrl) == [1, 2]               # CNS 10h
    assert ctrl.active_namespaces() == [1]                           # CNS 02h
    assert nsmgmt.attached_controllers(ctrl, 2) == []                # CNS 12h
    assert nsmgmt.attached_controllers(ctrl, 1) == [me]
    alloc = nsmgmt.identify_allocated(ctrl, 2)                       # CNS 11h
    assert (alloc.nsze, alloc.lba_size) == (4096, 4096)
    with pytest.raises(InactiveNamespaceError):
        ctrl.namespace(2)
    assert ctrl.events is not None
    aec = ctrl.events.config()
    ctrl.events.enable(AEC_NAMESPACE_ATTRIBUTE)
    try:
        nsmgmt.attach_namespace(ctrl, 2)
        ev = ctrl.events.get(timeout=EVENT_TIMEOUT)
        assert (ev.type, ev.info, ev.lid) == (AET_NOTICE, 0, LID_CHANGED_NS_LIST), ev
        assert ev.info_name == "Namespace Attribute Changed"
        assert _changed_nsids(ev.log) == [2]
        assert ctrl.active_namespaces() == [1, 2]
        assert nsmgmt.attached_controllers(ctrl, 2) == [me]
        with pytest.raises(NvmeError, match=r"Namespace Already Attached \(SCT 0x1, SC 0x18"):
            nsmgmt.attach_namespace(ctrl, 2)
        ns = ctrl.namespace(2)
        data = random.randbytes(4 * ns.lba_size)
        ns.write(8, data)
        assert ns.read(8, 4) == data
        with open(image_path(idma_bench_images, CTRL, 2), "rb") as f:
            f.seek(8 * ns.lba_size)
            assert f.read(len(data)) == data
        nsmgmt.detach_namespace(ctrl, 2)
        ev = ctrl.events.get(timeout=EVENT_TIMEOUT)
        assert ev.info_name == "Namespace Attribute Changed" and _changed_nsids(ev.log) == [2]
        assert ctrl.active_namespaces() == [1]
        with pytest.raises(InactiveNamespaceError):
            ctrl.namespace(2)
        with pytest.raises(NvmeError, match=r"Namespace Not Attached \(SCT 0x1, SC 0x1a"):
            nsmgmt.detach_namespace(ctrl, 2)
    finally:
        _detach_if_attached(ctrl)
        ctrl.events.configure(aec)


def test_attach_and_lists_from_the_cli(cli: Cli, bdf: str) -> None:
    try:
        assert cli.ok("list-ctrl", bdf, "-o", "json").json() == {
            "num_ctrl": 1, "ctrl_list": [{"ctrl_id": 0}]}
        assert cli.ok("list-ctrl", bdf, "-n", 2, "-o", "json").json()["num_ctrl"] == 0
        assert cli.ok("list-ns", bdf, "-a", "-o", "json").json()["nsid_list"] == [
            {"nsid": 1}, {"nsid": 2}]
        assert "attach-ns: Success, nsid:2 controllers:0" in cli.ok("attach-ns", bdf, "-n", 2).text
        assert cli.ok("list-ns", bdf, "-o", "json").json()["nsid_list"] == [{"nsid": 1},
                                                                         {"nsid": 2}]
        assert cli.ok("list-ctrl", bdf, "-n", 2).text.splitlines() == ["num of ctrls present: 1",
                                                                  "[   0]:0x0"]
        cli.fails("attach-ns", bdf, "-n", 2, message="Namespace Already Attached (SCT 0x1, SC 0x18")
        cli.ok("detach-ns", bdf, "-n", 2, "-c", 0)
        assert cli.ok("list-ns", bdf, "-o", "json").json()["nsid_list"] == [{"nsid": 1}]
        cli.fails("detach-ns", bdf, "-n", 2, message="Namespace Not Attached (SCT 0x1, SC 0x1a")
    finally:
        with Controller.open(bdf) as c:
            _detach_if_attached(c)


# ---- Copy, Write Uncorrectable ----------------------------------------------------------------

def test_copy_checked_in_the_backing_image(cli: Cli, ctrl: Controller, bdf: str,
                                           idma_bench_images: Path) -> None:
    assert ctrl.identify.oncs & ONCS_COPY
    ns = ctrl.namespace(1)
    a, b = random.randbytes(8 * 4096), random.randbytes(4 * 4096)
    ns.write(0, a)
    ns.write(100, b)
    ns.copy([(0, 8), (100, 4)], 200)
    img = image_path(idma_bench_images, CTRL, 1)
    with open(img, "rb") as f:
        f.seek(200 * 4096)
        assert f.read(12 * 4096) == a + b
    with pytest.raises(ValueError, match="outside namespace 1"):
        ns.copy([(0, 8)], ns.blocks - 4)
    ctrl.close()
    out = cli.ok("copy", bdf, "-n", 1, "-s", "100,0", "-b", "2,1", "-d", 300).text
    assert out.strip() == "copy: Success (2 range(s), 3 blocks to LBA 300)"
    with open(img, "rb") as f:
        f.seek(300 * 4096)
        assert f.read(3 * 4096) == b[:2 * 4096] + a[:4096]
    cli.fails("copy", bdf, "-n", 1, "-s", "0", "-b", "1,2", "-d", 300, message="one block count")


def test_write_uncorrectable(cli: Cli, ctrl: Controller, bdf: str) -> None:
    ns = ctrl.namespace(1)
    if ctrl.identify.oncs & ONCS_WRITE_UNCORRECTABLE:       # a later QEMU: the full cycle
        ns.write_uncorrectable(50, 1)
        with pytest.raises(NvmeError, match="Unrecovered Read Error"):
            ns.read(50, 1)
        ns.write(50, bytes(4096))
        assert ns.read(50, 1) == bytes(4096)
        return
    # QEMU 7.2: ONCS bit 1 clear, the opcode is refused
    with pytest.raises(NvmeError) as e:
        ns.write_uncorrectable(50, 1)
    assert (e.value.sct, e.value.sc) == (SCT_GENERIC, SC_INVALID_OPCODE)
    ctrl.close()
    cli.fails("write-uncor", bdf, "-n", 1, "-s", 50, "-c", 1,
          message=f"Write Uncorrectable nsid 1 LBAs 50+1: {IOP}")


# ---- what QEMU 7.2 refuses: named statuses ----------------------------------------------------

def test_unsupported_commands_are_named(cli: Cli, bdf: str, tmp_path: Path) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(bytes(range(256)) * 32)
    for argv, what in [
        (("create-ns", bdf, "-s", 1024, "-f", 0), "Namespace Management (create)"),
        (("delete-ns", bdf, "-n", 2, "--force"), "Namespace Management (delete) nsid 2"),
        (("sanitize", bdf, "-a", 2, "--force"), "Sanitize (block erase)"),
        (("device-self-test", bdf, "-s", 1), "Device Self-test STC 0x1 (short) nsid 0xffffffff"),
        (("fw-download", bdf, "--fw", fw, "--xfer", 4096),
         "Firmware Image Download offset 0 (4096 bytes)"),
        (("fw-commit", bdf, "--slot", 1, "--action", 1), "Firmware Commit slot 1 action 1"),
        (("security-send", bdf, "-p", 1, "-f", fw), "Security Send SECP 0x01 SPSP 0x0000"),
        (("security-recv", bdf, "-p", 0, "-x", 256), "Security Receive SECP 0x00 SPSP 0x0000"),
    ]:
        cli.fails(*argv, message=f"{what}: {IOP}")
    # the log pages of those commands: QEMU 7.2 knows neither
    cli.fails("self-test-log", bdf, message="Get Log Page LID 0x06: Invalid Field in Command")
    cli.fails("sanitize-log", bdf, message="Get Log Page LID 0x81: Invalid Field in Command")
    cli.fails("sanitize", bdf, "-a", 2, message="stdin is not a terminal")


# ---- Get / Set Features --------------------------------------------------------------------------

def test_get_every_feature(cli: Cli, bdf: str) -> None:
    feats = {f["feature_id"]: f for f in cli.ok("get-feature", bdf, "--all", "-o",
                                           "json").json()["features"]}
    assert feats[FID_TEMPERATURE_THRESHOLD]["fields"] == {"TMPTH": 343, "TMPSEL": 0, "THSEL": 0}
    assert feats[0x07]["fields"] == {"NSQ": 7, "NCQ": 7}             # max_ioqpairs=8
    assert feats[0x01]["fields"]["AB"] == 7
    assert len(bytes.fromhex(feats[FID_TIMESTAMP]["data"])) == 8
    assert len(bytes.fromhex(feats[FID_HOST_BEHAVIOR]["data"])) == 512
    assert feats[0x80]["error"] == "Invalid Field in Command"        # not in QEMU 7.2
    caps = cli.ok("get-feature", bdf, "-f", 4, "-s", 3, "-o", "json").json()
    assert caps["fields"] == {"saveable": False, "namespace_specific": False, "changeable": True}
    text = cli.ok("get-feature", bdf, "-f", 4).text.splitlines()
    assert text[0] == "get-feature:0x04 (Temperature Threshold), Current value:0x00000157"
    assert text[1].split() == ["TMPTH", ":", "343"]


def test_set_features(cli: Cli, ctrl: Controller, bdf: str, tmp_path: Path) -> None:
    temp = get_feature(ctrl, FID_TEMPERATURE_THRESHOLD).value
    behavior = get_feature(ctrl, FID_HOST_BEHAVIOR).data
    ctrl.close()
    try:
        r = cli.ok("set-feature", bdf, "-f", 4, "-v", 350, "-o", "json").json()
        assert r["fields"] == {"TMPTH": 350, "TMPSEL": 0, "THSEL": 0}
        assert cli.ok("get-feature", bdf, "-f", 4, "-o", "json").json()["value"] == 350
        cli.fails("set-feature", bdf, "-f", 4, "-v", 343, "--save",
              message="Feature Identifier Not Saveable (SCT 0x1, SC 0x0d")
        hb = tmp_path / "hb.bin"
        hb.write_bytes(b"\x01" + bytes(511))
        cli.ok("set-feature", bdf, "-f", FID_HOST_BEHAVIOR, "-d", hb)
        got = cli.ok("get-feature", bdf, "-f", FID_HOST_BEHAVIOR, "-o", "json").json()
        assert got["fields"]["acre"] == 1
        ts = tmp_path / "ts.bin"
        stamp = 1_700_000_000_000
        ts.write_bytes(struct.pack("<Q", stamp))
        cli.ok("set-feature", bdf, "-f", FID_TIMESTAMP, "-d", ts)
        # QEMU 7.2 restarts its timestamp at 0 whenever the controller is enabled (each CLI
        # process opens it again): a later process sees a few ms, origin 0 ...
        got = cli.ok("get-feature", bdf, "-f", FID_TIMESTAMP, "-o", "json").json()["fields"]
        assert got["timestamp_ms"] < 600_000 and got["timestamp_origin"] == 0
        with Controller.open(bdf) as c:         # ... one session sees what it set, origin 1
            set_feature(c, FID_TIMESTAMP, data=struct.pack("<Q", stamp))
            got = get_feature(c, FID_TIMESTAMP).fields()
        ms = got["timestamp_ms"]
        assert isinstance(ms, int) and stamp <= ms < stamp + 600_000
        assert got["timestamp_origin"] == 1
        cli.fails("set-feature", bdf, "-f", FID_TIMESTAMP, message="--data FILE")
    finally:
        with Controller.open(bdf) as c:
            set_feature(c, FID_TEMPERATURE_THRESHOLD, temp)
            set_feature(c, FID_HOST_BEHAVIOR, data=behavior)


# ---- asynchronous events from the CLI ------------------------------------------------------

def test_events_cli_sees_a_temperature_event(cli: Cli, bdf: str) -> None:
    # QEMU 7.2 boots with Namespace Attribute Notices on (current 0x100; SEL 1 default says 0)
    aec = cli.ok("get-feature", bdf, "-f", 0x0B, "-o", "json").json()["value"]
    r = cli.ok("events", bdf, "--count", 1, "--timeout", EVENT_TIMEOUT, "--set-feature", "4=0x100",
           "-o", "json")
    (ev,) = r.json()["events"]
    assert (ev["type"], ev["info"], ev["log_page"]) == (1, 1, 2), ev
    assert ev["type_name"] == "SMART / Health status"
    assert ev["info_name"] == "Temperature Threshold"
    assert ev["smart"]["temperature"] == 323 and ev["smart"]["critical_warning"] & 0x2
    assert "waiting up to" in r.err
    # restored afterwards
    assert cli.ok("get-feature", bdf, "-f", 4, "-o", "json").json()["value"] == 343
    assert cli.ok("get-feature", bdf, "-f", 0x0B, "-o", "json").json()["value"] == aec
    text = cli.ok("events", bdf, "--set-feature", "4=0x100", "--timeout", EVENT_TIMEOUT).text
    assert "SMART / Health status: Temperature Threshold (AET 0x1, AEI 0x01)" in text
    cli.fails("events", bdf, "--timeout", 1, message="0 of 1 asynchronous event(s) within 1 s",
          progress=1)                                  # the "waiting up to" line
