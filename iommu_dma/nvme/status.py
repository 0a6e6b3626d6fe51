"""NVMe completion status names and the NvmeError family.

Names follow the NVMe Base Specification 2.0 (Figures "Generic Command Status Values",
"Command Specific Status Values", "Media and Data Integrity Errors", "Path Related Status")
and the NVM Command Set Specification 1.0 for the I/O-command values.
"""

from __future__ import annotations

from iommu_dma.errors import IommuDmaError
from iommu_dma.nvme.sqe import Status, decode_status

SCT_GENERIC, SCT_COMMAND_SPECIFIC, SCT_MEDIA, SCT_PATH, SCT_VENDOR = 0, 1, 2, 3, 7

SCT_NAMES = {
    SCT_GENERIC: "Generic Command Status",
    SCT_COMMAND_SPECIFIC: "Command Specific Status",
    SCT_MEDIA: "Media and Data Integrity Errors",
    SCT_PATH: "Path Related Status",
    SCT_VENDOR: "Vendor Specific",
}

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

_NAMES = {SCT_GENERIC: _GENERIC, SCT_COMMAND_SPECIFIC: _COMMAND_SPECIFIC,
          SCT_MEDIA: _MEDIA, SCT_PATH: _PATH}

# Transient statuses worth retrying, and only while DNR is clear (Base 2.0 §4.6.1.2: DNR set
# means the same command is expected to fail again).
RETRYABLE = {(SCT_GENERIC, 0x82), (SCT_GENERIC, 0x84), (SCT_PATH, 0x00)}


def status_name(sct: int, sc: int) -> str:
    """The spec's name of a status, e.g. status_name(0, 0x80) == 'LBA Out of Range'."""
    name = _NAMES.get(sct, {}).get(sc)
    if name is not None:
        return name
    if sct == SCT_VENDOR:
        return f"Vendor Specific status {sc:#04x}"
    return f"Unknown status (SCT {sct:#x}, SC {sc:#04x})"


def is_retryable(status: Status) -> bool:
    """Retry only what the spec calls transient, and only when the controller allows (DNR=0)."""
    return not status.dnr and (status.sct, status.sc) in RETRYABLE


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
