"""Device Self-test (NVMe Base 2.0 §5.10) and its log page (LID 06h, §5.16.1.7).

    start_self_test(ctrl, STC_SHORT)
    log = self_test_log(ctrl)          # log.current_operation, log.completion, log.results
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe
from iommu_dma.nvme.constants import LID_DEVICE_SELF_TEST, NSID_ALL

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

STC_SHORT, STC_EXTENDED, STC_VENDOR, STC_ABORT = 0x1, 0x2, 0xE, 0xF
STC_NAMES = {0x0: "none", STC_SHORT: "short", STC_EXTENDED: "extended",
             STC_VENDOR: "vendor specific", STC_ABORT: "abort"}
LOG_SIZE = 564                       # 4 bytes of header, 20 results of 28 bytes
RESULTS = 20
RESULT_SIZE = 28
# Self-test Result Data Structure byte 0 3:0 (Base §5.16.1.7, figure "Device Self-test Result")
RESULT_NAMES = {
    0x0: "completed without error", 0x1: "aborted by a Device Self-test command",
    0x2: "aborted by a Controller Level Reset", 0x3: "aborted by a namespace removal",
    0x4: "aborted by a Format NVM command", 0x5: "fatal or unknown test error",
    0x6: "completed with a failed segment (segment unknown)",
    0x7: "completed with one or more failed segments", 0x8: "aborted for an unknown reason",
    0x9: "aborted by a sanitize operation", 0xF: "entry not used",
}


@dataclass(frozen=True)
class SelfTestResult:
    result: int            # byte 0 3:0
    code: int              # byte 0 7:4: the STC of that test
    segment: int           # byte 1: failed segment number
    valid: int             # byte 2: which of NSID, FLBA, SCT, SC are valid (bits 0..3)
    power_on_hours: int    # bytes 11:4
    nsid: int              # bytes 15:12
    failing_lba: int       # bytes 23:16
    sct: int               # byte 24 2:0
    sc: int                # byte 25

    @property
    def result_name(self) -> str:
        return RESULT_NAMES.get(self.result, f"reserved result {self.result:#x}")


@dataclass(frozen=True)
class SelfTestLog:
    current_operation: int     # byte 0 3:0: the STC of the test running (0: none)
    completion: int            # byte 1 6:0: percent done of that test
    results: list[SelfTestResult]   # newest first; unused entries left out


def parse_self_test_log(raw: bytes) -> SelfTestLog:
    if len(raw) < LOG_SIZE:
        raise ValueError(f"Device Self-test log: {len(raw)} bytes, expected {LOG_SIZE}")
    results = []
    for i in range(RESULTS):
        off = 4 + i * RESULT_SIZE
        status, seg, valid, _, poh, nsid, flba, sct, sc = struct.unpack_from(
            "<BBBBQIQBB", raw, off)
        if status & 0xF == 0xF:
            continue
        results.append(SelfTestResult(status & 0xF, status >> 4, seg, valid, poh, nsid, flba,
                                      sct & 0x7, sc))
    return SelfTestLog(raw[0] & 0xF, raw[1] & 0x7F, results)


def start_self_test(ctrl: Controller, stc: int, nsid: int = NSID_ALL) -> None:
    """Device Self-test with code STC (1 short, 2 extended, Fh abort) on nsid (0: the
    controller only; FFFFFFFFh: it and every namespace). It runs in the background: poll
    self_test_log()."""
    ctrl.admin_command(sqe.device_self_test(stc, nsid),
                       what=f"Device Self-test STC {stc:#x} ({STC_NAMES.get(stc, 'reserved')})"
                            f" nsid {nsid:#x}")


def self_test_log(ctrl: Controller) -> SelfTestLog:
    return parse_self_test_log(ctrl.get_log_page(LID_DEVICE_SELF_TEST, LOG_SIZE))
