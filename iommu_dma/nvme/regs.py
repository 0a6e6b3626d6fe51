"""NVMe controller registers in BAR0 (NVMe Base 2.0 §3.1.4) and their fields."""

from __future__ import annotations

from dataclasses import dataclass

CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ = (
    0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30)

CC_EN = 1 << 0
CC_CSS_NVM = 0 << 4
CC_CSS_CSI = 6 << 4          # 110b: all supported I/O command sets (NVMe Base 2.0 §3.1.3.5)
CC_SHN_NORMAL = 1 << 14
CC_SHN_MASK = 3 << 14
CC_IOSQES = 6 << 16          # 64-byte SQ entries (2^6)
CC_IOCQES = 4 << 20          # 16-byte CQ entries (2^4)

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_MASK = 3 << 2
CSTS_SHST_COMPLETE = 2 << 2
CSTS_GONE = 0xFFFF_FFFF      # all ones: the device is no longer there (surprise removal)


@dataclass(frozen=True)
class Capabilities:
    """CAP (offset 00h), §3.1.4.1."""

    raw: int

    @property
    def mqes(self) -> int:
        """Maximum queue entries (the register holds the 0's based value)."""
        return (self.raw & 0xFFFF) + 1

    @property
    def cqr(self) -> bool:
        return bool(self.raw >> 16 & 1)

    @property
    def timeout_ms(self) -> int:
        """CAP.TO: worst-case time to become ready, in 500 ms units."""
        return ((self.raw >> 24) & 0xFF) * 500

    @property
    def dstrd(self) -> int:
        return (self.raw >> 32) & 0xF

    @property
    def css_nvm(self) -> bool:
        return bool((self.raw >> 37) & 1)

    @property
    def css_csi(self) -> bool:
        """CAP.CSS bit 6 (CAP bit 43): the controller supports one or more I/O command sets
        selected by CSI (e.g. Zoned Namespaces) and CC.CSS = 110b (§3.1.3.1)."""
        return bool((self.raw >> 43) & 1)

    @property
    def mps_min(self) -> int:
        """Smallest memory page size in bytes (2^(12 + MPSMIN))."""
        return 1 << (12 + ((self.raw >> 48) & 0xF))

    @property
    def mps_max(self) -> int:
        return 1 << (12 + ((self.raw >> 52) & 0xF))


def cc_css(cap: Capabilities) -> int:
    """CC.CSS as the Linux driver chooses it: 110b (all supported I/O command sets, so that
    zoned namespaces take the Zoned commands) when CAP.CSS bit 6 says the controller has them,
    else 000b (NVM command set only) (NVMe Base 2.0 §3.1.3.5, CC.CSS)."""
    return CC_CSS_CSI if cap.css_csi else CC_CSS_NVM


def cc_value(page_size: int, css: int = CC_CSS_NVM) -> int:
    """CC for an enabled controller with page_size pages and command sets css (§3.1.4.5)."""
    mps = page_size.bit_length() - 1 - 12
    return CC_EN | css | mps << 7 | CC_IOSQES | CC_IOCQES


def aqa_value(asq_entries: int, acq_entries: int) -> int:
    """AQA: 0's based admin queue sizes, ACQS 27:16 and ASQS 11:0 (§3.1.4.8)."""
    return (acq_entries - 1) << 16 | (asq_entries - 1)
