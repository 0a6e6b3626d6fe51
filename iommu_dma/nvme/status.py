"""NVMe completion status: decoding of the 15-bit Status field, the spec's names, the retry
rule, and the NvmeError family.

Names follow the NVMe Base Specification 2.0 (§4.6.1.2, figures "Generic Command Status Values",
"Command Specific Status Values", "Media and Data Integrity Errors", "Path Related Status")
and the NVM Command Set Specification 1.0 for the I/O-command values (80h-BFh).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.nvme.constants import (
    SC_FORMAT_IN_PROGRESS,
    SC_INTERNAL_PATH_ERROR,
    SC_NS_NOT_READY,
    SCT_CMD_SPECIFIC,
    SCT_GENERIC,
    SCT_MEDIA,
    SCT_PATH,
    SCT_VENDOR,
)

__all__ = [
    "NOT_RETRIED", "RETRYABLE", "SCT_CMD_SPECIFIC", "SCT_GENERIC", "SCT_MEDIA", "SCT_PATH",
    "SCT_VENDOR", "ControllerFailedError", "ControllerFatalError", "ControllerResetError",
    "DeviceGoneError", "NvmeError", "NvmeTimeoutError", "Status", "decode_status",
    "is_retryable", "make_status", "status_from_dw3", "status_name",
]

STATUS_BITS = 15                     # CQE DW3 31:17 (Base §4.6.1)


# ---- the Status field (Base §4.6.1: SC 7:0, SCT 10:8, CRD 12:11, More 13, DNR 14) ------------

@dataclass(frozen=True)
class Status:
    """Decoded Status field: SC 7:0, SCT 10:8, CRD 12:11, More 13, DNR 14."""

    raw: int
    sc: int = field(init=False)
    sct: int = field(init=False)
    crd: int = field(init=False)
    more: bool = field(init=False)
    dnr: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sc", self.raw & 0xFF)
        object.__setattr__(self, "sct", (self.raw >> 8) & 0x7)
        object.__setattr__(self, "crd", (self.raw >> 11) & 0x3)
        object.__setattr__(self, "more", bool(self.raw >> 13 & 1))
        object.__setattr__(self, "dnr", bool(self.raw >> 14 & 1))

    @property
    def ok(self) -> bool:
        """Successful Completion: SCT 0, SC 0 (CRD/More/DNR do not make a failure)."""
        return self.sc == 0 and self.sct == SCT_GENERIC

    def __str__(self) -> str:
        flags = "".join(f" {n}" for n, on in (("MORE", self.more), ("DNR", self.dnr)) if on)
        return f"SCT {self.sct:#x} SC {self.sc:#04x} CRD {self.crd}{flags}"


def _field(name: str, value: int, bits: int) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name}={value} out of range [0, {(1 << bits) - 1}]")
    return value


def decode_status(status: int) -> Status:
    """Decode the 15-bit status field (as in idma_cpl.status)."""
    return Status(_field("status", status, STATUS_BITS))


def status_from_dw3(dw3: int) -> Status:
    """Decode the status of a raw CQE DW3 (CID 15:0, phase 16, status 31:17)."""
    return Status((dw3 >> 17) & 0x7FFF)


def make_status(sc: int, sct: int = SCT_GENERIC, *, crd: int = 0, more: bool = False,
                dnr: bool = False) -> int:
    """Compose a 15-bit status field (handy for tests and simulated completions)."""
    return (_field("sc", sc, 8) | _field("sct", sct, 3) << 8 | _field("crd", crd, 2) << 11
            | int(more) << 13 | int(dnr) << 14)


# ---- names (Base §4.6.1.2) -------------------------------------------------------------------

_GENERIC = {
    0x00: "Successful Completion", 0x01: "Invalid Command Opcode",
    0x02: "Invalid Field in Command", 0x03: "Command ID Conflict",
    0x04: "Data Transfer Error", 0x05: "Commands Aborted due to Power Loss Notification",
    0x06: "Internal Error", 0x07: "Command Abort Requested",
    0x08: "Command Aborted due to SQ Deletion",
    0x09: "Command Aborted due to Failed Fused Command",
    0x0A: "Command Aborted due to Missing Fused Command", 0x0B: "Invalid Namespace or Format",
    0x0C: "Command Sequence Error", 0x0D: "Invalid SGL Segment Descriptor",
    0x0E: "Invalid Number of SGL Descriptors", 0x0F: "Data SGL Length Invalid",
    0x10: "Metadata SGL Length Invalid", 0x11: "SGL Descriptor Type Invalid",
    0x12: "Invalid Use of Controller Memory Buffer", 0x13: "PRP Offset Invalid",
    0x14: "Atomic Write Unit Exceeded", 0x15: "Operation Denied", 0x16: "SGL Offset Invalid",
    0x18: "Host Identifier Inconsistent Format", 0x19: "Keep Alive Timer Expired",
    0x1A: "Keep Alive Timeout Invalid", 0x1B: "Command Aborted due to Preempt and Abort",
    0x1C: "Sanitize Failed", 0x1D: "Sanitize In Progress",
    0x1E: "SGL Data Block Granularity Invalid",
    0x1F: "Command Not Supported for Queue in CMB", 0x20: "Namespace is Write Protected",
    0x21: "Command Interrupted", 0x22: "Transient Transport Error",
    0x23: "Command Prohibited by Command and Feature Lockdown",
    0x24: "Admin Command Media Not Ready",
    # NVM Command Set, generic values 80h-BFh
    0x80: "LBA Out of Range", 0x81: "Capacity Exceeded", 0x82: "Namespace Not Ready",
    0x83: "Reservation Conflict", 0x84: "Format In Progress",
}

_COMMAND_SPECIFIC = {
    0x00: "Completion Queue Invalid", 0x01: "Invalid Queue Identifier",
    0x02: "Invalid Queue Size", 0x03: "Abort Command Limit Exceeded",
    0x05: "Asynchronous Event Request Limit Exceeded", 0x06: "Invalid Firmware Slot",
    0x07: "Invalid Firmware Image", 0x08: "Invalid Interrupt Vector", 0x09: "Invalid Log Page",
    0x0A: "Invalid Format", 0x0B: "Firmware Activation Requires Conventional Reset",
    0x0C: "Invalid Queue Deletion", 0x0D: "Feature Identifier Not Saveable",
    0x0E: "Feature Not Changeable", 0x0F: "Feature Not Namespace Specific",
    0x10: "Firmware Activation Requires NVM Subsystem Reset",
    0x11: "Firmware Activation Requires Controller Level Reset",
    0x12: "Firmware Activation Requires Maximum Time Violation",
    0x13: "Firmware Activation Prohibited", 0x14: "Overlapping Range",
    0x15: "Namespace Insufficient Capacity", 0x16: "Namespace Identifier Unavailable",
    0x18: "Namespace Already Attached", 0x19: "Namespace Is Private",
    0x1A: "Namespace Not Attached", 0x1B: "Thin Provisioning Not Supported",
    0x1C: "Controller List Invalid", 0x1D: "Device Self-test In Progress",
    0x1E: "Boot Partition Write Prohibited", 0x1F: "Invalid Controller Identifier",
    0x20: "Invalid Secondary Controller State", 0x21: "Invalid Number of Controller Resources",
    0x22: "Invalid Resource Identifier",
    # NVM Command Set specific values 80h-BFh
    0x80: "Conflicting Attributes", 0x81: "Invalid Protection Information",
    0x82: "Attempted Write to Read Only Range", 0x83: "Command Size Limit Exceeded",
    # Zoned Namespace Command Set values (ZNS 1.1 §4.1.1.1): a plain Write on a zoned
    # namespace gets them too
    0xB8: "Zone Boundary Error", 0xB9: "Zone Is Full", 0xBA: "Zone Is Read Only",
    0xBB: "Zone Is Offline", 0xBC: "Zone Invalid Write", 0xBD: "Too Many Active Zones",
    0xBE: "Too Many Open Zones", 0xBF: "Invalid Zone State Transition",
}

_MEDIA = {
    0x80: "Write Fault", 0x81: "Unrecovered Read Error",
    0x82: "End-to-end Guard Check Error", 0x83: "End-to-end Application Tag Check Error",
    0x84: "End-to-end Reference Tag Check Error", 0x85: "Compare Failure",
    0x86: "Access Denied", 0x87: "Deallocated or Unwritten Logical Block",
    0x88: "End-to-End Storage Tag Check Error",
}

_PATH = {
    0x00: "Internal Path Error", 0x01: "Asymmetric Access Persistent Loss",
    0x02: "Asymmetric Access Inaccessible", 0x03: "Asymmetric Access Transition",
    0x60: "Controller Pathing Error", 0x70: "Host Pathing Error",
    0x71: "Command Aborted By Host",
}

_NAMES = {SCT_GENERIC: _GENERIC, SCT_CMD_SPECIFIC: _COMMAND_SPECIFIC,
          SCT_MEDIA: _MEDIA, SCT_PATH: _PATH}

# Transient statuses worth retrying, and only while DNR is clear (Base 2.0 §4.6.1: DNR set
# means the same command is expected to fail again).
# Generic statuses that end a command on purpose and are never retried: Command Abort Requested
# (07h), Command Aborted due to SQ Deletion (08h).
NOT_RETRIED = {(SCT_GENERIC, 0x07), (SCT_GENERIC, 0x08)}
# Statuses the spec itself calls transient (kept for callers that want the narrow rule).
RETRYABLE = {(SCT_GENERIC, SC_NS_NOT_READY), (SCT_GENERIC, SC_FORMAT_IN_PROGRESS),
             (SCT_PATH, SC_INTERNAL_PATH_ERROR)}


def status_name(sct: int, sc: int) -> str:
    """The spec's name of a status, e.g. status_name(0, 0x80) == 'LBA Out of Range'."""
    name = _NAMES.get(sct, {}).get(sc)
    if name is not None:
        return name
    if sct == SCT_VENDOR:
        return f"Vendor Specific status {sc:#04x}"
    return f"Unknown status (SCT {sct:#x}, SC {sc:#04x})"


