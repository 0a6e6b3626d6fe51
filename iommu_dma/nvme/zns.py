"""Zoned Namespaces (NVMe Zoned Namespace Command Set Specification 1.1, "ZNS").

Identify I/O Command Set specific Namespace / Controller (CNS 05h / 06h with CSI 02h), Zone
Management Receive (7Ah: report zones), Zone Management Send (79h: close, finish, open,
reset, offline), Zone Append (7Dh), and `ZonedNamespace`, a wrapper over a `Namespace`.

The controller exposes these commands only when it was enabled with CC.CSS = 110b (all
supported I/O command sets); Controller does so when CAP.CSS bit 6 is set (as Linux does).
The zoned statuses (ZNS §4.1.1.1, SCT 1h, SC B8h..BFh) are named here (ZoneError).
"""

from __future__ import annotations

import contextlib
import enum
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from iommu_dma.errors import IommuDmaError
from iommu_dma.nvme import sqe
from iommu_dma.nvme.constants import MAX_NLB
from iommu_dma.nvme.status import NvmeError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from iommu_dma.nvme.controller import Controller
    from iommu_dma.nvme.namespace import DataBuffer, Namespace

CSI_ZNS = 0x02                       # Command Set Identifier of the Zoned Namespace set
CNS_CSI_NAMESPACE = 0x05             # Identify I/O Command Set specific Namespace (Base §5.17)
CNS_CSI_CONTROLLER = 0x06            # Identify I/O Command Set specific Controller
OPC_ZONE_MGMT_SEND = 0x79            # ZNS §3.4.3
OPC_ZONE_MGMT_RECV = 0x7A            # ZNS §3.4.2
OPC_ZONE_APPEND = 0x7D               # ZNS §3.4.1

ZONE_DESCRIPTOR_SIZE = 64            # ZNS §3.4.2.2.3, Figure 37
REPORT_HEADER_SIZE = 64              # NRZ u64 + reserved (ZNS §3.4.2.2.1)
LBAFE_OFFSET, LBAFE_SIZE = 2816, 16  # LBA Format Extensions 0..63 (ZNS §4.1.5.1, Figure 50)
MAX_LBA_FORMATS = 64
NO_LIMIT = 0xFFFF_FFFF               # MAR/MOR: no limit (the fields are 0's based)
SCT_CMD_SPECIFIC = 0x1


class ZoneSendAction(enum.IntEnum):
    """Zone Send Action, CDW13 7:0 of Zone Management Send (ZNS §3.4.3, Figure 41)."""

    CLOSE = 0x01
    FINISH = 0x02
    OPEN = 0x03
    RESET = 0x04
    OFFLINE = 0x05
    SET_ZDE = 0x10                   # Set Zone Descriptor Extension


class ZoneReceiveAction(enum.IntEnum):
    """Zone Receive Action, CDW13 7:0 of Zone Management Receive (ZNS §3.4.2, Figure 35)."""

    REPORT_ZONES = 0x00
    EXTENDED_REPORT_ZONES = 0x01


class ZoneState(enum.IntEnum):
    """Zone State, bits 7:4 of byte 1 of a zone descriptor (ZNS §2.1.1, Figure 37)."""

    EMPTY = 0x1                      # ZSE
    IMPLICITLY_OPENED = 0x2          # ZSIO
    EXPLICITLY_OPENED = 0x3          # ZSEO
    CLOSED = 0x4                     # ZSC
    READ_ONLY = 0xD                  # ZSRO
    FULL = 0xE                       # ZSF
    OFFLINE = 0xF                    # ZSO

    @property
    def label(self) -> str:
        """How nvme-cli prints the state ("EMPTY", "IMP_OPENED", ...)."""
        return _STATE_LABELS[self]


_STATE_LABELS = {ZoneState.EMPTY: "EMPTY", ZoneState.IMPLICITLY_OPENED: "IMP_OPENED",
                 ZoneState.EXPLICITLY_OPENED: "EXP_OPENED", ZoneState.CLOSED: "CLOSED",
                 ZoneState.READ_ONLY: "READONLY", ZoneState.FULL: "FULL",
                 ZoneState.OFFLINE: "OFFLINE"}


