"""Get Features / Set Features (NVMe Base 2.0 §5.15, §5.27): every feature identifier nvme-cli
names, its fields in CDW11 / completion DW0, and the features that move a data buffer.

    f = get_feature(ctrl, FID_TEMPERATURE_THRESHOLD)        # Feature(fid, sel, value, data)
    print(f.name, f.fields())                                # {'TMPTH': 343, ...}
    set_feature(ctrl, FID_VOLATILE_WRITE_CACHE, 1, save=False)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe
from iommu_dma.nvme.constants import (
    FID_APST,
    FID_ARBITRATION,
    FID_ASYNC_EVENT_CONFIG,
    FID_CTRL_METADATA,
    FID_ENDURANCE_EVENT_CONFIG,
    FID_ENH_CTRL_METADATA,
    FID_ERROR_RECOVERY,
    FID_HOST_BEHAVIOR,
    FID_HOST_ID,
    FID_HOST_MEMORY_BUFFER,
    FID_HOST_THERMAL_MGMT,
    FID_INTERRUPT_COALESCING,
    FID_INTERRUPT_VECTOR_CONFIG,
    FID_IOCS_PROFILE,
    FID_KEEP_ALIVE_TIMER,
    FID_LBA_RANGE_TYPE,
    FID_LBA_STATUS_ATTRS,
    FID_NON_OP_POWER_STATE,
    FID_NS_METADATA,
    FID_NUMBER_OF_QUEUES,
    FID_PLM_CONFIG,
    FID_PLM_WINDOW,
    FID_POWER_MANAGEMENT,
    FID_READ_RECOVERY_LEVEL,
    FID_RESV_MASK,
    FID_RESV_PERSIST,
    FID_SANITIZE_CONFIG,
    FID_SPINUP_CONTROL,
    FID_SW_PROGRESS,
    FID_TEMPERATURE_THRESHOLD,
    FID_TIMESTAMP,
    FID_VOLATILE_WRITE_CACHE,
    FID_WRITE_ATOMICITY,
    FID_WRITE_PROTECT,
    SEL_CAPABILITIES,
    SEL_CURRENT,
)

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

# Largest data buffer of any feature (LBA Range Type, metadata features: 4096 bytes)
MAX_FEATURE_DATA = 4096
SEL_NAMES = {0: "Current", 1: "Default", 2: "Saved", 3: "Supported capabilities"}

# (field name, low bit, high bit) of CDW11 / DW0, per feature (Base §5.27.1.x figures)
Fields = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class FeatureInfo:
    fid: int
    name: str
    fields: Fields = ()
    data_len: int = 0                   # bytes of its data buffer (0: none)
    ns_specific: bool = False


_INFOS = (
    FeatureInfo(FID_ARBITRATION, "Arbitration",
                (("AB", 0, 2), ("LPW", 8, 15), ("MPW", 16, 23), ("HPW", 24, 31))),
    FeatureInfo(FID_POWER_MANAGEMENT, "Power Management", (("PS", 0, 4), ("WH", 5, 7))),
    FeatureInfo(FID_LBA_RANGE_TYPE, "LBA Range Type", (("NUM", 0, 5),), 4096, True),
    FeatureInfo(FID_TEMPERATURE_THRESHOLD, "Temperature Threshold",
                (("TMPTH", 0, 15), ("TMPSEL", 16, 19), ("THSEL", 20, 21))),
    FeatureInfo(FID_ERROR_RECOVERY, "Error Recovery", (("TLER", 0, 15), ("DULBE", 16, 16)),
                ns_specific=True),
    FeatureInfo(FID_VOLATILE_WRITE_CACHE, "Volatile Write Cache", (("WCE", 0, 0),)),
    FeatureInfo(FID_NUMBER_OF_QUEUES, "Number of Queues", (("NSQ", 0, 15), ("NCQ", 16, 31))),
    FeatureInfo(FID_INTERRUPT_COALESCING, "Interrupt Coalescing",
                (("THR", 0, 7), ("TIME", 8, 15))),
    FeatureInfo(FID_INTERRUPT_VECTOR_CONFIG, "Interrupt Vector Configuration",
                (("IV", 0, 15), ("CD", 16, 16))),
    FeatureInfo(FID_WRITE_ATOMICITY, "Write Atomicity Normal", (("DN", 0, 0),)),
    FeatureInfo(FID_ASYNC_EVENT_CONFIG, "Asynchronous Event Configuration",
                (("SMART", 0, 7), ("NAN", 8, 8), ("FAN", 9, 9), ("TLN", 10, 10),
                 ("ANACN", 11, 11), ("PLEALCN", 12, 12), ("LSIN", 13, 13), ("EGEALCN", 14, 14),
                 ("DLPCN", 31, 31))),
    FeatureInfo(FID_APST, "Autonomous Power State Transition", (("APSTE", 0, 0),), 256),
    FeatureInfo(FID_HOST_MEMORY_BUFFER, "Host Memory Buffer", (("EHM", 0, 0), ("MR", 1, 1)),
                4096),
    FeatureInfo(FID_TIMESTAMP, "Timestamp", (), 8),
    FeatureInfo(FID_KEEP_ALIVE_TIMER, "Keep Alive Timer", (("KATO", 0, 31),)),
    FeatureInfo(FID_HOST_THERMAL_MGMT, "Host Controlled Thermal Management",
                (("TMT2", 0, 15), ("TMT1", 16, 31))),
    FeatureInfo(FID_NON_OP_POWER_STATE, "Non-Operational Power State Config",
                (("NOPPME", 0, 0),)),
    FeatureInfo(FID_READ_RECOVERY_LEVEL, "Read Recovery Level Config", (("RRL", 0, 3),)),
    FeatureInfo(FID_PLM_CONFIG, "Predictable Latency Mode Config", (("LPE", 0, 0),), 512),
    FeatureInfo(FID_PLM_WINDOW, "Predictable Latency Mode Window", (("WSS", 0, 2),)),
    FeatureInfo(FID_LBA_STATUS_ATTRS, "LBA Status Information Report Interval",
                (("LSIRI", 0, 15), ("LSIPI", 16, 31))),
    FeatureInfo(FID_HOST_BEHAVIOR, "Host Behavior Support", (), 512),
    FeatureInfo(FID_SANITIZE_CONFIG, "Sanitize Config", (("NODRM", 0, 0),)),
    FeatureInfo(FID_ENDURANCE_EVENT_CONFIG, "Endurance Group Event Configuration",
                (("ENDGID", 0, 15), ("EGCW", 16, 23))),
    FeatureInfo(FID_IOCS_PROFILE, "I/O Command Set Profile", (("IOCSCI", 0, 8),)),
    FeatureInfo(FID_SPINUP_CONTROL, "Spinup Control", (("SPIE", 0, 0),)),
    FeatureInfo(FID_ENH_CTRL_METADATA, "Enhanced Controller Metadata", (), 4096),
    FeatureInfo(FID_CTRL_METADATA, "Controller Metadata", (), 4096),
    FeatureInfo(FID_NS_METADATA, "Namespace Metadata", (), 4096, True),
    FeatureInfo(FID_SW_PROGRESS, "Software Progress Marker", (("PBSLC", 0, 7),)),
    FeatureInfo(FID_HOST_ID, "Host Identifier", (("EXHID", 0, 0),), 8),
    FeatureInfo(FID_RESV_MASK, "Reservation Notification Mask",
                (("REGPRE", 1, 1), ("RESREL", 2, 2), ("RESPRE", 3, 3)), ns_specific=True),
    FeatureInfo(FID_RESV_PERSIST, "Reservation Persistence", (("PTPL", 0, 0),),
                ns_specific=True),
    FeatureInfo(FID_WRITE_PROTECT, "Namespace Write Protection Config", (("WPS", 0, 2),),
                ns_specific=True),
)
FEATURES: dict[int, FeatureInfo] = {f.fid: f for f in _INFOS}


def feature_info(fid: int) -> FeatureInfo:
    """What is known of fid (a reserved or vendor FID gets a generic entry)."""
    info = FEATURES.get(fid)
    if info is not None:
        return info
    kind = "Vendor Specific" if fid >= 0xC0 else "Reserved"
    return FeatureInfo(fid, f"{kind} feature {fid:#04x}")


def feature_name(fid: int) -> str:
    return feature_info(fid).name


def decode_fields(fid: int, value: int) -> dict[str, int]:
    """The named fields of DW0 (Get) or CDW11 (Set) of feature fid."""
    return {name: (value >> lo) & ((1 << (hi - lo + 1)) - 1)
            for name, lo, hi in feature_info(fid).fields}


def decode_capabilities(dw0: int) -> dict[str, bool]:
    """Get Features with SEL 3 (Base §5.15.1, "Supported Capabilities"): bit 0 saveable,
    1 namespace specific, 2 changeable."""
    return {"saveable": bool(dw0 & 1), "namespace_specific": bool(dw0 & 2),
            "changeable": bool(dw0 & 4)}


def decode_data(fid: int, data: bytes) -> dict[str, object]:
    """The fields of a feature's data buffer, for the features whose layout is common."""
    if fid == FID_TIMESTAMP and len(data) >= 8:
        # Base §5.27.1.11: Timestamp 47:0 (ms since the epoch), Synch bit 48, TO 51:49
        raw = struct.unpack_from("<Q", data)[0]
        return {"timestamp_ms": raw & ((1 << 48) - 1), "synch": raw >> 48 & 1,
                "timestamp_origin": raw >> 49 & 7}
    if fid == FID_HOST_BEHAVIOR and data:
        # Base §5.27.1.18: byte 0 ACRE (Advanced Command Retry Enable); byte 1 ETDAS and
        # byte 2 LBAFEE (later revisions)
        return {"acre": data[0] & 1, "etdas": data[1] & 1 if len(data) > 1 else 0,
                "lbafee": data[2] & 1 if len(data) > 2 else 0}
    if fid == FID_APST and len(data) >= 256:
        # Base §5.27.1.12: 32 entries of 8 bytes: ITPS 7:3, ITPT 31:8 (ms)
        entries = struct.unpack_from("<32Q", data)
        return {"entries": [{"itps": e >> 3 & 0x1F, "itpt": e >> 8 & 0xFFFFFF}
                            for e in entries]}
    if fid == FID_LBA_RANGE_TYPE and len(data) >= 64:
        # NVM §4.1.3.1: 64-byte entries: Type 0, Attributes 1, SLBA 23:16, NLB 31:24 (0's based)
        out = []
        for off in range(0, len(data) - 63, 64):
            typ, attrs, slba, nlb = struct.unpack_from("<BB14xQQ", data, off)
            if typ or attrs or slba or nlb:
                out.append({"type": typ, "attributes": attrs, "slba": slba, "nlb": nlb + 1})
        return {"ranges": out}
    return {}


