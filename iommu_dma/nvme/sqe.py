"""64-byte NVMe Submission Queue Entries (pure Python).

Layouts: NVMe Base 2.0 §4.2 (common SQE), §5 (admin commands) and NVM Command Set 1.0 §3
(I/O commands). Builders leave the CID and the data pointer (PRP1/PRP2) at zero: the queue
engine assigns the CID and builds PRPs from the data buffer handed with the command.
Counts given to builders are natural numbers; the 0's based fields are derived here.
Opcodes and other numbers come from iommu_dma.nvme.constants; status decoding lives in
iommu_dma.nvme.status (Status, decode_status, make_status and status_from_dw3 are
re-exported here for existing callers).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from iommu_dma.nvme.constants import (
    ADM_ABORT,
    ADM_CREATE_IO_CQ,
    ADM_CREATE_IO_SQ,
    ADM_DELETE_IO_CQ,
    ADM_DELETE_IO_SQ,
    ADM_DEVICE_SELF_TEST,
    ADM_FORMAT_NVM,
    ADM_FW_COMMIT,
    ADM_FW_IMAGE_DOWNLOAD,
    ADM_GET_FEATURES,
    ADM_GET_LOG_PAGE,
    ADM_IDENTIFY,
    ADM_NS_ATTACHMENT,
    ADM_NS_MANAGEMENT,
    ADM_SANITIZE,
    ADM_SECURITY_RECEIVE,
    ADM_SECURITY_SEND,
    ADM_SET_FEATURES,
    DSM_AD,
    DSM_IDR,
    DSM_IDW,
    DSM_MAX_RANGES,
    MAX_NLB,
    NSID_ALL,
    OPC_COMPARE,
    OPC_COPY,
    OPC_DSM,
    OPC_FLUSH,
    OPC_READ,
    OPC_VERIFY,
    OPC_WRITE,
    OPC_WRITE_UNCORRECTABLE,
    OPC_WRITE_ZEROES,
    SEL_CURRENT,
)
from iommu_dma.nvme.constants import SCT_MEDIA as SCT_MEDIA
from iommu_dma.nvme.status import Status as Status
from iommu_dma.nvme.status import decode_status as decode_status
from iommu_dma.nvme.status import make_status as make_status
from iommu_dma.nvme.status import status_from_dw3 as status_from_dw3

SQE_SIZE = 64
_SQE = struct.Struct("<4I3Q6I")     # CDW0, NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10..CDW15


@dataclass
class Sqe:
    """One Submission Queue Entry (NVMe Base 2.0 §4.2, Figure 88)."""

    opcode: int
    nsid: int = 0
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    fuse: int = 0          # CDW0 9:8
    psdt: int = 0          # CDW0 15:14 (0 = PRPs)
    cid: int = 0           # CDW0 31:16, normally assigned by the queue engine

    @property
    def cdw0(self) -> int:
        return ((self.opcode & 0xFF) | (self.fuse & 0x3) << 8 | (self.psdt & 0x3) << 14
                | (self.cid & 0xFFFF) << 16)

    def pack(self) -> bytes:
        """The 64 little-endian bytes the controller fetches."""
        return _SQE.pack(self.cdw0, self.nsid, self.cdw2, self.cdw3, self.mptr, self.prp1,
                         self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13,
                         self.cdw14, self.cdw15)

    def __bytes__(self) -> bytes:
        return self.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Sqe:
        if len(data) != SQE_SIZE:
            raise ValueError(f"an SQE is {SQE_SIZE} bytes, got {len(data)}")
        cdw0, nsid, cdw2, cdw3, mptr, prp1, prp2, c10, c11, c12, c13, c14, c15 = _SQE.unpack(data)
        return cls(cdw0 & 0xFF, nsid, cdw2, cdw3, mptr, prp1, prp2, c10, c11, c12, c13, c14, c15,
                   fuse=(cdw0 >> 8) & 0x3, psdt=(cdw0 >> 14) & 0x3, cid=cdw0 >> 16)


def _check(name: str, value: int, bits: int, low: int = 0) -> int:
    if not low <= value < (1 << bits) + low:
        raise ValueError(f"{name}={value} out of range [{low}, {(1 << bits) + low - 1}]")
    return value


def _nlb(nlb: int) -> int:
    """CDW12 15:0: number of logical blocks, 0's based (1..MAX_NLB; NVM Command Set 1.0 §3)."""
    return _check("nlb", nlb, MAX_NLB.bit_length() - 1, low=1) - 1


