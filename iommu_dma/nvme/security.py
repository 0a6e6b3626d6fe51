"""Security Send / Security Receive (NVMe Base 2.0 §5.25, §5.26): the transport of a security
protocol (SECP, e.g. 00h protocol discovery, 01h TCG, EAh NVMe in-band authentication)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

MAX_SECURITY_DATA = 64 << 10         # what we move in one command (bounded by max_transfer)


def _check_len(ctrl: Controller, n: int, what: str) -> None:
    limit = min(MAX_SECURITY_DATA, ctrl.max_transfer)
    if not 0 <= n <= limit:
        raise ValueError(f"{what}: {n} bytes; give 0..{limit}")


def security_send(ctrl: Controller, secp: int, spsp: int, data: bytes, *, nssf: int = 0) -> int:
    """Security Send of data to protocol SECP / SPSP; returns DW0."""
    _check_len(ctrl, len(data), "Security Send")
    cmd = sqe.security_send(secp, spsp, len(data), nssf=nssf)
    what = f"Security Send SECP {secp:#04x} SPSP {spsp:#06x}"
    if not data:
        return ctrl.admin_command(cmd, what=what)
    with ctrl.alloc(len(data)) as buf:
        buf.view[:len(data)] = data
        return ctrl.admin_command(cmd, buf, len(data), what=what)


def security_receive(ctrl: Controller, secp: int, spsp: int, al: int, *,
                     nssf: int = 0) -> bytes:
    """Security Receive of up to al bytes from protocol SECP / SPSP."""
    _check_len(ctrl, al, "Security Receive")
    cmd = sqe.security_receive(secp, spsp, al, nssf=nssf)
    what = f"Security Receive SECP {secp:#04x} SPSP {spsp:#06x}"
    if al == 0:
        ctrl.admin_command(cmd, what=what)
        return b""
    with ctrl.alloc(al) as buf:
        ctrl.admin_command(cmd, buf, al, what=what)
        return bytes(buf.view[:al])
