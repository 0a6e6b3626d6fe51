"""End-to-end data protection (NVM Command Set Specification 1.0, §5.2 and §5.3).

The 8-byte Protection Information tuple of the 16-bit guard format (§5.3.1, Figure 9): Guard
(CRC-16 T10-DIF of the block's data), Application Tag and Reference Tag, big-endian. The
command fields: PRINFO (CDW12 29:26: PRACT 29, PRCHK guard 28 / application tag 27 /
reference tag 26), ILBRT / EILBRT (CDW14), LBAT (CDW15 15:0) and LBATM (CDW15 31:16).

Type rules (§5.3.1.1..3): type 1: the reference tag of each block is the low 32 bits of its
LBA (ILBRT must equal the low 32 bits of SLBA); type 2: the first block's reference tag is
ILBRT, incremented per block; type 3: the reference tag is not checked. An application tag of
FFFFh (and, for type 3, also a reference tag of FFFFFFFFh) turns checking off for that block.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from iommu_dma.nvme import sqe as sqe_mod

PI_SIZE = 8                          # 16-bit guard PI tuple
_PI = struct.Struct(">HHI")          # guard, application tag, reference tag (big-endian)
CRC16_T10DIF_POLY = 0x8BB7
APP_TAG_ESCAPE = 0xFFFF              # §5.3.1.4: no checks for this block
REF_TAG_ESCAPE = 0xFFFF_FFFF         # type 3 with APP_TAG_ESCAPE: no checks


class PiType(enum.IntEnum):
    """Identify Namespace DPS bits 2:0 (Base 2.0 §5.17.2.1)."""

    NONE = 0
    TYPE1 = 1
    TYPE2 = 2
    TYPE3 = 3


class Prinfo(enum.IntFlag):
    """PRINFO, CDW12 29:26 of Read / Write / Compare / Verify / Write Zeroes / Zone Append."""

    NONE = 0
    PRCHK_REF = 0x1                  # CDW12 bit 26: check the reference tag
    PRCHK_APP = 0x2                  # CDW12 bit 27: check the application tag
    PRCHK_GUARD = 0x4                # CDW12 bit 28: check the guard
    PRACT = 0x8                      # CDW12 bit 29: the controller inserts / strips the PI
    PRCHK_ALL = 0x7


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ CRC16_T10DIF_POLY if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_TABLE = _crc_table()


def crc16_t10dif(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-16 T10-DIF (polynomial 8BB7h, initial value 0, not reflected, no final XOR)."""
    table = _TABLE
    for b in bytes(data):
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ b]
    return crc


@dataclass(frozen=True)
class PiTuple:
    """One 8-byte Protection Information tuple (16-bit guard format)."""

    guard: int
    app_tag: int
    ref_tag: int

    def pack(self) -> bytes:
        return _PI.pack(self.guard & 0xFFFF, self.app_tag & 0xFFFF, self.ref_tag & 0xFFFF_FFFF)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> PiTuple:
        if len(raw) != PI_SIZE:
            raise ValueError(f"a PI tuple is {PI_SIZE} bytes, not {len(raw)}")
        return cls(*_PI.unpack(bytes(raw)))


