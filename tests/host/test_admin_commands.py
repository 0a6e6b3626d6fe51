"""Layouts of the commands test engineers script, checked against the NVMe Base 2.0 and NVM
Command Set 1.0 figures (dword by dword), their data structures, and the CLI's checks done
before any device is touched."""

from __future__ import annotations

import struct

import pytest

from iommu_dma.cli.main import main
from iommu_dma.nvme import constants as C
from iommu_dma.nvme import features, nsmgmt, sanitize, selftest
from iommu_dma.nvme import sqe as S


def cdws(e: S.Sqe) -> tuple[int, ...]:
    """(opcode, NSID, CDW10..CDW15) as the controller reads them from the packed entry."""
    raw = e.pack()
    assert len(raw) == 64
    cdw0, nsid = struct.unpack_from("<II", raw)
    return (cdw0 & 0xFF, nsid, *struct.unpack_from("<6I", raw, 40))


# ---- admin commands ---------------------------------------------------------------------------

def test_abort() -> None:
    # Base §5.1: CDW10 SQID 15:0, CID 31:16
    assert cdws(S.abort(3, 0xABC)) == (0x08, 0, 0x0ABC_0003, 0, 0, 0, 0, 0)


def test_namespace_management_and_attachment() -> None:
    # Base §5.20: CDW10 SEL 3:0, CDW11 CSI 31:24; §5.19: CDW10 SEL 3:0
    assert cdws(S.namespace_management(0, csi=2)) == (0x0D, 0, 0, 0x0200_0000, 0, 0, 0, 0)
    assert cdws(S.namespace_management(1, nsid=5)) == (0x0D, 5, 1, 0, 0, 0, 0, 0)
    assert cdws(S.namespace_attachment(2, 0)) == (0x15, 2, 0, 0, 0, 0, 0, 0)
    assert cdws(S.namespace_attachment(2, 1)) == (0x15, 2, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="SEL=16"):
        S.namespace_management(16)


def test_controller_list_layout_and_parse() -> None:
    # Base §4.5.1: u16 count, then the identifiers in ascending order; 4096 bytes
    data = S.controller_list([5, 1])
    assert len(data) == 4096 and data[:6] == struct.pack("<3H", 2, 1, 5)
    assert not any(data[6:])
    assert nsmgmt.parse_controller_list(data) == [1, 5]
    # a count larger than the page holds is bounded, not trusted
    assert len(nsmgmt.parse_controller_list(b"\xff\xff" + bytes(4094))) == 2047
    with pytest.raises(ValueError, match="1..2047 controller IDs"):
        S.controller_list([])
    with pytest.raises(ValueError, match="CNTLID=65536"):
        S.controller_list([1 << 16])


def test_create_namespace_data() -> None:
    # Base §5.20.1: NSZE 7:0, NCAP 15:8, FLBAS 26, DPS 29, NMIC 30, ANAGRPID 95:92,
    # NVMSETID 101:100, ENDGID 103:102
    d = nsmgmt.create_data(1000, 900, 4, dps=1, nmic=1, anagrpid=7, nvmsetid=2, endgid=3)
    assert len(d) == 4096
    assert struct.unpack_from("<QQ", d) == (1000, 900)
    assert (d[26], d[29], d[30]) == (4, 1, 1)
    assert struct.unpack_from("<I", d, 92) == (7,)
    assert struct.unpack_from("<HH", d, 100) == (2, 3)
    with pytest.raises(ValueError, match="capacity at most the size"):
        nsmgmt.create_data(10, 11, 0)
    with pytest.raises(ValueError, match="FLBAS=256"):
        nsmgmt.create_data(10, 10, 256)


