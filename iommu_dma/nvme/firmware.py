"""Firmware Image Download and Firmware Commit (NVMe Base 2.0 §5.12, §5.13).

    download_firmware(ctrl, image, xfer=4096)      # pieces of xfer bytes, in order
    commit_firmware(ctrl, slot=1, action=CA_REPLACE_AND_ACTIVATE)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommu_dma.nvme import sqe

if TYPE_CHECKING:
    from iommu_dma.nvme.controller import Controller

# Firmware Commit CDW10 CA (Base §5.12, figure "Firmware Commit - Commit Action")
CA_REPLACE = 0                       # download to slot FS, not activated
CA_REPLACE_AND_ACTIVATE = 1          # download to FS, activated at the next reset
CA_ACTIVATE = 2                      # activate slot FS at the next reset
CA_ACTIVATE_NOW = 3                  # replace and activate at once, no reset
CA_REPLACE_BOOT_PARTITION = 6
CA_ACTIVATE_BOOT_PARTITION = 7
COMMIT_ACTIONS = {
    CA_REPLACE: "replace the image in the slot", CA_REPLACE_AND_ACTIVATE:
    "replace and activate at the next reset", CA_ACTIVATE: "activate the slot at the next reset",
    CA_ACTIVATE_NOW: "replace and activate immediately", 4: "reserved", 5: "reserved",
    CA_REPLACE_BOOT_PARTITION: "replace boot partition",
    CA_ACTIVATE_BOOT_PARTITION: "activate boot partition",
}
DEFAULT_XFER = 4096                  # bytes per Firmware Image Download (nvme-cli's default)
MAX_IMAGE = 256 << 20               # largest image file the CLI reads


def download_firmware(ctrl: Controller, image: bytes, *, xfer: int = DEFAULT_XFER,
                      offset: int = 0) -> int:
    """Send image in pieces of at most xfer bytes (a multiple of 4, within the controller's
    largest transfer; FWUG in Identify Controller gives the device's granularity) starting at
    byte offset; returns the number of commands sent."""
    if not image or len(image) % 4:
        raise ValueError(f"firmware image of {len(image)} bytes: it must be a non-empty "
                         "multiple of 4 bytes (dwords)")
    if xfer <= 0 or xfer % 4 or xfer > ctrl.max_transfer:
        raise ValueError(f"xfer {xfer}: a piece must be a positive multiple of 4 bytes, at most "
                         f"the controller's largest transfer ({ctrl.max_transfer})")
    sent = 0
    with ctrl.alloc(xfer) as buf:
        for pos in range(0, len(image), xfer):
            piece = image[pos:pos + xfer]
            buf.view[:len(piece)] = piece
            ctrl.admin_command(sqe.fw_image_download(len(piece), offset + pos), buf,
                               len(piece), what=f"Firmware Image Download offset "
                                                f"{offset + pos} ({len(piece)} bytes)")
            sent += 1
    return sent


def commit_firmware(ctrl: Controller, slot: int, action: int, *, bpid: int = 0) -> int:
    """Firmware Commit of slot (0: the controller chooses) with commit action CA; returns
    DW0. A status "Firmware Activation Requires ... Reset" means it worked and waits for that
    reset."""
    return ctrl.admin_command(sqe.fw_commit(slot, action, bpid=bpid),
                              what=f"Firmware Commit slot {slot} action {action}")
