"""Sanitize (NVMe Base 2.0 §5.24) and the Sanitize Status log page (LID 81h, §5.16.1.25).

    start_sanitize(ctrl, SANACT_BLOCK_ERASE)
    print(sanitize_status(ctrl))
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

SANACT_EXIT_FAILURE = 1
SANACT_BLOCK_ERASE = 2
SANACT_OVERWRITE = 3
SANACT_CRYPTO_ERASE = 4
SANACT_NAMES = {SANACT_EXIT_FAILURE: "exit failure mode", SANACT_BLOCK_ERASE: "block erase",
                SANACT_OVERWRITE: "overwrite", SANACT_CRYPTO_ERASE: "crypto erase"}
LID_SANITIZE_STATUS = 0x81
LOG_SIZE = 512
# SSTAT 2:0 (figure "Sanitize Status")
SSTAT_NAMES = {0: "never sanitized", 1: "completed successfully", 2: "in progress",
               3: "failed", 4: "completed successfully with no-deallocate inhibited"}


@dataclass(frozen=True)
class SanitizeStatus:
    sprog: int        # bytes 1:0: progress, in 1/65536 of the operation
    sstat: int        # bytes 3:2
    scdw10: int       # bytes 7:4: CDW10 of the Sanitize command that started it

    @property
    def state(self) -> str:
        return SSTAT_NAMES.get(self.sstat & 0x7, f"reserved {self.sstat & 0x7}")


def parse_sanitize_status(raw: bytes) -> SanitizeStatus:
    if len(raw) < 8:
        raise ValueError(f"Sanitize Status log: {len(raw)} bytes, expected at least 8")
    return SanitizeStatus(*struct.unpack_from("<HHI", raw))


def start_sanitize(ctrl: Controller, sanact: int, *, ause: bool = False, owpass: int = 0,
                   oipbp: bool = False, ndas: bool = False, ovrpat: int = 0) -> None:
    """Sanitize (every namespace of the NVM subsystem is erased; runs in the background)."""
    if sanact not in SANACT_NAMES:
        raise ValueError(f"SANACT {sanact}: choose 1 (exit failure mode), 2 (block erase), "
                         "3 (overwrite) or 4 (crypto erase)")
    ctrl.admin_command(sqe.sanitize(sanact, ause=ause, owpass=owpass, oipbp=oipbp, ndas=ndas,
                                    ovrpat=ovrpat),
                       what=f"Sanitize ({SANACT_NAMES[sanact]})")


def sanitize_status(ctrl: Controller) -> SanitizeStatus:
    return parse_sanitize_status(ctrl.get_log_page(LID_SANITIZE_STATUS, LOG_SIZE))