@dataclass(frozen=True)
class Feature:
    """What Get Features returned: DW0 and, for features with a data buffer, the data."""

    fid: int
    sel: int
    value: int
    data: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str:
        return feature_name(self.fid)

    def fields(self) -> dict[str, object]:
        if self.sel == SEL_CAPABILITIES:
            return dict(decode_capabilities(self.value))
        return {**decode_fields(self.fid, self.value), **decode_data(self.fid, self.data)}


def _data_len(fid: int, data_len: int | None) -> int:
    n = feature_info(fid).data_len if data_len is None else data_len
    if not 0 <= n <= MAX_FEATURE_DATA:
        raise ValueError(f"feature {fid:#04x}: data length {n} out of range 0..{MAX_FEATURE_DATA}")
    return n


def get_feature(ctrl: Controller, fid: int, *, sel: int = SEL_CURRENT, nsid: int = 0,
                cdw11: int = 0, data_len: int | None = None) -> Feature:
    """Get Features (Base §5.15). data_len: bytes of the data buffer (default: the feature's
    own size, 0 for features without one; SEL 3 moves no data)."""
    n = 0 if sel == SEL_CAPABILITIES else _data_len(fid, data_len)
    cmd = sqe.get_features(fid, sel=sel, nsid=nsid, cdw11=cdw11)
    what = f"Get Features FID {fid:#04x} ({feature_name(fid)}) SEL {sel}"
    if not n:
        return Feature(fid, sel, ctrl.admin_command(cmd, what=what))
    with ctrl.alloc(4096) as buf:
        dw0 = ctrl.admin_command(cmd, buf, n, what=what)
        return Feature(fid, sel, dw0, bytes(buf.view[:n]))


def set_feature(ctrl: Controller, fid: int, value: int = 0, *, save: bool = False,
                nsid: int = 0, data: bytes | None = None, cdw12: int = 0) -> int:
    """Set Features (Base §5.27): CDW11 = value, SV = save; data goes in the data buffer for
    features that take one. Returns DW0 of the completion."""
    what = f"Set Features FID {fid:#04x} ({feature_name(fid)})"
    cmd = sqe.set_features(fid, value, nsid=nsid, save=save, cdw12=cdw12)
    if not data:
        return ctrl.admin_command(cmd, what=what)
    _data_len(fid, len(data))
    with ctrl.alloc(4096) as buf:
        buf.view[:len(data)] = data
        return ctrl.admin_command(cmd, buf, len(data), what=what)