class ReportOption(enum.IntEnum):
    """Zone Receive Action Specific Field for report zones: which zones are listed
    (ZNS §3.4.2.1, Figure 36)."""

    ALL = 0x0
    EMPTY = 0x1
    IMPLICITLY_OPENED = 0x2
    EXPLICITLY_OPENED = 0x3
    CLOSED = 0x4
    FULL = 0x5
    READ_ONLY = 0x6
    OFFLINE = 0x7


ZONE_TYPE_SEQ_WRITE_REQUIRED = 0x2   # ZT (ZNS Figure 37)

# Zoned statuses: Command Specific Status values (ZNS §4.1.1.1, Figure 26)
ZONE_STATUS_NAMES = {
    0xB8: "Zone Boundary Error", 0xB9: "Zone Is Full", 0xBA: "Zone Is Read Only",
    0xBB: "Zone Is Offline", 0xBC: "Zone Invalid Write", 0xBD: "Too Many Active Zones",
    0xBE: "Too Many Open Zones", 0xBF: "Invalid Zone State Transition",
}


class ZoneError(NvmeError):
    """A zoned command failed with a zoned status (named as the ZNS specification names it:
    e.g. "Zone Invalid Write"), or with any other status of a zoned operation."""

    def __init__(self, error: NvmeError) -> None:
        super().__init__(error.status, error.command)
        self.name = zone_status_name(error.sct, error.sc) or error.name
        flags = "".join(f", {f}" for f, on in (("DNR", self.status.dnr),
                                                 ("More", self.status.more)) if on)
        self.args = (f"{error.command}: {self.name} (SCT {self.sct:#x}, SC {self.sc:#04x}"
                     f"{flags})",)


def zone_status_name(sct: int, sc: int) -> str | None:
    """The ZNS name of a zoned status (SCT 1h, SC B8h..BFh), None for other statuses."""
    return ZONE_STATUS_NAMES.get(sc) if sct == SCT_CMD_SPECIFIC else None


@contextlib.contextmanager
def zone_statuses() -> Iterator[None]:
    """Re-raise an NvmeError carrying a zoned status as ZoneError (its name filled in)."""
    try:
        yield
    except ZoneError:
        raise
    except NvmeError as e:
        if zone_status_name(e.sct, e.sc) is None:
            raise
        raise ZoneError(e) from None


def _u(raw: bytes, offset: int, size: int) -> int:
    return int.from_bytes(raw[offset:offset + size], "little")


# ---- Identify (ZNS §4.1.5) -------------------------------------------------------------------

@dataclass(frozen=True)
class LbaFormatExtension:
    """Zoned Namespace LBA Format Extension (ZNS §4.1.5.1, Figure 51)."""

    zsze: int                        # Zone Size, in logical blocks
    zdes: int                        # Zone Descriptor Extension Size, in 64-byte units