def _slba(sqe: Sqe, slba: int) -> Sqe:
    """CDW10-11: starting LBA."""
    _check("slba", slba, 64)
    sqe.cdw10, sqe.cdw11 = slba & 0xFFFFFFFF, slba >> 32
    return sqe


def _cdw12(nlb: int, *, fua: bool = False, lr: bool = False, prinfo: int = 0,
           stc: bool = False, dtype: int = 0, deac: bool = False) -> int:
    """CDW12 of Read/Write/Compare/Verify/Write Zeroes: NLB 15:0, DTYPE 23:20, STC 24,
    DEAC 25 (Write Zeroes), PRINFO 29:26, FUA 30, LR 31."""
    return (_nlb(nlb) | _check("dtype", dtype, 4) << 20 | int(stc) << 24 | int(deac) << 25
            | _check("prinfo", prinfo, 4) << 26 | int(fua) << 30 | int(lr) << 31)


# ---- NVM I/O commands (NVM Command Set 1.0 §3) ----

def read(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
         prinfo: int = 0, dsm: int = 0) -> Sqe:
    """Read 02h: CDW12 LR/FUA/PRINFO/NLB, CDW13 7:0 dataset management hints."""
    sqe = Sqe(OPC_READ, nsid, cdw12=_cdw12(nlb, fua=fua, lr=lr, prinfo=prinfo),
              cdw13=_check("dsm", dsm, 8))
    return _slba(sqe, slba)


def write(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
          prinfo: int = 0, dtype: int = 0, dspec: int = 0, dsm: int = 0) -> Sqe:
    """Write 01h: CDW12 adds DTYPE 23:20; CDW13 DSPEC 31:16, DSM 7:0."""
    sqe = Sqe(OPC_WRITE, nsid, cdw12=_cdw12(nlb, fua=fua, lr=lr, prinfo=prinfo, dtype=dtype),
              cdw13=_check("dspec", dspec, 16) << 16 | _check("dsm", dsm, 8))
    return _slba(sqe, slba)


def flush(nsid: int = NSID_ALL) -> Sqe:
    """Flush 00h: no command-specific dwords."""
    return Sqe(OPC_FLUSH, nsid)


def write_zeroes(nsid: int, slba: int, nlb: int, *, deallocate: bool = False,
                 fua: bool = False, lr: bool = False, prinfo: int = 0) -> Sqe:
    """Write Zeroes 08h: no data; CDW12 DEAC bit 25 may deallocate the blocks."""
    sqe = Sqe(OPC_WRITE_ZEROES, nsid,
              cdw12=_cdw12(nlb, fua=fua, lr=lr, prinfo=prinfo, deac=deallocate))
    return _slba(sqe, slba)


def compare(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
            prinfo: int = 0) -> Sqe:
    """Compare 05h: the data buffer holds the expected blocks."""
    sqe = Sqe(OPC_COMPARE, nsid, cdw12=_cdw12(nlb, fua=fua, lr=lr, prinfo=prinfo))
    return _slba(sqe, slba)


def verify(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
           prinfo: int = 0) -> Sqe:
    """Verify 0Ch: integrity check of the blocks, no data transfer."""
    sqe = Sqe(OPC_VERIFY, nsid, cdw12=_cdw12(nlb, fua=fua, lr=lr, prinfo=prinfo))
    return _slba(sqe, slba)


