"""Parsed Identify data and log pages, each keeping its raw bytes.

Offsets are from NVMe Base 2.0 §5.17.2 (Identify Controller, Identify Namespace) and §5.16.1
(Error Information, SMART / Health Information, Firmware Slot Information log pages). The
data comes from the device: values that would index or size something are checked here.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from iommu_dma.nvme.constants import ONCS_COMPARE

IDENTIFY_SIZE = 4096                 # every Identify data structure (Base §5.17)
SMART_SIZE = 512                     # LID_SMART log page (Base §5.16.1)
FW_SLOT_SIZE = 512                   # LID_FW_SLOT log page
ERROR_ENTRY_SIZE = 64                # one LID_ERROR entry
MAX_LBA_FORMATS = 64                 # NLBAF is 0's based, at most 63 (Base §5.17.2, NVM CS)
MAX_POWER_STATES = 32                # NPSS is 0's based, at most 31 (Base §5.17.2.1)
PSD_OFFSET, PSD_SIZE = 2048, 32      # power state descriptors 0..31, bytes 3071:2048
VS_OFFSET = 3072                     # vendor specific, bytes 4095:3072
MIN_LBADS = 9                        # LBADS: 2^9 = 512 bytes is the smallest LBA data size


def _u(raw: bytes, offset: int, size: int) -> int:
    return int.from_bytes(raw[offset:offset + size], "little")


def _ascii(raw: bytes, offset: int, size: int) -> str:
    return raw[offset:offset + size].decode("ascii", "replace").rstrip(" \x00")


def _cstr(raw: bytes, offset: int, size: int) -> str:
    """A fixed-size field as C reads it: up to the first NUL, padding kept (nvme-cli's %-.*s)."""
    return raw[offset:offset + size].split(b"\x00", 1)[0].decode("ascii", "replace")


def _version(vs: int) -> str:
    return f"{vs >> 16}.{(vs >> 8) & 0xFF}.{vs & 0xFF}"


class _Parsed:
    """Base of the parsed structures (each a frozen dataclass keeping its raw bytes)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    raw: bytes

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain data (for JSON output); raw bytes left out."""
        return {k: v for k, v in asdict(self).items() if k != "raw"}


@dataclass(frozen=True)
class PowerState:
    """Power State Descriptor (Base §5.17.2.1, Figure 276), named as nvme-cli's JSON names it."""

    max_power: int            # MP, in the units of MXPS (flags bit 0)
    flags: int                # byte 3: MXPS (bit 0), NOPS (bit 1)
    entry_lat: int            # ENLAT, microseconds
    exit_lat: int             # EXLAT, microseconds
    read_tput: int            # RRT (bits 4:0 of byte 12; the byte as read)
    read_lat: int             # RRL
    write_tput: int           # RWT
    write_lat: int            # RWL
    idle_power: int           # IDLP
    idle_scale: int           # IPS, bits 7:6 of byte 18
    active_power: int         # ACTP
    active_power_work: int    # APW, bits 2:0 of byte 22
    active_scale: int         # APS, bits 7:6 of byte 22

    @classmethod
    def parse(cls, raw: bytes) -> PowerState:
        return cls(
            max_power=_u(raw, 0, 2), flags=raw[3], entry_lat=_u(raw, 4, 4),
            exit_lat=_u(raw, 8, 4), read_tput=raw[12], read_lat=raw[13], write_tput=raw[14],
            write_lat=raw[15], idle_power=_u(raw, 16, 2), idle_scale=(raw[18] >> 6) & 3,
            active_power=_u(raw, 20, 2), active_power_work=raw[22] & 7,
            active_scale=(raw[22] >> 6) & 3,
        )


@dataclass(frozen=True)
class IdentifyController(_Parsed):
    raw: bytes = field(repr=False)
    vid: int
    ssvid: int
    sn: str                       # spaces trimmed (nvme-cli keeps the padding: see nvme_json)
    mn: str
    fr: str
    rab: int
    ieee: int
    cmic: int
    mdts: int
    cntlid: int
    ver: int
    rtd3r: int
    rtd3e: int
    oaes: int
    ctratt: int
    rrls: int
    cntrltype: int
    fguid: str                    # 8-4-4-4-12 hex, bytes in order
    crdt: tuple[int, int, int]    # Command Retry Delay Times 1..3, in 100 ms units
    nvmsr: int
    vwci: int
    mec: int
    oacs: int
    acl: int
    aerl: int
    frmw: int
    lpa: int
    elpe: int
    npss: int
    avscc: int
    apsta: int
    wctemp: int
    cctemp: int
    mtfa: int
    hmpre: int
    hmmin: int
    tnvmcap: int
    unvmcap: int
    rpmbs: int
    edstt: int
    dsto: int
    fwug: int
    kas: int
    hctma: int
    mntmt: int
    mxtmt: int
    sanicap: int
    hmminds: int
    hmmaxd: int
    nsetidmax: int
    endgidmax: int
    anatt: int
    anacap: int
    anagrpmax: int
    nanagrpid: int
    pels: int
    domainid: int
    megcap: int
    sqes: int
    cqes: int
    maxcmd: int
    nn: int
    oncs: int
    fuses: int
    fna: int
    vwc: int
    awun: int
    awupf: int
    icsvscc: int
    nwpc: int
    acwu: int
    ocfs: int
    sgls: int
    mnan: int
    maxdna: int
    maxcna: int
    subnqn: str
    ioccsz: int
    iorcsz: int
    icdoff: int
    fcatt: int
    msdbd: int
    ofcs: int
    psds: tuple[PowerState, ...]  # NPSS + 1 descriptors (at most 32)

    @classmethod
    def parse(cls, raw: bytes) -> IdentifyController:
        raw = bytes(raw[:IDENTIFY_SIZE]).ljust(IDENTIFY_SIZE, b"\x00")
        npss = raw[263]
        count = min(npss, MAX_POWER_STATES - 1) + 1       # NPSS is a 0's based count
        psds = tuple(PowerState.parse(raw[PSD_OFFSET + PSD_SIZE * i:][:PSD_SIZE])
                     for i in range(count))
        fg = raw[112:128].hex()
        return cls(
            raw=raw, vid=_u(raw, 0, 2), ssvid=_u(raw, 2, 2), sn=_ascii(raw, 4, 20),
            mn=_ascii(raw, 24, 40), fr=_ascii(raw, 64, 8), rab=raw[72],
            ieee=_u(raw, 73, 3), cmic=raw[76], mdts=raw[77], cntlid=_u(raw, 78, 2),
            ver=_u(raw, 80, 4), rtd3r=_u(raw, 84, 4), rtd3e=_u(raw, 88, 4), oaes=_u(raw, 92, 4),
            ctratt=_u(raw, 96, 4), rrls=_u(raw, 100, 2), cntrltype=raw[111],
            fguid=f"{fg[:8]}-{fg[8:12]}-{fg[12:16]}-{fg[16:20]}-{fg[20:]}",
            crdt=(_u(raw, 128, 2), _u(raw, 130, 2), _u(raw, 132, 2)),
            nvmsr=raw[253], vwci=raw[254], mec=raw[255],
            oacs=_u(raw, 256, 2), acl=raw[258], aerl=raw[259],
            frmw=raw[260], lpa=raw[261], elpe=raw[262], npss=npss, avscc=raw[264],
            apsta=raw[265], wctemp=_u(raw, 266, 2), cctemp=_u(raw, 268, 2),
            mtfa=_u(raw, 270, 2), hmpre=_u(raw, 272, 4), hmmin=_u(raw, 276, 4),
            tnvmcap=_u(raw, 280, 16), unvmcap=_u(raw, 296, 16), rpmbs=_u(raw, 312, 4),
            edstt=_u(raw, 316, 2), dsto=raw[318], fwug=raw[319], kas=_u(raw, 320, 2),
            hctma=_u(raw, 322, 2), mntmt=_u(raw, 324, 2), mxtmt=_u(raw, 326, 2),
            sanicap=_u(raw, 328, 4), hmminds=_u(raw, 332, 4), hmmaxd=_u(raw, 336, 2),
            nsetidmax=_u(raw, 338, 2), endgidmax=_u(raw, 340, 2), anatt=raw[342],
            anacap=raw[343], anagrpmax=_u(raw, 344, 4), nanagrpid=_u(raw, 348, 4),
            pels=_u(raw, 352, 4), domainid=_u(raw, 356, 2), megcap=_u(raw, 368, 16),
            sqes=raw[512], cqes=raw[513], maxcmd=_u(raw, 514, 2),
            nn=_u(raw, 516, 4), oncs=_u(raw, 520, 2), fuses=_u(raw, 522, 2), fna=raw[524],
            vwc=raw[525], awun=_u(raw, 526, 2), awupf=_u(raw, 528, 2), icsvscc=raw[530],
            nwpc=raw[531], acwu=_u(raw, 532, 2), ocfs=_u(raw, 534, 2), sgls=_u(raw, 536, 4),
            mnan=_u(raw, 540, 4), maxdna=_u(raw, 544, 16), maxcna=_u(raw, 560, 4),
            subnqn=_cstr(raw, 768, 256), ioccsz=_u(raw, 1792, 4), iorcsz=_u(raw, 1796, 4),
            icdoff=_u(raw, 1800, 2), fcatt=raw[1802], msdbd=raw[1803], ofcs=_u(raw, 1804, 2),
            psds=psds,
        )

    @property
    def vs(self) -> bytes:
        """Vendor Specific area, bytes 4095:3072 (nvme-cli's JSON leaves it out)."""
        return self.raw[VS_OFFSET:IDENTIFY_SIZE]

    @property
    def version(self) -> str:
        return _version(self.ver)

    def admin_supported(self, oacs_bit: int) -> bool:
        """An optional admin command is supported: OACS_* bit of constants (bytes 257:256)."""
        return bool(self.oacs & oacs_bit)

    def nvm_supported(self, oncs_bit: int) -> bool:
        """An optional NVM command or feature is supported: ONCS_* bit (bytes 521:520)."""
        return bool(self.oncs & oncs_bit)

    @property
    def compare_supported(self) -> bool:
        return self.nvm_supported(ONCS_COMPARE)

    def max_transfer(self, page_size: int) -> int | None:
        """MDTS in bytes (a power of two of CAP.MPSMIN pages); None when unlimited (0)."""
        return None if self.mdts == 0 else page_size << self.mdts


@dataclass(frozen=True)
class LbaFormat:
    ms: int       # metadata bytes per block
    lbads: int    # log2 of the data size
    rp: int       # relative performance

    @property
    def size(self) -> int:
        return 1 << self.lbads


@dataclass(frozen=True)
class IdentifyNamespace(_Parsed):
    raw: bytes = field(repr=False)
    nsze: int
    ncap: int
    nuse: int
    nsfeat: int
    nlbaf: int                    # bounded to 63 (the byte as read: raw[25])
    flbas: int
    mc: int
    dpc: int
    dps: int
    nmic: int
    rescap: int
    fpi: int
    dlfeat: int
    nawun: int
    nawupf: int
    nacwu: int
    nabsn: int
    nabo: int
    nabspf: int
    noiob: int
    nvmcap: int
    npwg: int
    npwa: int
    npdg: int
    npda: int
    nows: int
    mssrl: int
    mcl: int
    msrc: int
    nulbaf: int
    anagrpid: int
    nsattr: int
    nvmsetid: int
    endgid: int
    nguid: str
    eui64: str
    lbaf: tuple[LbaFormat, ...]

    @classmethod
    def parse(cls, raw: bytes) -> IdentifyNamespace:
        raw = bytes(raw[:IDENTIFY_SIZE]).ljust(IDENTIFY_SIZE, b"\x00")
        nlbaf = min(raw[25], MAX_LBA_FORMATS - 1)
        formats = []
        for i in range(nlbaf + 1):                      # NLBAF is a 0's based count
            dw = _u(raw, 128 + 4 * i, 4)
            formats.append(LbaFormat(ms=dw & 0xFFFF, lbads=(dw >> 16) & 0xFF, rp=(dw >> 24) & 3))
        return cls(
            raw=raw, nsze=_u(raw, 0, 8), ncap=_u(raw, 8, 8), nuse=_u(raw, 16, 8),
            nsfeat=raw[24], nlbaf=nlbaf, flbas=raw[26], mc=raw[27], dpc=raw[28], dps=raw[29],
            nmic=raw[30], rescap=raw[31], fpi=raw[32], dlfeat=raw[33], nawun=_u(raw, 34, 2),
            nawupf=_u(raw, 36, 2), nacwu=_u(raw, 38, 2), nabsn=_u(raw, 40, 2),
            nabo=_u(raw, 42, 2), nabspf=_u(raw, 44, 2), noiob=_u(raw, 46, 2),
            nvmcap=_u(raw, 48, 16), npwg=_u(raw, 64, 2), npwa=_u(raw, 66, 2),
            npdg=_u(raw, 68, 2), npda=_u(raw, 70, 2), nows=_u(raw, 72, 2),
            mssrl=_u(raw, 74, 2), mcl=_u(raw, 76, 4), msrc=raw[80], nulbaf=raw[82],
            anagrpid=_u(raw, 92, 4), nsattr=raw[99], nvmsetid=_u(raw, 100, 2),
            endgid=_u(raw, 102, 2),
            nguid=raw[104:120].hex(), eui64=raw[120:128].hex(), lbaf=tuple(formats),
        )

    @property
    def format_index(self) -> int:
        # FLBAS bits 3:0, plus bits 6:5 as the upper bits when more than 16 formats exist
        return (self.flbas & 0xF) | ((self.flbas >> 5) & 0x3) << 4

    @property
    def current_format(self) -> LbaFormat:
        """The LBA format in use (FLBAS); ValueError when the device reports an impossible one
        (an index past NLBAF, or a data size below 512 bytes or above 2^31)."""
        index = self.format_index
        if index >= len(self.lbaf):
            raise ValueError(f"FLBAS selects LBA format {index}, but NLBAF lists only "
                             f"{len(self.lbaf)}")
        fmt = self.lbaf[index]
        if not MIN_LBADS <= fmt.lbads < 32:
            raise ValueError(f"LBA format {index} has LBADS {fmt.lbads} (data size 2^LBADS "
                             "must be at least 512 bytes)")
        return fmt

    @property
    def lba_size(self) -> int:
        return self.current_format.size

    @property
    def metadata_size(self) -> int:
        return self.current_format.ms

    @property
    def active(self) -> bool:
        """An inactive NSID identifies as all zeroes (Base 2.0 §5.17.2.1)."""
        return self.nsze != 0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["lbaf"] = [asdict(f) for f in self.lbaf]
        d["lba_size"] = self.lba_size if self.active else 0
        return d


@dataclass(frozen=True)
class SmartLog(_Parsed):
    raw: bytes = field(repr=False)
    critical_warning: int
    temperature: int                # kelvin
    avail_spare: int
    spare_thresh: int
    percent_used: int
    endurance_grp_critical_warning_summary: int
    data_units_read: int
    data_units_written: int
    host_read_commands: int
    host_write_commands: int
    controller_busy_time: int
    power_cycles: int
    power_on_hours: int
    unsafe_shutdowns: int
    media_errors: int
    num_err_log_entries: int
    warning_temp_time: int
    critical_comp_time: int
    temperature_sensors: tuple[int, ...]   # the sensors that report (non-zero), kelvin
    temp_sensor: tuple[int, ...]           # Temperature Sensors 1..8 as read (0: none)
    thm_temp1_trans_count: int
    thm_temp2_trans_count: int
    thm_temp1_total_time: int
    thm_temp2_total_time: int

    @classmethod
    def parse(cls, raw: bytes) -> SmartLog:
        raw = bytes(raw[:SMART_SIZE]).ljust(SMART_SIZE, b"\x00")
        sensors = tuple(_u(raw, 200 + 2 * i, 2) for i in range(8))
        return cls(
            raw=raw, critical_warning=raw[0], temperature=_u(raw, 1, 2), avail_spare=raw[3],
            spare_thresh=raw[4], percent_used=raw[5],
            endurance_grp_critical_warning_summary=raw[6],
            data_units_read=_u(raw, 32, 16), data_units_written=_u(raw, 48, 16),
            host_read_commands=_u(raw, 64, 16), host_write_commands=_u(raw, 80, 16),
            controller_busy_time=_u(raw, 96, 16), power_cycles=_u(raw, 112, 16),
            power_on_hours=_u(raw, 128, 16), unsafe_shutdowns=_u(raw, 144, 16),
            media_errors=_u(raw, 160, 16), num_err_log_entries=_u(raw, 176, 16),
            warning_temp_time=_u(raw, 192, 4), critical_comp_time=_u(raw, 196, 4),
            temperature_sensors=tuple(t for t in sensors if t), temp_sensor=sensors,
            thm_temp1_trans_count=_u(raw, 216, 4), thm_temp2_trans_count=_u(raw, 220, 4),
            thm_temp1_total_time=_u(raw, 224, 4), thm_temp2_total_time=_u(raw, 228, 4),
        )


@dataclass(frozen=True)
class ErrorLogEntry(_Parsed):
    raw: bytes = field(repr=False)
    error_count: int
    sqid: int
    cmdid: int
    status_field: int               # 15-bit status (phase bit removed)
    parm_error_location: int
    lba: int
    nsid: int
    vs: int
    trtype: int
    cs: int

    @classmethod
    def parse(cls, raw: bytes) -> ErrorLogEntry:
        raw = bytes(raw[:ERROR_ENTRY_SIZE])
        return cls(
            raw=raw, error_count=_u(raw, 0, 8), sqid=_u(raw, 8, 2), cmdid=_u(raw, 10, 2),
            status_field=_u(raw, 12, 2) >> 1, parm_error_location=_u(raw, 14, 2),
            lba=_u(raw, 16, 8), nsid=_u(raw, 24, 4), vs=raw[28], trtype=raw[29],
            cs=_u(raw, 32, 8),
        )


def parse_error_log(raw: bytes) -> list[ErrorLogEntry]:
    """Entries of an Error Information log, newest first; empty slots (count 0) dropped."""
    entries = (ErrorLogEntry.parse(raw[i:i + ERROR_ENTRY_SIZE])
               for i in range(0, len(raw) - ERROR_ENTRY_SIZE + 1, ERROR_ENTRY_SIZE))
    return [e for e in entries if e.error_count]


@dataclass(frozen=True)
class FirmwareSlotLog(_Parsed):
    raw: bytes = field(repr=False)
    afi: int
    frs: tuple[str, ...]            # revisions of slots 1..7 ("" when empty)

    @classmethod
    def parse(cls, raw: bytes) -> FirmwareSlotLog:
        raw = bytes(raw[:FW_SLOT_SIZE])
        return cls(raw=raw, afi=raw[0], frs=tuple(_ascii(raw, 8 + 8 * i, 8) for i in range(7)))

    @property
    def active_slot(self) -> int:
        return self.afi & 0x7


def parse_ns_list(raw: bytes) -> list[int]:
    """Active Namespace ID list (CNS 02h): ascending NSIDs, ended by the first zero."""
    ids = struct.unpack_from("<1024I", raw)
    out = []
    for nsid in ids:
        if nsid == 0:
            break
        out.append(nsid)
    return out