@dataclass(frozen=True)
class ZnsIdentifyNamespace:
    """I/O Command Set specific Identify Namespace for the Zoned set (CNS 05h, CSI 02h;
    ZNS §4.1.5.1, Figure 50). mar/mor are the 0's based fields as read (NO_LIMIT: none)."""

    raw: bytes
    zoc: int                         # Zone Operation Characteristics (VZCAP 0, ZAE 1)
    ozcs: int                        # Optional Zoned Command Support (RAZB 0, ZRWASUP 1)
    mar: int                         # Maximum Active Resources
    mor: int                         # Maximum Open Resources
    rrl: int                         # Reset Recommended Limit (s)
    frl: int                         # Finish Recommended Limit (s)
    rrl1: int
    rrl2: int
    rrl3: int
    frl1: int
    frl2: int
    frl3: int
    numzrwa: int
    zrwafg: int
    zrwasz: int
    zrwacap: int
    lbafe: tuple[LbaFormatExtension, ...]

    @classmethod
    def parse(cls, raw: bytes, nlbaf: int = MAX_LBA_FORMATS - 1) -> ZnsIdentifyNamespace:
        """nlbaf: the namespace's NLBAF (0's based): how many extensions are listed."""
        if len(raw) < 4096:
            raise ValueError(f"Identify ZNS Namespace data is 4096 bytes, got {len(raw)}")
        count = min(max(nlbaf, 0), MAX_LBA_FORMATS - 1) + 1
        ext = tuple(LbaFormatExtension(_u(raw, off, 8), raw[off + 8])
                    for off in range(LBAFE_OFFSET, LBAFE_OFFSET + count * LBAFE_SIZE,
                                     LBAFE_SIZE))
        return cls(raw=raw, zoc=_u(raw, 0, 2), ozcs=_u(raw, 2, 2), mar=_u(raw, 4, 4),
                   mor=_u(raw, 8, 4), rrl=_u(raw, 12, 4), frl=_u(raw, 16, 4),
                   rrl1=_u(raw, 20, 4), rrl2=_u(raw, 24, 4), rrl3=_u(raw, 28, 4),
                   frl1=_u(raw, 32, 4), frl2=_u(raw, 36, 4), frl3=_u(raw, 40, 4),
                   numzrwa=_u(raw, 44, 4), zrwafg=_u(raw, 48, 2), zrwasz=_u(raw, 50, 2),
                   zrwacap=raw[52], lbafe=ext)

    @property
    def max_active(self) -> int | None:
        """Maximum Active Resources as a natural count (None: no limit)."""
        return None if self.mar == NO_LIMIT else self.mar + 1

    @property
    def max_open(self) -> int | None:
        """Maximum Open Resources as a natural count (None: no limit)."""
        return None if self.mor == NO_LIMIT else self.mor + 1

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "raw"}
        d["lbafe"] = [asdict(e) for e in self.lbafe]
        return d


@dataclass(frozen=True)
class ZnsIdentifyController:
    """I/O Command Set specific Identify Controller for the Zoned set (CNS 06h, CSI 02h;
    ZNS §4.1.5.2, Figure 52)."""

    raw: bytes
    zasl: int                        # Zone Append Size Limit: 2^ZASL units of CAP.MPSMIN (0: MDTS)

    @classmethod
    def parse(cls, raw: bytes) -> ZnsIdentifyController:
        if len(raw) < 4096:
            raise ValueError(f"Identify ZNS Controller data is 4096 bytes, got {len(raw)}")
        return cls(raw=raw, zasl=raw[0])

    def to_dict(self) -> dict[str, Any]:
        return {"zasl": self.zasl}


def identify_ns_sqe(nsid: int) -> sqe.Sqe:
    """Identify CNS 05h CSI 02h (Base 2.0 §5.17.1: CSI in CDW11 31:24)."""
    return sqe.identify(CNS_CSI_NAMESPACE, nsid=nsid, csi=CSI_ZNS)


def identify_ctrl_sqe() -> sqe.Sqe:
    """Identify CNS 06h CSI 02h."""
    return sqe.identify(CNS_CSI_CONTROLLER, csi=CSI_ZNS)


def identify_zns_namespace(ctrl: Controller, nsid: int) -> ZnsIdentifyNamespace:
    nlbaf = ctrl.identify_namespace(nsid).nlbaf
    raw = ctrl._admin_read(identify_ns_sqe(nsid), 4096,
                           f"Identify CNS {CNS_CSI_NAMESPACE:#04x} CSI {CSI_ZNS:#04x} nsid {nsid}")
    return ZnsIdentifyNamespace.parse(raw, nlbaf)


def identify_zns_controller(ctrl: Controller) -> ZnsIdentifyController:
    raw = ctrl._admin_read(identify_ctrl_sqe(), 4096,
                           f"Identify CNS {CNS_CSI_CONTROLLER:#04x} CSI {CSI_ZNS:#04x}")
    return ZnsIdentifyController.parse(raw)



# ---- commands (ZNS §3.4) ---------------------------------------------------------------------

def _slba(cmd: sqe.Sqe, slba: int) -> sqe.Sqe:
    if not 0 <= slba < 1 << 64:
        raise ValueError(f"SLBA {slba} is outside 0..2^64-1")
    cmd.cdw10, cmd.cdw11 = slba & 0xFFFF_FFFF, slba >> 32
    return cmd


