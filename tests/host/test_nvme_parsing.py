"""Parsing of Identify data, log pages and status names (offsets from NVMe Base 2.0)."""

from __future__ import annotations

import struct

import pytest

from iommu_dma.nvme.constants import OACS_DBBUF, OACS_FORMAT_NVM, ONCS_COMPARE, ONCS_DSM
from iommu_dma.nvme.identify import (
    FirmwareSlotLog,
    IdentifyController,
    IdentifyNamespace,
    SmartLog,
    parse_error_log,
    parse_ns_list,
)
from iommu_dma.nvme.status import (
    NvmeError,
    decode_status,
    is_retryable,
    make_status,
    status_name,
)


def test_identify_controller_fields() -> None:
    raw = bytearray(4096)
    struct.pack_into("<HH", raw, 0, 0x1B36, 0x1AF4)
    raw[4:24] = b"IDMA0001".ljust(20)
    raw[24:64] = b"QEMU NVMe Ctrl".ljust(40)
    raw[64:72] = b"7.2.0".ljust(8)
    raw[77] = 5
    struct.pack_into("<HI", raw, 78, 7, 0x00010400)
    struct.pack_into("<I", raw, 516, 256)
    raw[768:768 + 21] = b"nqn.2019-08.org.qemu:"
    ctrl = IdentifyController.parse(bytes(raw))
    assert (ctrl.vid, ctrl.ssvid, ctrl.sn, ctrl.mn, ctrl.fr) == (
        0x1B36, 0x1AF4, "IDMA0001", "QEMU NVMe Ctrl", "7.2.0")
    assert (ctrl.mdts, ctrl.cntlid, ctrl.version, ctrl.nn) == (5, 7, "1.4.0", 256)
    assert ctrl.max_transfer(4096) == 128 * 1024
    assert ctrl.subnqn == "nqn.2019-08.org.qemu:"
    assert ctrl.to_dict()["sn"] == "IDMA0001" and "raw" not in ctrl.to_dict()


def test_identify_controller_optional_commands() -> None:
    raw = bytearray(4096)
    struct.pack_into("<H", raw, 256, OACS_DBBUF | OACS_FORMAT_NVM)
    struct.pack_into("<H", raw, 520, ONCS_COMPARE)
    ctrl = IdentifyController.parse(bytes(raw))
    assert ctrl.admin_supported(OACS_DBBUF) and ctrl.admin_supported(OACS_FORMAT_NVM)
    assert ctrl.compare_supported and not ctrl.nvm_supported(ONCS_DSM)
    assert not IdentifyController.parse(bytes(4096)).compare_supported


def test_identify_namespace_formats() -> None:
    raw = bytearray(4096)
    struct.pack_into("<QQQ", raw, 0, 16384, 16384, 100)
    raw[25] = 1                          # two formats (0's based)
    raw[26] = 1                          # format 1 in use
    struct.pack_into("<II", raw, 128, 9 << 16, 12 << 16 | 8)
    ns = IdentifyNamespace.parse(bytes(raw))
    assert (ns.nsze, ns.nuse, ns.nlbaf, ns.format_index) == (16384, 100, 1, 1)
    assert ns.lba_size == 4096 and ns.metadata_size == 8 and ns.active
    assert [f.size for f in ns.lbaf] == [512, 4096]
    assert not IdentifyNamespace.parse(bytes(4096)).active


def test_identify_namespace_distrusts_the_device() -> None:
    raw = bytearray(4096)
    struct.pack_into("<Q", raw, 0, 8)
    raw[25] = 255                        # more formats than the spec allows: 64 read
    assert len(IdentifyNamespace.parse(bytes(raw)).lbaf) == 64
    raw[25] = 0
    raw[26] = 3                          # FLBAS selects a format NLBAF does not list
    struct.pack_into("<I", raw, 128, 12 << 16)
    with pytest.raises(ValueError, match="LBA format 3"):
        _ = IdentifyNamespace.parse(bytes(raw)).lba_size
    raw[26] = 0
    struct.pack_into("<I", raw, 128, 40 << 16)     # a 2^40-byte block
    with pytest.raises(ValueError, match="LBADS 40"):
        _ = IdentifyNamespace.parse(bytes(raw)).lba_size


def test_smart_error_and_firmware_logs() -> None:
    smart = bytearray(512)
    smart[0] = 0x2
    struct.pack_into("<H", smart, 1, 323)
    smart[3] = 100
    struct.pack_into("<Q", smart, 64, 12345)      # host read commands, low 8 of 16 bytes
    struct.pack_into("<Q", smart, 160, 3)         # media errors
    s = SmartLog.parse(bytes(smart))
    assert (s.critical_warning, s.temperature, s.avail_spare) == (2, 323, 100)
    assert (s.host_read_commands, s.media_errors) == (12345, 3)

    err = bytearray(64 * 4)
    struct.pack_into("<QHHH", err, 0, 9, 1, 42, make_status(0x80) << 1 | 1)
    struct.pack_into("<QI", err, 16, 0xFFFF_0000, 1)
    entries = parse_error_log(bytes(err))
    assert len(entries) == 1
    assert (entries[0].error_count, entries[0].cmdid, entries[0].lba, entries[0].nsid) == (
        9, 42, 0xFFFF_0000, 1)
    assert status_name(0, entries[0].status_field & 0xFF) == "LBA Out of Range"

    fw = bytearray(512)
    fw[0] = 1
    fw[8:16] = b"1.0     "
    slots = FirmwareSlotLog.parse(bytes(fw))
    assert slots.active_slot == 1 and slots.frs[0] == "1.0" and slots.frs[1] == ""


def test_active_namespace_list_stops_at_zero() -> None:
    raw = struct.pack("<4I", 1, 2, 5, 0) + bytes(4096 - 16)
    assert parse_ns_list(raw) == [1, 2, 5]


def test_status_names_and_retry_rules() -> None:
    assert status_name(0, 0x80) == "LBA Out of Range"
    assert status_name(0, 0x02) == "Invalid Field in Command"
    assert status_name(1, 0x01) == "Invalid Queue Identifier"
    assert status_name(2, 0x85) == "Compare Failure"
    assert status_name(7, 0x10) == "Vendor Specific status 0x10"
    assert "Unknown status" in status_name(5, 0x33)
    assert is_retryable(decode_status(make_status(0x82)))          # Namespace Not Ready
    assert not is_retryable(decode_status(make_status(0x82, dnr=True)))
    assert is_retryable(decode_status(make_status(0x80)))          # DNR clear: retried
    assert not is_retryable(decode_status(make_status(0x07)))      # Abort Requested: final


def test_nvme_error_message_names_everything() -> None:
    e = NvmeError(make_status(0x80, dnr=True), "Read nsid=1 slba=999 nlb=8")
    assert str(e) == "Read nsid=1 slba=999 nlb=8: LBA Out of Range (SCT 0x0, SC 0x80, DNR)"
    assert (e.sct, e.sc, e.dnr, e.retryable, e.name) == (0, 0x80, True, False, "LBA Out of Range")


def test_identify_controller_crdt_at_bytes_133_128() -> None:
    raw = bytearray(4096)
    struct.pack_into("<HHHH", raw, 128, 3, 20, 0xFFFF, 9)   # CRDT1..3, then reserved
    assert IdentifyController.parse(bytes(raw)).crdt == (3, 20, 0xFFFF)
