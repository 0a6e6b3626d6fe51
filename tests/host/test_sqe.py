"""SQE field layouts (NVMe Base 2.0 §4.2, §5; NVM Command Set 1.0 §3) and status decoding."""

from __future__ import annotations

import struct

import pytest

from iommu_dma.native import ffi
from iommu_dma.nvme import constants as C
from iommu_dma.nvme import sqe as S
from iommu_dma.nvme import status


def dwords(e: S.Sqe) -> tuple[int, ...]:
    """The 16 dwords of the packed entry."""
    data = e.pack()
    assert len(data) == 64
    return struct.unpack("<16I", data)


def test_common_layout_matches_native_struct() -> None:
    e = S.Sqe(0x7F, nsid=3, cdw2=4, cdw3=5, mptr=0x1122334455667788, prp1=0xA000,
              prp2=0xB000, cdw10=10, cdw11=11, cdw12=12, cdw13=13, cdw14=14, cdw15=15,
              fuse=1, psdt=2, cid=0xBEEF)
    d = dwords(e)
    assert d[0] == 0x7F | 1 << 8 | 2 << 14 | 0xBEEF << 16
    assert d[1:4] == (3, 4, 5)
    assert d[4] | d[5] << 32 == 0x1122334455667788
    assert (d[6] | d[7] << 32, d[8] | d[9] << 32) == (0xA000, 0xB000)
    assert d[10:] == (10, 11, 12, 13, 14, 15)
    c = ffi.new("struct idma_sqe *")
    ffi.memmove(c, e.pack(), 64)
    assert (c.cdw0, c.nsid, c.mptr, c.prp1, c.prp2, c.cdw10, c.cdw15) == (
        d[0], 3, 0x1122334455667788, 0xA000, 0xB000, 10, 15)
    assert S.Sqe.unpack(e.pack()) == e
    assert bytes(e) == e.pack()
    with pytest.raises(ValueError):
        S.Sqe.unpack(b"\0" * 63)


def test_read_write() -> None:
    d = dwords(S.read(1, 0x1_2345_6789, 8, fua=True, lr=True, prinfo=0b1010, dsm=0x42))
    assert d[0] == 0x02 and d[1] == 1
    assert (d[10], d[11]) == (0x2345_6789, 0x1)                   # SLBA
    assert d[12] == 7 | 0b1010 << 26 | 1 << 30 | 1 << 31           # NLB 0's based
    assert d[13] == 0x42
    d = dwords(S.write(2, 100, 65536, dtype=2, dspec=0x1234, dsm=3))
    assert d[0] == 0x01 and d[12] == 0xFFFF | 2 << 20 and d[13] == 0x1234 << 16 | 3
    with pytest.raises(ValueError):
        S.read(1, 0, 0)
    with pytest.raises(ValueError):
        S.read(1, 0, 65537)


def test_flush_write_zeroes_compare_verify() -> None:
    assert dwords(S.flush())[:2] == (0x00, 0xFFFFFFFF)
    d = dwords(S.write_zeroes(1, 5, 16, deallocate=True, fua=True))
    assert d[0] == 0x08 and d[10] == 5 and d[12] == 15 | 1 << 25 | 1 << 30
    d = dwords(S.compare(1, 9, 2, lr=True))
    assert d[0] == 0x05 and d[10] == 9 and d[12] == 1 | 1 << 31
    d = dwords(S.verify(1, 9, 4, prinfo=8))
    assert d[0] == 0x0C and d[12] == 3 | 8 << 26


def test_dataset_management() -> None:
    d = dwords(S.dataset_management(1, 3, deallocate=True, idr=True))
    assert d[0] == 0x09 and d[10] == 2 and d[11] == S.DSM_AD | S.DSM_IDR
    raw = S.dsm_ranges([(0x100, 8), (0x2_0000_0000, 16, 0xAA)])
    assert len(raw) == 32
    assert struct.unpack("<IIQIIQ", raw) == (0, 8, 0x100, 0xAA, 16, 0x2_0000_0000)
    with pytest.raises(ValueError):
        S.dataset_management(1, 257)


def test_identify_and_get_log_page() -> None:
    d = dwords(S.identify(0x01))
    assert d[0] == 0x06 and d[10] == 1 and d[1] == 0
    d = dwords(S.identify(0x05, nsid=2, cntid=7, cns_id=0x33, csi=2, uuid_index=5))
    assert d[1] == 2 and d[10] == 5 | 7 << 16 and d[11] == 0x33 | 2 << 24 and d[14] == 5
    # SMART log (02h), 512 bytes: NUMD = 127
    d = dwords(S.get_log_page(0x02, 512))
    assert d[0] == 0x02 and d[1] == 0xFFFFFFFF and d[10] == 0x02 | 127 << 16 and d[11] == 0
    big = 4 * 0x12345                            # NUMD 0x12344 splits into NUMDL/NUMDU
    d = dwords(S.get_log_page(0x0D, big, nsid=1, lsp=0x7F, rae=True, lsi=9,
                              offset=0x1_0000_0200, csi=1, ot=True, uuid_index=2))
    assert d[10] == 0x0D | 0x7F << 8 | 1 << 15 | 0x2344 << 16
    assert d[11] == 0x1 | 9 << 16
    assert (d[12], d[13]) == (0x200, 1)
    assert d[14] == 2 | 1 << 23 | 1 << 24
    with pytest.raises(ValueError):
        S.get_log_page(2, 6)