def dataset_management(nsid: int, nr: int, *, deallocate: bool = False, idr: bool = False,
                       idw: bool = False) -> Sqe:
    """Dataset Management 09h: CDW10 NR 7:0 (ranges, 0's based); CDW11 IDR/IDW/AD.
    The data buffer holds `nr` 16-byte ranges (see dsm_ranges)."""
    attrs = (DSM_AD if deallocate else 0) | (DSM_IDR if idr else 0) | (DSM_IDW if idw else 0)
    nr_bits = DSM_MAX_RANGES.bit_length() - 1
    return Sqe(OPC_DSM, nsid, cdw10=_check("nr", nr, nr_bits, low=1) - 1, cdw11=attrs)


def dsm_ranges(ranges: Sequence[tuple[int, ...]]) -> bytes:
    """Pack DSM ranges, each (slba, nlb) or (slba, nlb, context attributes), as 16-byte
    entries CATTR u32, NLB u32, SLBA u64 (NVM Command Set 1.0 §3, DSM range)."""
    if not 1 <= len(ranges) <= DSM_MAX_RANGES:
        raise ValueError(f"DSM takes 1..{DSM_MAX_RANGES} ranges, not {len(ranges)}")
    out = bytearray()
    for r in ranges:
        if len(r) not in (2, 3):
            raise ValueError(f"a DSM range is (slba, nlb[, cattr]), not {r!r}")
        slba, nlb, cattr = r[0], r[1], r[2] if len(r) == 3 else 0
        out += struct.pack("<IIQ", _check("cattr", cattr, 32), _check("nlb", nlb, 32),
                           _check("slba", slba, 64))
    return bytes(out)


# ---- admin commands (NVMe Base 2.0 §5) ----

def identify(cns: int, *, nsid: int = 0, cntid: int = 0, cns_id: int = 0, csi: int = 0,
             uuid_index: int = 0) -> Sqe:
    """Identify 06h: CDW10 CNS 7:0, CNTID 31:16; CDW11 CNS specific id 15:0, CSI 31:24;
    CDW14 UUID index 6:0. Data: one 4096-byte structure."""
    return Sqe(ADM_IDENTIFY, nsid,
               cdw10=_check("cns", cns, 8) | _check("cntid", cntid, 16) << 16,
               cdw11=_check("cns_id", cns_id, 16) | _check("csi", csi, 8) << 24,
               cdw14=_check("uuid_index", uuid_index, 7))


