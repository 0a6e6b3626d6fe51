"""Zoned Namespace and protection-information encodings against the specs' layouts (no
device): SQE fields, zone report parsing with a distrusted NRZ, Identify parsing, CRC-16
T10-DIF, PI tuples and the type rules."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from iommu_dma.nvme import pi, zns
from iommu_dma.nvme.namespace import Namespace
from iommu_dma.nvme.pi import PiFields, PiFormat, PiTuple, PiType, Prinfo
from iommu_dma.nvme.sqe import read
from iommu_dma.nvme.status import NvmeError, make_status


def test_zone_management_send_layout() -> None:
    cmd = zns.zone_mgmt_send(1, 0x1_0000_0100, zns.ZoneSendAction.RESET, select_all=True)
    assert cmd.opcode == 0x79 and cmd.nsid == 1
    assert (cmd.cdw10, cmd.cdw11) == (0x100, 0x1)                  # SLBA
    assert cmd.cdw13 == 0x04 | 1 << 8                              # ZSA, Select All
    assert zns.zone_mgmt_send(1, 0, zns.ZoneSendAction.OPEN).cdw13 == 0x03


def test_zone_management_receive_layout() -> None:
    cmd = zns.zone_mgmt_recv(2, 256, 4096, zrasf=zns.ReportOption.FULL, partial=True)
    assert cmd.opcode == 0x7A and cmd.cdw10 == 256
    assert cmd.cdw12 == 4096 // 4 - 1                              # NUMD, 0's based
    assert cmd.cdw13 == 0x00 | 0x5 << 8 | 1 << 16
    ext = zns.zone_mgmt_recv(2, 0, 128, zra=zns.ZoneReceiveAction.EXTENDED_REPORT_ZONES)
    assert ext.cdw13 == 0x01
    with pytest.raises(ValueError, match="multiple of 4"):
        zns.zone_mgmt_recv(2, 0, 66)


def test_zone_append_layout() -> None:
    cmd = zns.zone_append(1, 512, 8, fua=True, prinfo=0x9, ilbrt=0x1234, lbat=0xAB,
                          lbatm=0xFF)
    assert cmd.opcode == 0x7D and cmd.cdw10 == 512
    assert cmd.cdw12 == 7 | 0x9 << 26 | 1 << 30
    assert (cmd.cdw14, cmd.cdw15) == (0x1234, 0xFF << 16 | 0xAB)
    with pytest.raises(ValueError):
        zns.zone_append(1, 0, 0)


def _descriptor(zs: int, zcap: int, zslba: int, wp: int, za: int = 0) -> bytes:
    return struct.pack("<4B4xQQQ32x", 0x2, zs << 4, za, 0, zcap, zslba, wp)


def test_report_parsing_bounds_nrz() -> None:
    body = _descriptor(1, 192, 0, 0) + _descriptor(0xE, 192, 256, 448, za=1)
    raw = struct.pack("<Q56x", 1000) + body                       # NRZ lies: 1000
    zones = zns.parse_report(raw)
    assert len(zones) == 2                                         # what the buffer holds
    assert zones[0].state == zns.ZoneState.EMPTY and zones[0].zcap == 192
    assert (zones[1].state, zones[1].zslba, zones[1].wp, zones[1].za) == (
        zns.ZoneState.FULL, 256, 448, 1)
    assert len(zns.parse_report(raw, limit=1)) == 1
    assert zns.ZoneState.IMPLICITLY_OPENED.label == "IMP_OPENED"


def test_identify_zns_namespace_parsing() -> None:
    raw = bytearray(4096)
    struct.pack_into("<HHIIII", raw, 0, 1, 1, 5, 3, 7, 9)
    for i in range(8):
        struct.pack_into("<QB", raw, 2816 + 16 * i, 256, 0)
    ident = zns.ZnsIdentifyNamespace.parse(bytes(raw), nlbaf=7)
    assert (ident.zoc, ident.ozcs, ident.mar, ident.mor, ident.rrl, ident.frl) == (
        1, 1, 5, 3, 7, 9)
    assert (ident.max_active, ident.max_open) == (6, 4)
    assert len(ident.lbafe) == 8 and ident.lbafe[4] == zns.LbaFormatExtension(256, 0)
    assert ident.to_dict()["lbafe"][0] == {"zsze": 256, "zdes": 0}
    struct.pack_into("<II", raw, 4, 0xFFFF_FFFF, 0xFFFF_FFFF)
    assert zns.ZnsIdentifyNamespace.parse(bytes(raw), 300).max_open is None  # NLBAF bounded
    assert zns.ZnsIdentifyController.parse(bytes([7]) + bytes(4095)).zasl == 7


def test_identify_csi_sqes() -> None:
    ns = zns.identify_ns_sqe(1)
    assert ns.opcode == 0x06 and ns.cdw10 == 0x05 and ns.cdw11 == 0x02 << 24 and ns.nsid == 1
    assert zns.identify_ctrl_sqe().cdw10 == 0x06


def test_zoned_statuses_by_name() -> None:
    err = NvmeError(make_status(0xBC, 0x1, dnr=True), "Write nsid 1")
    assert err.name == "Zone Invalid Write"                   # named by status.py too
    with pytest.raises(zns.ZoneError) as e, zns.zone_statuses():
        raise err
    assert e.value.name == "Zone Invalid Write" and e.value.dnr
    assert "Write nsid 1: Zone Invalid Write (SCT 0x1, SC 0xbc, DNR)" == str(e.value)
    with pytest.raises(NvmeError) as e2, zns.zone_statuses():
        raise NvmeError(make_status(0x80, 0x0), "x")              # not zoned: unchanged
    assert not isinstance(e2.value, zns.ZoneError)


def test_crc16_t10dif() -> None:
    assert pi.crc16_t10dif(b"123456789") == 0xD0DB                # the CRC's check value
    assert pi.crc16_t10dif(bytes(4096)) == 0
    data = bytes(range(256)) * 2
    assert pi.crc16_t10dif(data[256:], pi.crc16_t10dif(data[:256])) == pi.crc16_t10dif(data)


def test_pi_tuple_big_endian() -> None:
    t = PiTuple(0x1234, 0x5678, 0x9ABCDEF0)
    assert t.pack() == bytes.fromhex("123456789abcdef0")
    assert PiTuple.unpack(t.pack()) == t


def test_pi_generate_and_check_type_rules() -> None:
    data = bytes(range(256)) * 32                                 # two 4 KiB blocks
    t1 = PiFormat(8, PiType.TYPE1, False)
    meta = t1.generate(data, 4096, 0x1_0000_0010, app_tag=0x42)
    tuples = t1.tuples(meta)
    assert [t.ref_tag for t in tuples] == [0x10, 0x11]             # low 32 bits of the LBA
    assert tuples[0].guard == pi.crc16_t10dif(data[:4096]) and tuples[0].app_tag == 0x42
    assert t1.check(data, meta, 4096, 0x1_0000_0010, app_tag=0x42) == []
    assert "reference tag" in t1.check(data, meta, 4096, 0x20, app_tag=0x42)[0]
    bad = bytearray(meta)
    bad[0] ^= 1
    assert "guard" in t1.check(data, bytes(bad), 4096, 0x1_0000_0010, app_tag=0x42)[0]
    t2 = PiFormat(8, PiType.TYPE2, False)
    assert [t.ref_tag for t in t2.tuples(t2.generate(data, 4096, 5, ilbrt=77))] == [77, 78]
    t3 = PiFormat(16, PiType.TYPE3, True)                          # PI first of 16 bytes
    m3 = t3.generate(data, 4096, 9, ilbrt=0xAA)
    assert len(m3) == 32 and m3[8:16] == bytes(8)
    assert t3.check(data, m3, 4096, 9, ilbrt=0xBB) == []           # type 3: no ref check
    # PI last of 16 bytes: the guard also covers the 8 metadata bytes before it
    tl = PiFormat(16, PiType.TYPE1, False)
    m = tl.generate(data[:4096], 4096, 0, metadata=b"\x01" * 8 + bytes(8))
    assert PiTuple.unpack(m[8:]).guard == pi.crc16_t10dif(b"\x01" * 8,
                                                          pi.crc16_t10dif(data[:4096]))


def test_extended_split_join() -> None:
    data, meta = b"a" * 512 + b"b" * 512, b"1" * 8 + b"2" * 8
    ext = pi.join_extended(data, meta, 512, 8)
    assert ext[512:520] == b"1" * 8 and len(ext) == 1040
    assert pi.split_extended(ext, 512, 8) == (data, meta)


def test_pi_fields_in_the_sqe() -> None:
    f = PiFields(int(Prinfo.PRACT | Prinfo.PRCHK_GUARD), ilbrt=100, lbat=0x12, lbatm=0xFFFF)
    cmd = f.apply(read(1, 100, 8), block_offset=32, pi_type=PiType.TYPE1)
    assert (cmd.cdw12 >> 26) & 0xF == 0xC and cmd.cdw12 & 0xFFFF == 7
    assert cmd.cdw14 == 132 and cmd.cdw15 == 0xFFFF0012
    assert f.apply(read(1, 100, 8), 32, PiType.TYPE3).cdw14 == 100
    with pytest.raises(ValueError, match="ilbrt"):
        PiFields(0, ilbrt=1 << 32)


def _ns(ms: int, extended: bool, pi_type: int, pil: bool = False) -> Namespace:
    """A Namespace's format fields only (no controller): what protection() and
    _check_metadata() decide from."""
    ns = Namespace.__new__(Namespace)
    ns.nsid, ns.ms, ns.extended, ns.lba_size = 1, ms, extended, 4096
    ns.block_bytes = 4096 + (ms if extended else 0)
    ns.pi = PiFormat(ms, PiType(pi_type), pil) if pi_type else None
    ns.identify = SimpleNamespace(dps=pi_type | pil << 3, format_index=0)  # type: ignore[assignment]
    return ns


def test_namespace_protection_defaults() -> None:
    t1 = _ns(8, False, 1)
    f = t1.protection(0x1_0000_0005)
    assert f == PiFields(int(Prinfo.PRACT | Prinfo.PRCHK_GUARD | Prinfo.PRCHK_REF), 5)
    assert t1.protection(5, metadata=True) == PiFields(0, 5)     # host PI: no PRACT
    assert t1.protection(5, prinfo=0).prinfo == 0
    t3 = _ns(16, True, 3, pil=True)
    assert t3.protection(9) == PiFields(0, 9)                     # 16 bytes: no PRACT default
    plain = _ns(0, False, 0)
    assert plain.protection(9) == PiFields()
    with pytest.raises(ValueError, match="not formatted with protection information"):
        plain.protection(9, prinfo=Prinfo.PRCHK_GUARD)


def test_namespace_metadata_buffer_rules() -> None:
    sep = _ns(8, False, 0)                                        # metadata, no PI
    with pytest.raises(ValueError, match=r"separate buffer \(MPTR\); pass metadata="):
        sep._check_metadata(None, PiFields(), 1, "Read")
    t1 = _ns(8, False, 1)
    assert t1._check_metadata(None, t1.protection(0), 1, "Read") == 0   # PRACT strips
    with pytest.raises(ValueError, match="inserts/strips the PI"):
        t1._check_metadata(bytearray(8), t1.protection(0), 1, "Write")
    ext = _ns(16, True, 3, pil=True)
    with pytest.raises(ValueError, match="has no separate metadata"):
        ext._check_metadata(bytearray(16), PiFields(), 1, "Write")