def zone_mgmt_send(nsid: int, slba: int, zsa: ZoneSendAction | int, *,
                   select_all: bool = False) -> sqe.Sqe:
    """Zone Management Send 79h: CDW10-11 SLBA, CDW13 ZSA 7:0, Select All 8 (ZNS §3.4.3)."""
    if not 0 <= zsa <= 0xFF:
        raise ValueError(f"ZSA {zsa} is outside 0..255")
    return _slba(sqe.Sqe(OPC_ZONE_MGMT_SEND, nsid, cdw13=int(zsa) | int(select_all) << 8),
                 slba)


def zone_mgmt_recv(nsid: int, slba: int, nbytes: int, *,
                   zra: ZoneReceiveAction | int = ZoneReceiveAction.REPORT_ZONES,
                   zrasf: ReportOption | int = ReportOption.ALL, partial: bool = False
                   ) -> sqe.Sqe:
    """Zone Management Receive 7Ah: CDW10-11 SLBA, CDW12 NUMD (0's based dwords), CDW13 ZRA
    7:0, ZRASF 15:8, Partial Report 16 (ZNS §3.4.2)."""
    if nbytes <= 0 or nbytes % 4 or nbytes > 1 << 34:
        raise ValueError(f"report length {nbytes} must be a positive multiple of 4 bytes")
    if not 0 <= zra <= 0xFF or not 0 <= zrasf <= 0xFF:
        raise ValueError(f"ZRA {zra} / ZRASF {zrasf} must be 0..255")
    return _slba(sqe.Sqe(OPC_ZONE_MGMT_RECV, nsid, cdw12=nbytes // 4 - 1,
                         cdw13=int(zra) | int(zrasf) << 8 | int(partial) << 16), slba)


def zone_append(nsid: int, zslba: int, nlb: int, *, fua: bool = False, lr: bool = False,
                prinfo: int = 0, ilbrt: int = 0, lbat: int = 0, lbatm: int = 0) -> sqe.Sqe:
    """Zone Append 7Dh: CDW10-11 ZSLBA, CDW12 NLB 15:0 (0's based), PRINFO 29:26, FUA 30,
    LR 31; CDW14 ILBRT; CDW15 LBATM 31:16, LBAT 15:0 (ZNS §3.4.1)."""
    if not 1 <= nlb <= MAX_NLB:
        raise ValueError(f"Zone Append: block count {nlb} is outside 1..{MAX_NLB}")
    if not 0 <= prinfo <= 0xF:
        raise ValueError(f"PRINFO {prinfo} is outside 0..15")
    cdw12 = (nlb - 1) | prinfo << 26 | int(fua) << 30 | int(lr) << 31
    return _slba(sqe.Sqe(OPC_ZONE_APPEND, nsid, cdw12=cdw12, cdw14=ilbrt & 0xFFFF_FFFF,
                         cdw15=(lbatm & 0xFFFF) << 16 | (lbat & 0xFFFF)), zslba)


# ---- zone descriptors (ZNS §3.4.2.2) -----------------------------------------------------------

@dataclass(frozen=True)
class Zone:
    """One Zone Descriptor (ZNS Figure 37); `ext`: its Zone Descriptor Extension (extended
    report only)."""

    zt: int                          # Zone Type (3:0 of byte 0)
    zs: int                          # Zone State (7:4 of byte 1), see ZoneState
    za: int                          # Zone Attributes
    zai: int                         # Zone Attributes Information (1.1)
    zcap: int                        # Zone Capacity, in logical blocks
    zslba: int                       # Zone Start LBA
    wp: int                          # Write Pointer
    ext: bytes = b""

    @property
    def state(self) -> ZoneState | int:
        try:
            return ZoneState(self.zs)
        except ValueError:
            return self.zs

    @classmethod
    def parse(cls, raw: bytes, ext: bytes = b"") -> Zone:
        zt, zs, za, zai, zcap, zslba, wp = struct.unpack_from("<4B4xQQQ", raw)
        return cls(zt & 0xF, zs >> 4, za, zai, zcap, zslba, wp, ext)