def test_features() -> None:
    d = dwords(S.set_features(0x07, (63 << 16) | 63, save=True))     # number of queues
    assert d[0] == 0x09 and d[10] == 0x07 | 1 << 31 and d[11] == 63 << 16 | 63
    d = dwords(S.get_features(C.FID_NUMBER_OF_QUEUES, sel=C.SEL_SAVED))
    assert d[0] == 0x0A and d[10] == 0x07 | 2 << 8


def test_queue_creation_and_deletion() -> None:
    d = dwords(S.create_io_cq(3, 1024, prp1=0x80000, ien=True, iv=5))
    assert d[0] == 0x05 and d[6] | d[7] << 32 == 0x80000
    assert d[10] == 3 | 1023 << 16 and d[11] == 1 | 1 << 1 | 5 << 16
    d = dwords(S.create_io_sq(3, 1024, cqid=3, prp1=0x90000, qprio=2, nvmsetid=1))
    assert d[0] == 0x01 and d[6] == 0x90000
    assert d[10] == 3 | 1023 << 16 and d[11] == 1 | 2 << 1 | 3 << 16 and d[12] == 1
    assert dwords(S.delete_io_sq(3))[0:1] + dwords(S.delete_io_sq(3))[10:11] == (0x00, 3)
    assert dwords(S.delete_io_cq(4))[0:1] + dwords(S.delete_io_cq(4))[10:11] == (0x04, 4)
    assert dwords(S.create_io_cq(1, 65536))[10] == 1 | 0xFFFF << 16


def test_format_nvm() -> None:
    d = dwords(S.format_nvm(1, 0x15, ses=1, pi=3, pil=True, mset=True))
    assert d[0] == 0x80 and d[1] == 1
    assert d[10] == 0x5 | 1 << 4 | 3 << 5 | 1 << 8 | 1 << 9 | 0x1 << 12
    with pytest.raises(ValueError):
        S.format_nvm(1, 64)


def test_status_decoding() -> None:
    raw = status.make_status(C.SC_UNRECOVERED_READ_ERROR, C.SCT_MEDIA, crd=2, more=True,
                             dnr=True)
    assert raw == 0x81 | 2 << 8 | 2 << 11 | 1 << 13 | 1 << 14
    st = status.decode_status(raw)
    assert (st.sc, st.sct, st.crd, st.more, st.dnr, st.ok) == (0x81, 2, 2, True, True, False)
    assert str(st) == "SCT 0x2 SC 0x81 CRD 2 MORE DNR"
    assert status.decode_status(0).ok and status.decode_status(1 << 13).ok   # More: success
    dw3 = 0x1234 | 1 << 16 | raw << 17
    assert status.status_from_dw3(dw3) == st
    with pytest.raises(ValueError):
        status.decode_status(1 << 15)
    with pytest.raises(ValueError):
        status.make_status(0x100)


def test_sqe_keeps_the_status_names_callers_import() -> None:
    """nvme/queue.py and the engine tests import these from sqe: the same objects."""
    assert (S.Status, S.decode_status, S.make_status, S.status_from_dw3) == (
        status.Status, status.decode_status, status.make_status, status.status_from_dw3)
    assert S.SCT_MEDIA == status.SCT_MEDIA == C.SCT_MEDIA == 2
    assert (S.OPC_READ, S.OPC_WRITE, S.OPC_FLUSH, S.NSID_ALL) == (
        C.OPC_READ, C.OPC_WRITE, C.OPC_FLUSH, C.NSID_ALL)


def test_constants_table() -> None:
    """Values from the spec's tables; the names other modules import."""
    assert (C.CNS_NAMESPACE, C.CNS_CONTROLLER, C.CNS_ACTIVE_NS_LIST) == (0x00, 0x01, 0x02)
    assert (C.LID_ERROR, C.LID_SMART, C.LID_FW_SLOT) == (0x01, 0x02, 0x03)
    assert C.FID_NUMBER_OF_QUEUES == 0x07
    assert (C.SCT_GENERIC, C.SCT_CMD_SPECIFIC, C.SCT_MEDIA, C.SCT_PATH) == (0, 1, 2, 3)
    assert C.SC_COMPARE_FAILURE == 0x85
    assert (C.MAX_NLB, C.DSM_MAX_RANGES) == (1 << 16, 256)
    assert (C.OACS_DBBUF, C.ONCS_COMPARE) == (1 << 8, 1 << 0)
    assert status.status_name(C.SCT_MEDIA, C.SC_COMPARE_FAILURE) == "Compare Failure"
    assert status.status_name(C.SCT_GENERIC, C.SC_LBA_OUT_OF_RANGE) == "LBA Out of Range"
    assert status.status_name(C.SCT_CMD_SPECIFIC, C.SC_INVALID_LOG_PAGE) == "Invalid Log Page"
    assert status.status_name(C.SCT_CMD_SPECIFIC, 0xBC) == "Zone Invalid Write"   # ZNS 1.1
    # every number of one family is distinct (a copy-paste slip would collide)
    for prefix in ("ADM_", "OPC_", "CNS_", "LID_", "FID_", "OACS_", "ONCS_"):
        values = [v for k, v in vars(C).items() if k.startswith(prefix)]
        assert len(values) == len(set(values)) > 1, prefix


def test_builders_use_the_limits() -> None:
    assert dwords(S.read(1, 0, C.MAX_NLB))[12] & 0xFFFF == 0xFFFF
    assert dwords(S.dataset_management(1, C.DSM_MAX_RANGES))[10] == 0xFF
    with pytest.raises(ValueError):
        S.write(1, 0, C.MAX_NLB + 1)
    with pytest.raises(ValueError):
        S.dataset_management(1, 0)