def get_log_page(lid: int, nbytes: int, *, nsid: int = NSID_ALL, lsp: int = 0,
                 rae: bool = False, lsi: int = 0, offset: int = 0, csi: int = 0,
                 ot: bool = False, uuid_index: int = 0) -> Sqe:
    """Get Log Page 02h: CDW10 LID 7:0, LSP 14:8, RAE 15, NUMDL 31:16; CDW11 NUMDU 15:0,
    LSI 31:16; CDW12/13 log page offset; CDW14 UUID index 6:0, OT 23, CSI 31:24.
    NUMD is the 0's based dword count of nbytes (a multiple of 4)."""
    if nbytes <= 0 or nbytes % 4:
        raise ValueError(f"log page length {nbytes} must be a positive multiple of 4")
    numd = _check("numd", nbytes // 4 - 1, 32)
    return Sqe(ADM_GET_LOG_PAGE, nsid,
               cdw10=(_check("lid", lid, 8) | _check("lsp", lsp, 7) << 8 | int(rae) << 15
                      | (numd & 0xFFFF) << 16),
               cdw11=numd >> 16 | _check("lsi", lsi, 16) << 16,
               cdw12=_check("offset", offset, 64) & 0xFFFFFFFF, cdw13=offset >> 32,
               cdw14=(_check("uuid_index", uuid_index, 7) | int(ot) << 23
                      | _check("csi", csi, 8) << 24))


def set_features(fid: int, cdw11: int = 0, *, nsid: int = 0, save: bool = False,
                 cdw12: int = 0, cdw13: int = 0, cdw15: int = 0, uuid_index: int = 0) -> Sqe:
    """Set Features 09h: CDW10 FID 7:0, SV 31; CDW11-13/15 feature specific; CDW14 UUID."""
    return Sqe(ADM_SET_FEATURES, nsid, cdw10=_check("fid", fid, 8) | int(save) << 31,
               cdw11=_check("cdw11", cdw11, 32), cdw12=cdw12, cdw13=cdw13,
               cdw14=_check("uuid_index", uuid_index, 7), cdw15=cdw15)


def get_features(fid: int, *, sel: int = SEL_CURRENT, nsid: int = 0, cdw11: int = 0,
                 uuid_index: int = 0) -> Sqe:
    """Get Features 0Ah: CDW10 FID 7:0, SEL 10:8; CDW11 feature specific; CDW14 UUID."""
    return Sqe(ADM_GET_FEATURES, nsid, cdw10=_check("fid", fid, 8) | _check("sel", sel, 3) << 8,
               cdw11=_check("cdw11", cdw11, 32), cdw14=_check("uuid_index", uuid_index, 7))


def create_io_cq(qid: int, qsize: int, *, prp1: int = 0, pc: bool = True,
                 ien: bool = False, iv: int = 0) -> Sqe:
    """Create I/O Completion Queue 05h: PRP1 queue base; CDW10 QID 15:0, QSIZE 31:16
    (0's based); CDW11 PC 0, IEN 1, IV 31:16."""
    return Sqe(ADM_CREATE_IO_CQ, prp1=prp1,
               cdw10=_check("qid", qid, 16, low=0) | (_check("qsize", qsize, 16, low=1) - 1) << 16,
               cdw11=int(pc) | int(ien) << 1 | _check("iv", iv, 16) << 16)


def create_io_sq(qid: int, qsize: int, cqid: int, *, prp1: int = 0, pc: bool = True,
                 qprio: int = 0, nvmsetid: int = 0) -> Sqe:
    """Create I/O Submission Queue 01h: PRP1 queue base; CDW10 QID 15:0, QSIZE 31:16
    (0's based); CDW11 PC 0, QPRIO 2:1, CQID 31:16; CDW12 NVMSETID 15:0."""
    return Sqe(ADM_CREATE_IO_SQ, prp1=prp1,
               cdw10=_check("qid", qid, 16) | (_check("qsize", qsize, 16, low=1) - 1) << 16,
               cdw11=int(pc) | _check("qprio", qprio, 2) << 1 | _check("cqid", cqid, 16) << 16,
               cdw12=_check("nvmsetid", nvmsetid, 16))


def abort(sqid: int, cid: int) -> Sqe:
    """Abort (Base §5.1): CDW10 SQID 15:0, CID 31:16. DW0 bit 0 of its completion is 1 when
    the command was not aborted."""
    return Sqe(ADM_ABORT, cdw10=_check("SQID", sqid, 16) | _check("CID", cid, 16) << 16)


def delete_io_sq(qid: int) -> Sqe:
    """Delete I/O Submission Queue 00h: CDW10 QID 15:0."""
    return Sqe(ADM_DELETE_IO_SQ, cdw10=_check("qid", qid, 16))


def delete_io_cq(qid: int) -> Sqe:
    """Delete I/O Completion Queue 04h: CDW10 QID 15:0."""
    return Sqe(ADM_DELETE_IO_CQ, cdw10=_check("qid", qid, 16))


def format_nvm(nsid: int, lbaf: int, *, ses: int = 0, pi: int = 0, pil: bool = False,
               mset: bool = False) -> Sqe:
    """Format NVM 80h: CDW10 LBAFL 3:0, MSET 4, PI 7:5, PIL 8, SES 11:9, LBAFU 13:12
    (the format index is LBAFU:LBAFL, 0..63)."""
    _check("lbaf", lbaf, 6)
    return Sqe(ADM_FORMAT_NVM, nsid,
               cdw10=((lbaf & 0xF) | int(mset) << 4 | _check("pi", pi, 3) << 5 | int(pil) << 8
                      | _check("ses", ses, 3) << 9 | (lbaf >> 4) << 12))


# ---- commands test engineers script (Base 2.0 §5, NVM Command Set 1.0 §3) ----

COPY_RANGE_SIZE = 32                 # Source Range Entries Copy Descriptor Format 0h
COPY_MAX_RANGES = 256                # Copy NR, CDW12 7:0, is 0's based
CTRL_LIST_MAX = 2047                 # Controller List: a count, then up to 2047 IDs


def write_uncorrectable(nsid: int, slba: int, nlb: int) -> Sqe:
    """Write Uncorrectable 04h (NVM §3.3.7): CDW10-11 SLBA, CDW12 NLB 15:0 (0's based).
    Reads of those blocks then fail until they are written again."""
    return _slba(Sqe(OPC_WRITE_UNCORRECTABLE, nsid, cdw12=_nlb(nlb)), slba)


def copy(nsid: int, sdlba: int, nr: int, *, fmt: int = 0, fua: bool = False,
         lr: bool = False, prinfor: int = 0, prinfow: int = 0, dtype: int = 0,
         dspec: int = 0) -> Sqe:
    """Copy 19h (NVM §3.3.1): CDW10-11 SDLBA; CDW12 NR 7:0 (0's based), DF 11:8, PRINFOR
    15:12, DTYPE 23:20, PRINFOW 29:26, FUA 30, LR 31; CDW13 DSPEC 31:16. The data buffer holds
    `nr` source range entries (see copy_ranges)."""
    sqe = Sqe(OPC_COPY, nsid,
              cdw12=(_check("nr", nr, 8, low=1) - 1 | _check("format", fmt, 4) << 8
                     | _check("prinfor", prinfor, 4) << 12 | _check("dtype", dtype, 4) << 20
                     | _check("prinfow", prinfow, 4) << 26 | int(fua) << 30 | int(lr) << 31),
              cdw13=_check("dspec", dspec, 16) << 16)
    _check("sdlba", sdlba, 64)
    sqe.cdw10, sqe.cdw11 = sdlba & 0xFFFFFFFF, sdlba >> 32
    return sqe


def copy_ranges(ranges: Sequence[tuple[int, int]]) -> bytes:
    """Source Range Entries, Copy Descriptor Format 0h (NVM §3.3.1.1, 32 bytes each): bytes
    15:8 SLBA, 17:16 NLB (0's based); the rest (reserved, tags) zero. ranges: (slba, nlb)."""
    if not 1 <= len(ranges) <= COPY_MAX_RANGES:
        raise ValueError(f"Copy takes 1..{COPY_MAX_RANGES} source ranges, not {len(ranges)}")
    out = bytearray()
    for slba, nlb in ranges:
        out += struct.pack("<8xQH14x", _check("slba", slba, 64), _nlb(nlb))
    return bytes(out)


def namespace_management(sel: int, *, nsid: int = 0, csi: int = 0) -> Sqe:
    """Namespace Management 0Dh (Base §5.20): CDW10 SEL 3:0 (0 create: NSID 0 and a 4096-byte
    host-specified structure, see nsmgmt.create_data; 1 delete: NSID, no data); CDW11 CSI
    31:24. DW0 of a create's completion is the new NSID."""
    return Sqe(ADM_NS_MANAGEMENT, nsid, cdw10=_check("SEL", sel, 4),
               cdw11=_check("CSI", csi, 8) << 24)


def namespace_attachment(nsid: int, sel: int) -> Sqe:
    """Namespace Attachment 15h (Base §5.19): CDW10 SEL 3:0 (0 attach, 1 detach); the data
    buffer is a 4096-byte Controller List (see controller_list)."""
    return Sqe(ADM_NS_ATTACHMENT, _check("NSID", nsid, 32, low=0), cdw10=_check("SEL", sel, 4))


def controller_list(cntlids: Sequence[int]) -> bytes:
    """Controller List (Base §4.5.1): u16 number of identifiers, then the identifiers
    (ascending), padded to 4096 bytes."""
    if not 1 <= len(cntlids) <= CTRL_LIST_MAX:
        raise ValueError(f"a controller list holds 1..{CTRL_LIST_MAX} controller IDs, "
                         f"not {len(cntlids)}")
    ids = sorted(_check("CNTLID", c, 16) for c in cntlids)
    data = struct.pack(f"<{len(ids) + 1}H", len(ids), *ids)
    return data + bytes(4096 - len(data))


def sanitize(sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False,
             ndas: bool = False, ovrpat: int = 0) -> Sqe:
    """Sanitize 84h (Base §5.24): CDW10 SANACT 2:0 (1 exit failure mode, 2 block erase,
    3 overwrite, 4 crypto erase), AUSE 3, OWPASS 7:4, OIPBP 8, NDAS 9; CDW11 OVRPAT."""
    return Sqe(ADM_SANITIZE, cdw10=(_check("SANACT", sanact, 3) | int(ause) << 3
                                    | _check("OWPASS", owpass, 4) << 4 | int(oipbp) << 8
                                    | int(ndas) << 9),
               cdw11=_check("OVRPAT", ovrpat, 32))


def device_self_test(stc: int, nsid: int = NSID_ALL) -> Sqe:
    """Device Self-test 14h (Base §5.10): CDW10 STC 3:0 (1 short, 2 extended, Eh vendor,
    Fh abort); NSID 0 for the controller only, FFFFFFFFh for it and every namespace."""
    return Sqe(ADM_DEVICE_SELF_TEST, _check("NSID", nsid, 32), cdw10=_check("STC", stc, 4))


def fw_image_download(nbytes: int, offset: int) -> Sqe:
    """Firmware Image Download 11h (Base §5.13): CDW10 NUMD (0's based dwords), CDW11 OFST
    (offset in dwords); both a multiple of 4 bytes."""
    if nbytes <= 0 or nbytes % 4 or offset < 0 or offset % 4:
        raise ValueError(f"firmware piece of {nbytes} bytes at offset {offset}: both must be "
                         "multiples of 4 (dwords), the size above 0")
    return Sqe(ADM_FW_IMAGE_DOWNLOAD, cdw10=_check("NUMD", nbytes // 4 - 1, 32),
               cdw11=_check("OFST", offset // 4, 32))


def fw_commit(fs: int, ca: int, *, bpid: int = 0) -> Sqe:
    """Firmware Commit 10h (Base §5.12): CDW10 FS 2:0 (slot, 0 = the controller picks),
    CA 5:3 (commit action 0..7), BPID 31 (boot partition)."""
    return Sqe(ADM_FW_COMMIT, cdw10=(_check("FS", fs, 3) | _check("CA", ca, 3) << 3
                                     | _check("BPID", bpid, 1) << 31))


def _security(opcode: int, secp: int, spsp: int, nssf: int, length: int) -> Sqe:
    _check("SPSP", spsp, 16)
    return Sqe(opcode, cdw10=(_check("NSSF", nssf, 8) | (spsp & 0xFF) << 8 | (spsp >> 8) << 16
                              | _check("SECP", secp, 8) << 24),
               cdw11=_check("length", length, 32))


def security_send(secp: int, spsp: int, tl: int, *, nssf: int = 0) -> Sqe:
    """Security Send 81h (Base §5.26): CDW10 NSSF 7:0, SPSP0 15:8, SPSP1 23:16, SECP 31:24;
    CDW11 TL (transfer length, bytes)."""
    return _security(ADM_SECURITY_SEND, secp, spsp, nssf, tl)


def security_receive(secp: int, spsp: int, al: int, *, nssf: int = 0) -> Sqe:
    """Security Receive 82h (Base §5.25): CDW10 as Security Send; CDW11 AL (allocation
    length, bytes)."""
    return _security(ADM_SECURITY_RECEIVE, secp, spsp, nssf, al)