def parse_report(raw: bytes, *, ext_size: int = 0, limit: int | None = None) -> list[Zone]:
    """Zones of a report-zones buffer: the 64-byte header (NRZ) then descriptors, each with
    ext_size bytes of extension in an extended report. NRZ is bounded by what the buffer
    holds and by limit (the device's count is not trusted)."""
    if len(raw) < REPORT_HEADER_SIZE:
        raise ValueError(f"a zone report is at least {REPORT_HEADER_SIZE} bytes")
    nrz = _u(raw, 0, 8)
    step = ZONE_DESCRIPTOR_SIZE + ext_size
    fits = (len(raw) - REPORT_HEADER_SIZE) // step
    count = min(nrz, fits, limit if limit is not None else fits)
    zones = []
    for i in range(count):
        off = REPORT_HEADER_SIZE + i * step
        zones.append(Zone.parse(raw[off:off + ZONE_DESCRIPTOR_SIZE],
                                raw[off + ZONE_DESCRIPTOR_SIZE:off + step]))
    return zones


def report_count(raw: bytes) -> int:
    """NRZ of a report header, as the device wrote it."""
    return _u(raw, 0, 8)


# ---- ZonedNamespace --------------------------------------------------------------------------

class NotZonedError(IommuDmaError, ValueError):
    """The namespace is not a zoned one (or the controller was not enabled for zoned I/O)."""