def test_sanitize_self_test_firmware_security() -> None:
    # Base §5.24: SANACT 2:0, AUSE 3, OWPASS 7:4, OIPBP 8, NDAS 9; CDW11 OVRPAT
    assert cdws(S.sanitize(3, ause=True, owpass=15, oipbp=True, ndas=True, ovrpat=0xDEADBEEF)) \
        == (0x84, 0, 0x3FB, 0xDEADBEEF, 0, 0, 0, 0)
    # Base §5.10: STC 3:0, NSID
    assert cdws(S.device_self_test(2)) == (0x14, 0xFFFFFFFF, 2, 0, 0, 0, 0, 0)
    assert cdws(S.device_self_test(0xF, 0)) == (0x14, 0, 0xF, 0, 0, 0, 0, 0)
    # Base §5.13: NUMD 0's based dwords, OFST in dwords
    assert cdws(S.fw_image_download(4096, 8192)) == (0x11, 0, 1023, 2048, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        S.fw_image_download(6, 0)
    # Base §5.12: FS 2:0, CA 5:3, BPID 31
    assert cdws(S.fw_commit(2, 3)) == (0x10, 0, 2 | 3 << 3, 0, 0, 0, 0, 0)
    assert cdws(S.fw_commit(0, 6, bpid=1)) == (0x10, 0, 6 << 3 | 1 << 31, 0, 0, 0, 0, 0)
    # Base §5.25/§5.26: NSSF 7:0, SPSP0 15:8, SPSP1 23:16, SECP 31:24; CDW11 TL / AL
    assert cdws(S.security_send(0xEA, 0x1234, 512, nssf=9)) == (
        0x81, 0, 0xEA12_3409, 512, 0, 0, 0, 0)
    assert cdws(S.security_receive(0x01, 0x0001, 2048)) == (0x82, 0, 0x0100_0100, 2048,
                                                            0, 0, 0, 0)


def test_features_encoding_and_names() -> None:
    # Base §5.27: CDW10 FID 7:0, SV 31; §5.15: SEL 10:8
    assert cdws(S.set_features(C.FID_TEMPERATURE_THRESHOLD, 0x100, save=True)) == (
        0x09, 0, 0x8000_0004, 0x100, 0, 0, 0, 0)
    assert cdws(S.get_features(C.FID_HOST_BEHAVIOR, sel=3)) == (0x0A, 0, 0x316, 0, 0, 0, 0, 0)
    assert features.feature_name(0x0E) == "Timestamp"
    assert features.feature_name(0xC5) == "Vendor Specific feature 0xc5"
    assert features.feature_info(C.FID_HOST_BEHAVIOR).data_len == 512
    assert features.feature_info(C.FID_LBA_RANGE_TYPE).ns_specific
    assert features.decode_fields(C.FID_TEMPERATURE_THRESHOLD, 0x15_0157) == {
        "TMPTH": 0x157, "TMPSEL": 5, "THSEL": 1}
    assert features.decode_fields(C.FID_NUMBER_OF_QUEUES, 0x0003_0007) == {"NSQ": 7, "NCQ": 3}
    assert features.decode_capabilities(5) == {"saveable": True, "namespace_specific": False,
                                               "changeable": True}


def test_feature_data_decoding() -> None:
    ts = struct.pack("<Q", 1234 | 1 << 48 | 1 << 49)
    assert features.decode_data(C.FID_TIMESTAMP, ts) == {
        "timestamp_ms": 1234, "synch": 1, "timestamp_origin": 1}
    assert features.decode_data(C.FID_HOST_BEHAVIOR, b"\x01" + bytes(511))["acre"] == 1
    apst = struct.pack("<Q", 3 << 3 | 100 << 8) + bytes(248)
    assert features.decode_data(C.FID_APST, apst)["entries"][0] == {"itps": 3, "itpt": 100}
    lba = bytearray(4096)
    struct.pack_into("<BB14xQQ", lba, 64, 2, 1, 1000, 99)         # entry 1: 100 blocks
    assert features.decode_data(C.FID_LBA_RANGE_TYPE, bytes(lba)) == {
        "ranges": [{"type": 2, "attributes": 1, "slba": 1000, "nlb": 100}]}


# ---- I/O commands ---------------------------------------------------------------------------

def test_copy_and_write_uncorrectable() -> None:
    # NVM §3.3.1: CDW10-11 SDLBA, CDW12 NR 7:0 (0's based), DF 11:8, PRINFOR 15:12, DTYPE
    # 23:20, PRINFOW 29:26, FUA 30, LR 31; CDW13 DSPEC 31:16
    e = S.copy(1, 0x1_0000_0002, 3, prinfor=0xF, prinfow=0x5, fua=True, lr=True, dtype=2,
               dspec=9)
    assert cdws(e) == (0x19, 1, 2, 1, 2 | 0xF << 12 | 2 << 20 | 5 << 26 | 1 << 30 | 1 << 31,
                       9 << 16, 0, 0)
    with pytest.raises(ValueError, match="nr=257"):
        S.copy(1, 0, 257)
    # Source Range Entry format 0 (32 bytes): SLBA 15:8, NLB 17:16 (0's based)
    r = S.copy_ranges([(7, 1), (0x1122334455, 65536)])
    assert len(r) == 64
    assert struct.unpack_from("<8xQH14x", r, 0) == (7, 0)
    assert struct.unpack_from("<8xQH14x", r, 32) == (0x1122334455, 0xFFFF)
    with pytest.raises(ValueError, match="nlb=65537"):
        S.copy_ranges([(0, 65537)])
    # NVM §3.3.7: SLBA, NLB 15:0 (0's based)
    assert cdws(S.write_uncorrectable(2, 5, 8)) == (0x04, 2, 5, 0, 7, 0, 0, 0)


# ---- log pages --------------------------------------------------------------------------------

def test_self_test_log_parse() -> None:
    raw = bytearray(selftest.LOG_SIZE)
    raw[0], raw[1] = 0x1, 40                              # a short test, 40% done
    for i in range(selftest.RESULTS):
        raw[4 + i * 28] = 0xF                              # unused
    struct.pack_into("<BBBBQIQBB", raw, 4, 0x27, 3, 0xF, 0, 1000, 1, 0x55, 2, 0x81)
    log = selftest.parse_self_test_log(bytes(raw))
    assert (log.current_operation, log.completion) == (1, 40)
    (r,) = log.results
    assert (r.result, r.code, r.segment, r.power_on_hours, r.nsid, r.failing_lba, r.sct, r.sc) \
        == (7, 2, 3, 1000, 1, 0x55, 2, 0x81)
    assert r.result_name == "completed with one or more failed segments"
    with pytest.raises(ValueError, match="expected 564"):
        selftest.parse_self_test_log(bytes(100))


def test_sanitize_status_parse() -> None:
    st = sanitize.parse_sanitize_status(struct.pack("<HHI", 0x8000, 2, 0x204) + bytes(504))
    assert (st.sprog, st.sstat, st.scdw10, st.state) == (0x8000, 2, 0x204, "in progress")


# ---- the CLI refuses bad input before touching a device ----------------------------------

@pytest.mark.parametrize("argv, message", [
    (["abort", "00:04.0", "-c", str(1 << 16)], "must be in 0..65535"),
    (["events", "00:04.0", "--set-feature", "4"], "give FID=VALUE"),
    (["events", "00:04.0", "--timeout", "0"], "above 0"),
    (["attach-ns", "00:04.0", "-n", "2", "-c", "a,b"], "comma-separated list"),
    (["copy", "00:04.0", "-n", "1", "-s", "0", "-b", "-1", "-d", "0"], "non-negative"),
    (["sanitize", "00:04.0", "-a", "5"], "must be in 1..4"),
    (["fw-commit", "00:04.0", "-a", "8"], "must be in 0..7"),
    (["device-self-test", "00:04.0", "-s", "16"], "must be in 0..15"),
    (["get-feature", "00:04.0", "-f", "4", "--all"], "not allowed with"),
    (["get-feature", "00:04.0", "-f", "3", "-l", "4097"], "must be in 0..4096"),
    (["set-feature", "00:04.0", "-f", "4", "-v", str(1 << 32)], "0..0xffffffff"),
])
def test_bad_arguments_are_usage_errors(argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