@dataclass(frozen=True)
class PiFormat:
    """Where the PI lies in a namespace's metadata: ms bytes per block, PI type, and PIL
    (DPS bit 3: the PI is the first 8 bytes of the metadata; else the last 8)."""

    ms: int
    pi_type: PiType
    pi_first: bool

    @property
    def pi_offset(self) -> int:
        """Offset of the PI tuple in a block's metadata."""
        return 0 if self.pi_first else self.ms - PI_SIZE

    def guard(self, data: bytes | memoryview, metadata: bytes | bytearray | memoryview = b""
              ) -> int:
        """The guard of one block (§5.3.1.2: with the PI last, the CRC also covers the
        metadata bytes before it)."""
        crc = crc16_t10dif(data)
        if not self.pi_first and self.pi_offset:
            crc = crc16_t10dif(metadata[:self.pi_offset], crc)
        return crc

    def ref_tag(self, lba: int, ilbrt: int, index: int) -> int:
        """The reference tag the block index of a command expects (type 1: the low 32 bits
        of its LBA; type 2: ILBRT + index; type 3: ILBRT, unchecked)."""
        if self.pi_type == PiType.TYPE1:
            return lba & 0xFFFF_FFFF
        if self.pi_type == PiType.TYPE2:
            return (ilbrt + index) & 0xFFFF_FFFF
        return ilbrt & 0xFFFF_FFFF

    def generate(self, data: bytes | memoryview, lba_size: int, slba: int, *,
                 app_tag: int = 0, ilbrt: int | None = None,
                 metadata: bytes | memoryview | None = None) -> bytes:
        """Metadata for the blocks of data (ms bytes each, a separate buffer's layout), each
        with a correct PI tuple (the other metadata bytes from `metadata`, else zero)."""
        nlb = _blocks(data, lba_size)
        base = slba & 0xFFFF_FFFF if ilbrt is None else ilbrt
        out = bytearray(metadata if metadata is not None else bytes(nlb * self.ms))
        if len(out) != nlb * self.ms:
            raise ValueError(f"metadata holds {len(out)} bytes; {nlb} blocks need "
                             f"{nlb * self.ms}")
        view = memoryview(data).cast("B")
        for i in range(nlb):
            m = i * self.ms
            guard = self.guard(view[i * lba_size:(i + 1) * lba_size], out[m:m + self.ms])
            tup = PiTuple(guard, app_tag, self.ref_tag(slba + i, base, i))
            out[m + self.pi_offset:m + self.pi_offset + PI_SIZE] = tup.pack()
        return bytes(out)

    def tuples(self, metadata: bytes | memoryview) -> list[PiTuple]:
        """The PI tuple of each block's metadata (separate buffer layout)."""
        if len(metadata) % self.ms:
            raise ValueError(f"{len(metadata)} bytes of metadata are not whole {self.ms}-byte "
                             "entries")
        return [PiTuple.unpack(metadata[m + self.pi_offset:m + self.pi_offset + PI_SIZE])
                for m in range(0, len(metadata), self.ms)]

    def check(self, data: bytes | memoryview, metadata: bytes | memoryview, lba_size: int,
              slba: int, *, prchk: Prinfo = Prinfo.PRCHK_ALL, app_tag: int = 0,
              app_mask: int = 0xFFFF, ilbrt: int | None = None) -> list[str]:
        """Check the PI of each block as the controller would (§5.3.2); the problems found
        (empty: all good), each naming the block and the field."""
        base = slba & 0xFFFF_FFFF if ilbrt is None else ilbrt
        problems = []
        view = memoryview(data).cast("B")
        for i, tup in enumerate(self.tuples(metadata)):
            if tup.app_tag == APP_TAG_ESCAPE and (
                    self.pi_type != PiType.TYPE3 or tup.ref_tag == REF_TAG_ESCAPE):
                continue
            m = i * self.ms
            guard = self.guard(view[i * lba_size:(i + 1) * lba_size], metadata[m:m + self.ms])
            if prchk & Prinfo.PRCHK_GUARD and tup.guard != guard:
                problems.append(f"LBA {slba + i}: guard {tup.guard:#06x}, data gives "
                                f"{guard:#06x}")
            if prchk & Prinfo.PRCHK_APP and (tup.app_tag ^ app_tag) & app_mask:
                problems.append(f"LBA {slba + i}: application tag {tup.app_tag:#06x}, "
                                f"expected {app_tag:#06x} (mask {app_mask:#06x})")
            ref = self.ref_tag(slba + i, base, i)
            if (prchk & Prinfo.PRCHK_REF and self.pi_type != PiType.TYPE3
                    and tup.ref_tag != ref):
                problems.append(f"LBA {slba + i}: reference tag {tup.ref_tag:#x}, "
                                f"expected {ref:#x}")
        return problems


def _blocks(data: bytes | memoryview, lba_size: int) -> int:
    n, rest = divmod(memoryview(data).nbytes, lba_size)
    if rest:
        raise ValueError(f"{memoryview(data).nbytes} bytes are not whole {lba_size}-byte "
                         "blocks")
    return n


def split_extended(buf: bytes | memoryview, lba_size: int, ms: int) -> tuple[bytes, bytes]:
    """(data, metadata) of an extended-LBA buffer (each block's metadata follows its data)."""
    step = lba_size + ms
    view = memoryview(buf).cast("B")
    if view.nbytes % step:
        raise ValueError(f"{view.nbytes} bytes are not whole {step}-byte extended blocks")
    data, meta = bytearray(), bytearray()
    for off in range(0, view.nbytes, step):
        data += view[off:off + lba_size]
        meta += view[off + lba_size:off + step]
    return bytes(data), bytes(meta)


def join_extended(data: bytes | memoryview, metadata: bytes | memoryview, lba_size: int,
                  ms: int) -> bytes:
    """An extended-LBA buffer from data and its separate metadata."""
    nlb = _blocks(data, lba_size)
    if memoryview(metadata).nbytes != nlb * ms:
        raise ValueError(f"metadata holds {memoryview(metadata).nbytes} bytes; {nlb} blocks "
                         f"need {nlb * ms}")
    d, m = memoryview(data).cast("B"), memoryview(metadata).cast("B")
    out = bytearray()
    for i in range(nlb):
        out += d[i * lba_size:(i + 1) * lba_size]
        out += m[i * ms:(i + 1) * ms]
    return bytes(out)


@dataclass(frozen=True)
class PiFields:
    """The protection fields of one command: PRINFO, ILBRT (of its first block), LBAT,
    LBATM."""

    prinfo: int = 0
    ilbrt: int = 0
    lbat: int = 0
    lbatm: int = 0

    def __post_init__(self) -> None:
        for name, value, bits in (("prinfo", self.prinfo, 4), ("ilbrt (reftag)", self.ilbrt, 32),
                                  ("lbat (apptag)", self.lbat, 16),
                                  ("lbatm (appmask)", self.lbatm, 16)):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name}={value} is outside 0..{(1 << bits) - 1}")

    def apply(self, cmd: sqe_mod.Sqe, block_offset: int = 0,
              pi_type: PiType = PiType.TYPE1) -> sqe_mod.Sqe:
        """Set PRINFO (CDW12 29:26), ILBRT (CDW14) and LBATM/LBAT (CDW15) of cmd, the piece
        of a transfer starting block_offset blocks in: types 1 and 2 expect the reference tag
        to grow by one per block, so the piece's ILBRT is ILBRT + block_offset."""
        cmd.cdw12 = (cmd.cdw12 & ~(0xF << 26)) | self.prinfo << 26
        step = block_offset if pi_type in (PiType.TYPE1, PiType.TYPE2) else 0
        cmd.cdw14 = (self.ilbrt + step) & 0xFFFF_FFFF
        cmd.cdw15 = self.lbatm << 16 | self.lbat
        return cmd