class ZonedNamespace:
    """A zoned namespace: a `Namespace` (reads and writes at the write pointer go through it)
    plus the zoned commands. Zone arguments are zone start LBAs (ZSLBA)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.ctrl = ns.ctrl
        self.nsid = ns.nsid
        where = f"{ns.ctrl.bdf} namespace {ns.nsid}"
        try:
            self.zns = identify_zns_namespace(ns.ctrl, ns.nsid)
        except NvmeError as e:
            raise NotZonedError(f"{where} is not a zoned namespace (Identify CNS 05h CSI 02h: "
                                f"{e.name}); zoned commands need a ZNS namespace") from None
        index = ns.identify.format_index
        zsze = self.zns.lbafe[index].zsze if index < len(self.zns.lbafe) else 0
        if not 0 < zsze <= ns.blocks:
            raise NotZonedError(f"{where}: LBA format {index} has zone size {zsze} blocks (ZSZE "
                                f"must be 1..NSZE={ns.blocks}); not a zoned namespace")
        self.zone_size = zsze
        self.zone_count = ns.blocks // zsze
        self.zdes_bytes = self.zns.lbafe[index].zdes * 64
        self.zasl = identify_zns_controller(ns.ctrl).zasl
        self.max_append_blocks = self._append_limit()

    @classmethod
    def of(cls, ctrl: Controller, nsid: int) -> ZonedNamespace:
        """The zoned namespace nsid of ctrl."""
        return cls(ctrl.namespace(nsid))

    def _append_limit(self) -> int:
        """Largest Zone Append in blocks: ZASL (2^ZASL * CAP.MPSMIN bytes) or, when 0, the
        transfer limit (ZNS §4.1.5.2)."""
        limit = self.ctrl.max_transfer
        if self.zasl:
            limit = min(limit, (1 << min(self.zasl, 40)) * self.ctrl.cap.mps_min)
        return max(1, min(limit // self.ns.lba_size, MAX_NLB, self.zone_size))

    @property
    def lba_size(self) -> int:
        return self.ns.lba_size

    def __repr__(self) -> str:
        return (f"<ZonedNamespace {self.ctrl.bdf} nsid={self.nsid} {self.zone_count} zones of "
                f"{self.zone_size} x {self.lba_size} B>")

    def _zone_start(self, zslba: int) -> int:
        if not 0 <= zslba < self.zone_count * self.zone_size or zslba % self.zone_size:
            raise ValueError(f"nsid {self.nsid}: {zslba} is not a zone start LBA (zones start "
                             f"at multiples of {self.zone_size}, up to "
                             f"{(self.zone_count - 1) * self.zone_size})")
        return zslba

    # ---- report zones ------------------------------------------------------------------------

    def report_zones(self, slba: int = 0, count: int | None = None, *,
                     state: ReportOption | int = ReportOption.ALL,
                     extended: bool = False) -> list[Zone]:
        """Zone descriptors from the zone holding slba on, at most count of them (default: up
        to the last zone), of the zones state selects. Zone Management Receive with Partial
        Report set, as many commands as the transfer limit needs."""
        if not 0 <= slba < self.ns.blocks:
            raise ValueError(f"report zones: SLBA {slba} is outside namespace {self.nsid} "
                             f"(LBAs 0..{self.ns.blocks - 1})")
        first = slba // self.zone_size
        want = self.zone_count - first if count is None else count
        if want < 1:
            raise ValueError(f"report zones: count must be at least 1, not {count}")
        want = min(want, self.zone_count - first)
        ext = self.zdes_bytes if extended else 0
        zra = (ZoneReceiveAction.EXTENDED_REPORT_ZONES if extended
               else ZoneReceiveAction.REPORT_ZONES)
        step = ZONE_DESCRIPTOR_SIZE + ext
        per_cmd = max(1, (self.ctrl.max_transfer - REPORT_HEADER_SIZE) // step)
        zones: list[Zone] = []
        lba = first * self.zone_size
        while len(zones) < want and lba < self.zone_count * self.zone_size:
            n = min(per_cmd, want - len(zones))
            got = self._report_once(lba, n, zra, int(state), ext)
            zones += got
            if len(got) < n:                # fewer zones match from there on
                break
            lba = got[-1].zslba + self.zone_size
        return zones

    def _report_once(self, slba: int, n: int, zra: int, zrasf: int, ext: int) -> list[Zone]:
        size = REPORT_HEADER_SIZE + n * (ZONE_DESCRIPTOR_SIZE + ext)
        cmd = zone_mgmt_recv(self.nsid, slba, size, zra=zra, zrasf=zrasf, partial=True)
        with self.ctrl.alloc(size) as buf, zone_statuses():
            self.ns.queue.submit(cmd, buf.addr, size, f"Zone Management Receive nsid "
                                 f"{self.nsid} SLBA {slba}", owner=buf).result()
            raw = bytes(buf.view[:size])
        zones = parse_report(raw, ext_size=ext, limit=n)
        for z in zones:                       # distrust the device: LBAs inside the namespace
            if z.zslba % self.zone_size or z.zslba >= self.ns.blocks or z.zslba < slba:
                raise ValueError(f"nsid {self.nsid}: the device reported a zone at ZSLBA "
                                 f"{z.zslba:#x}, which is not a zone start at or after {slba}")
        return zones

    def count_zones(self, slba: int = 0, state: ReportOption | int = ReportOption.ALL) -> int:
        """How many zones from the one holding slba on match state: NRZ of a report without
        Partial Report (ZNS §3.4.2.2.1), bounded by the zones of the namespace."""
        if not 0 <= slba < self.ns.blocks:
            raise ValueError(f"report zones: SLBA {slba} is outside namespace {self.nsid} "
                             f"(LBAs 0..{self.ns.blocks - 1})")
        size = REPORT_HEADER_SIZE + ZONE_DESCRIPTOR_SIZE
        cmd = zone_mgmt_recv(self.nsid, slba, size, zrasf=int(state), partial=False)
        with self.ctrl.alloc(size) as buf, zone_statuses():
            self.ns.queue.submit(cmd, buf.addr, size, f"Zone Management Receive nsid "
                                 f"{self.nsid} SLBA {slba} (count)", owner=buf).result()
            nrz = report_count(bytes(buf.view[:8]))
        return min(nrz, self.zone_count - slba // self.zone_size)

    def zone(self, zslba: int) -> Zone:
        """The descriptor of the zone starting at zslba."""
        return self.report_zones(self._zone_start(zslba), 1)[0]

    # ---- zone management send ----------------------------------------------------------------

    def _send(self, zsa: ZoneSendAction, zslba: int | None, select_all: bool) -> None:
        if select_all == (zslba is not None):
            raise ValueError(f"{zsa.name.lower()}: give a zone start LBA or select_all=True "
                             "(Select All: every zone in a state the action applies to)")
        slba = 0 if zslba is None else self._zone_start(zslba)
        what = (f"Zone Management Send {zsa.name} nsid {self.nsid} "
                + ("all zones" if select_all else f"ZSLBA {slba}"))
        self.ctrl.check_open()
        with zone_statuses():
            self.ns.queue.submit(zone_mgmt_send(self.nsid, slba, zsa, select_all=select_all),
                                 what=what).result()

    def open(self, zslba: int | None = None, *, select_all: bool = False) -> None:
        """Open Zone (explicitly opened; counts against Max Open Resources)."""
        self._send(ZoneSendAction.OPEN, zslba, select_all)

    def close(self, zslba: int | None = None, *, select_all: bool = False) -> None:
        self._send(ZoneSendAction.CLOSE, zslba, select_all)

    def finish(self, zslba: int | None = None, *, select_all: bool = False) -> None:
        """Finish Zone: the zone becomes Full (write pointer to its end)."""
        self._send(ZoneSendAction.FINISH, zslba, select_all)

    def reset(self, zslba: int | None = None, *, select_all: bool = False) -> None:
        """Reset Zone: Empty, write pointer at ZSLBA (its data deallocated)."""
        self._send(ZoneSendAction.RESET, zslba, select_all)

    def offline(self, zslba: int | None = None, *, select_all: bool = False) -> None:
        """Offline Zone (only a Read Only zone may go offline)."""
        self._send(ZoneSendAction.OFFLINE, zslba, select_all)

    # ---- data ------------------------------------------------------------------------------

    def write(self, slba: int, data: ReadableBuffer) -> None:
        """Write at the write pointer (sequential write required zones); zoned statuses named."""
        with zone_statuses():
            self.ns.write(slba, data)

    def read(self, slba: int, nlb: int) -> bytes:
        with zone_statuses():
            return self.ns.read(slba, nlb)

    def append(self, zslba: int, data: ReadableBuffer, *, fua: bool = False) -> int:
        """Zone Append of data (whole blocks) to the zone at zslba; the LBA the controller
        wrote its first block at."""
        nbytes = memoryview(data).nbytes
        nlb, rest = divmod(nbytes, self.lba_size)
        if rest or nlb == 0:
            raise ValueError(f"append nsid {self.nsid}: {nbytes} bytes is not a positive "
                             f"multiple of the {self.lba_size}-byte block")
        with self.ctrl.alloc(nbytes) as buf:
            buf.view[:nbytes] = memoryview(data).cast("B")
            return self.append_from(zslba, buf, nlb, fua=fua)

    def append_from(self, zslba: int, buf: DataBuffer, nlb: int, *, fua: bool = False,
                    prinfo: int = 0, ilbrt: int = 0, lbat: int = 0, lbatm: int = 0) -> int:
        """Zone Append of nlb blocks from DMA-mapped buf (zero copy); the assigned LBA."""
        self._zone_start(zslba)
        if not 1 <= nlb <= self.max_append_blocks:
            raise ValueError(f"append nsid {self.nsid}: {nlb} blocks; one Zone Append moves "
                             f"1..{self.max_append_blocks} (ZASL {self.zasl}, transfer limit)")
        what = f"Zone Append nsid {self.nsid} ZSLBA {zslba} {nlb} blocks"
        addr = self.ns._data(buf, nlb, what)
        cmd = zone_append(self.nsid, zslba, nlb, fua=fua, prinfo=prinfo, ilbrt=ilbrt,
                          lbat=lbat, lbatm=lbatm)
        with zone_statuses():
            dw0 = self.ns.queue.submit(cmd, addr, nlb * self.lba_size, what,
                                       owner=buf).result()
        return self._assigned_lba(zslba, nlb, dw0)

    def _assigned_lba(self, zslba: int, nlb: int, dw0: int) -> int:
        """The LBA of the completion (ZNS §3.4.1.1: DW0 low, DW1 high 32 bits). The queue
        hands back DW0 only: the upper bits are those of ZSLBA (a zone spans less than 2^32
        blocks; a carry across 2^32 inside the zone is allowed for). Checked to lie in the
        zone."""
        lba = (zslba & ~0xFFFF_FFFF) | (dw0 & 0xFFFF_FFFF)
        if lba < zslba:
            lba += 1 << 32
        if not zslba <= lba <= zslba + self.zone_size - nlb:
            raise ValueError(f"Zone Append nsid {self.nsid}: the controller reported LBA "
                             f"{lba:#x}, outside the zone at {zslba:#x}")
        return lba
