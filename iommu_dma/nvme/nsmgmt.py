"""Namespace Management and Namespace Attachment (NVMe Base 2.0 §5.19, §5.20), and the
Identify lists that go with them: allocated namespaces (CNS 10h/11h), controllers attached to a
namespace (CNS 12h) and controllers in the NVM subsystem (CNS 13h).

    attach_namespace(ctrl, 2, [ctrl.identify.cntlid])
    assert 2 in ctrl.active_namespaces()
    detach_namespace(ctrl, 2, [ctrl.identify.cntlid])
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe
from iommu_dma.nvme.constants import (
    CNS_ALLOCATED_NAMESPACE,
    CNS_ALLOCATED_NS_LIST,
    CNS_CTRL_LIST,
    CNS_NS_CTRL_LIST,
)
from iommu_dma.nvme.identify import IdentifyNamespace, parse_ns_list

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

SEL_CREATE, SEL_DELETE = 0, 1        # Namespace Management CDW10 SEL
SEL_ATTACH, SEL_DETACH = 0, 1        # Namespace Attachment CDW10 SEL
IDENTIFY_SIZE = 4096


def create_data(nsze: int, ncap: int, flbas: int, *, dps: int = 0, nmic: int = 0,
                anagrpid: int = 0, nvmsetid: int = 0, endgid: int = 0) -> bytes:
    """The host-specified fields of Namespace Management create (Base §5.20.1, figure
    "Namespace Management - Host Software Specified Fields"; the Identify Namespace layout):
    NSZE 7:0, NCAP 15:8, FLBAS 26, DPS 29, NMIC 30, ANAGRPID 95:92, NVMSETID 101:100,
    ENDGID 103:102."""
    for name, value, bits in (("NSZE", nsze, 64), ("NCAP", ncap, 64), ("FLBAS", flbas, 8),
                              ("DPS", dps, 8), ("NMIC", nmic, 8), ("ANAGRPID", anagrpid, 32),
                              ("NVMSETID", nvmsetid, 16), ("ENDGID", endgid, 16)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name}={value} out of range [0, {(1 << bits) - 1}]")
    if nsze == 0 or ncap > nsze:
        raise ValueError(f"NSZE {nsze} / NCAP {ncap}: the size must be at least 1 block and "
                         "the capacity at most the size")
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQ", data, 0, nsze, ncap)
    data[26], data[29], data[30] = flbas, dps, nmic
    struct.pack_into("<I", data, 92, anagrpid)
    struct.pack_into("<HH", data, 100, nvmsetid, endgid)
    return bytes(data)


def parse_controller_list(raw: bytes) -> list[int]:
    """A Controller List (Base §4.5.1): u16 count, then that many controller IDs; the count
    is bounded by the 2047 identifiers the 4096 bytes hold."""
    if len(raw) < 2:
        raise ValueError(f"a controller list is at least 2 bytes, got {len(raw)}")
    count = min(struct.unpack_from("<H", raw)[0], sqe.CTRL_LIST_MAX, len(raw) // 2 - 1)
    return list(struct.unpack_from(f"<{count}H", raw, 2))


def _identify(ctrl: Controller, cns: int, nsid: int = 0, cntid: int = 0) -> bytes:
    with ctrl.alloc(IDENTIFY_SIZE) as buf:
        ctrl.admin_command(sqe.identify(cns, nsid=nsid, cntid=cntid), buf, IDENTIFY_SIZE,
                           what=f"Identify CNS {cns:#04x} nsid {nsid}")
        return bytes(buf.view[:IDENTIFY_SIZE])


def create_namespace(ctrl: Controller, nsze: int, ncap: int, flbas: int, *, dps: int = 0,
                     nmic: int = 0, csi: int = 0, timeout: float = 120.0) -> int:
    """Namespace Management create (SEL 0); returns the new NSID (completion DW0)."""
    data = create_data(nsze, ncap, flbas, dps=dps, nmic=nmic)
    with ctrl.alloc(IDENTIFY_SIZE) as buf:
        buf.view[:] = data
        return ctrl.admin_command(sqe.namespace_management(SEL_CREATE, csi=csi), buf,
                                  IDENTIFY_SIZE, what="Namespace Management (create)",
                                  timeout=timeout)


def delete_namespace(ctrl: Controller, nsid: int, *, timeout: float = 120.0) -> None:
    """Namespace Management delete (SEL 1) of nsid (FFFFFFFFh: every namespace)."""
    ctrl.admin_command(sqe.namespace_management(SEL_DELETE, nsid=nsid),
                       what=f"Namespace Management (delete) nsid {nsid}", timeout=timeout)
    ctrl.forget_namespace(nsid)


def _attachment(ctrl: Controller, nsid: int, sel: int, cntlids: Sequence[int] | None) -> None:
    ids = list(cntlids) if cntlids is not None else [ctrl.identify.cntlid]
    data = sqe.controller_list(ids)
    word = "attach" if sel == SEL_ATTACH else "detach"
    with ctrl.alloc(IDENTIFY_SIZE) as buf:
        buf.view[:] = data
        ctrl.admin_command(sqe.namespace_attachment(nsid, sel), buf, IDENTIFY_SIZE,
                           what=f"Namespace Attachment ({word}) nsid {nsid} controllers "
                                f"{','.join(map(str, ids))}")
    ctrl.forget_namespace(nsid)


def attach_namespace(ctrl: Controller, nsid: int, cntlids: Sequence[int] | None = None) -> None:
    """Namespace Attachment attach (SEL 0) of nsid to cntlids (default: this controller)."""
    _attachment(ctrl, nsid, SEL_ATTACH, cntlids)


def detach_namespace(ctrl: Controller, nsid: int, cntlids: Sequence[int] | None = None) -> None:
    """Namespace Attachment detach (SEL 1) of nsid from cntlids (default: this controller)."""
    _attachment(ctrl, nsid, SEL_DETACH, cntlids)


def attached_controllers(ctrl: Controller, nsid: int, cntid: int = 0) -> list[int]:
    """Identify CNS 12h: IDs (>= cntid) of the controllers nsid is attached to."""
    return parse_controller_list(_identify(ctrl, CNS_NS_CTRL_LIST, nsid, cntid))


def subsystem_controllers(ctrl: Controller, cntid: int = 0) -> list[int]:
    """Identify CNS 13h: IDs (>= cntid) of every controller in the NVM subsystem."""
    return parse_controller_list(_identify(ctrl, CNS_CTRL_LIST, 0, cntid))


def allocated_namespaces(ctrl: Controller, after: int = 0) -> list[int]:
    """Identify CNS 10h: allocated NSIDs above `after`, attached or not."""
    return parse_ns_list(_identify(ctrl, CNS_ALLOCATED_NS_LIST, after))


def identify_allocated(ctrl: Controller, nsid: int) -> IdentifyNamespace:
    """Identify CNS 11h: Identify Namespace of an allocated namespace, attached or not."""
    return IdentifyNamespace.parse(_identify(ctrl, CNS_ALLOCATED_NAMESPACE, nsid))