def is_retryable(status: Status) -> bool:
    """The Linux driver's rule: a failure may be retried unless the controller set DNR
    (§4.6.1.2.1 "Do Not Retry") or the command was aborted on purpose."""
    return not status.ok and not status.dnr and (status.sct, status.sc) not in NOT_RETRIED


class NvmeError(IommuDmaError):
    """A command completed with an error status: name, SCT/SC, DNR and More, and the command."""

    def __init__(self, status: int | Status, command: str) -> None:
        self.status = status if isinstance(status, Status) else decode_status(status)
        self.command = command
        self.name = status_name(self.status.sct, self.status.sc)
        flags = "".join(f", {f}" for f, on in (("DNR", self.status.dnr),
                                                 ("More", self.status.more)) if on)
        super().__init__(f"{command}: {self.name} (SCT {self.status.sct:#x}, "
                         f"SC {self.status.sc:#04x}{flags})")

    @property
    def sct(self) -> int:
        return self.status.sct

    @property
    def sc(self) -> int:
        return self.status.sc

    @property
    def dnr(self) -> bool:
        return self.status.dnr

    @property
    def retryable(self) -> bool:
        return is_retryable(self.status)


class NvmeTimeoutError(IommuDmaError):
    """A command did not complete in time; the controller should be reset."""


class ControllerFailedError(IommuDmaError):
    """The controller stopped serving commands; the request did not complete. The subclass
    says why. Its buffers were released only after the device could no longer reach them."""

    def __init__(self, bdf: str, command: str, why: str) -> None:
        self.bdf = bdf
        self.command = command
        self.why = why
        # Exception's own __init__: ClosedError (a base of DeviceGoneError) words differently
        Exception.__init__(self, f"{bdf}: {command}: {why}" if command else f"{bdf}: {why}")

    def again(self, command: str = "") -> ControllerFailedError:
        """A fresh error of the same kind (for the next caller), naming its command."""
        return type(self)(self.bdf, command, self.why)


class ControllerResetError(ControllerFailedError):
    """Aborted by a controller reset (Controller.reset(), or recovery from a timed-out
    command); the command may or may not have run on the device. Retry it if it is safe to."""


class ControllerFatalError(ControllerFailedError):
    """The controller reported Controller Fatal Status (CSTS.CFS, NVMe Base 2.0 §3.1.4.6):
    nothing completes until Controller.reset()."""


class DeviceGoneError(ControllerFailedError, ClosedError):
    """The device vanished (registers read all ones) or the kernel asked for it back
    (hot removal): the controller is closed; nothing more can be sent."""
