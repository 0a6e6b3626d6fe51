"""IOMMU backends under Container: the legacy VFIO type1 container and iommufd.

One small interface (IommuBackend): attach a device's group or the device, hand out a device
fd, map/unmap a fixed IOVA = VA range, report IOVA ranges / page sizes / mapping budget, close.
Refcounts, the native maptable and the aperture checks stay in Container, above this.

- "container": /dev/vfio/vfio + /dev/vfio/N groups, VFIO_TYPE1v2_IOMMU (every kernel with VFIO).
- "iommufd": /dev/iommu with one IOAS; devices opened through their cdev
  /dev/vfio/devices/vfioN, VFIO_DEVICE_BIND_IOMMUFD then VFIO_DEVICE_ATTACH_IOMMUFD_PT
  (CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV, Linux 6.6+).

Which one: the `backend` argument, else $IOMMU_DMA_BACKEND, else iommufd when /dev/iommu and
the device's cdev exist (and are accessible), else the container.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from iommu_dma import iommufd, vfio
from iommu_dma.discovery import VFIO_DRIVER, find, group_devices
from iommu_dma.errors import (
    DeviceBusyError,
    GroupNotViableError,
    IommuDmaError,
    NoIommuError,
    NotBoundError,
    PermissionDeniedError,
    VfioError,
)

log = logging.getLogger(__name__)

BACKEND_ENV = "IOMMU_DMA_BACKEND"
CONTAINER = "container"
IOMMUFD = "iommufd"
BACKENDS = (CONTAINER, IOMMUFD)
CONTAINER_PATH = "/dev/vfio/vfio"
# module parameters that let VFIO attach without interrupt remapping, per backend
UNSAFE_PARAMS = {CONTAINER: "vfio_iommu_type1.allow_unsafe_interrupts",
                 IOMMUFD: "iommufd.allow_unsafe_interrupts"}
SYS_MODULE = Path("/sys/module")
PROC_INTERRUPTS = Path("/proc/interrupts")


@dataclass(frozen=True)
class BackendInfo:
    page_sizes: int                              # bitmap; the lowest bit is the IOMMU page
    iova_ranges: tuple[tuple[int, int], ...]     # inclusive [start, end] pairs
    dma_avail: int | None                        # mappings left, when the kernel bounds them


class IommuBackend(Protocol):
    """What Container needs from an IOMMU interface (see the module text)."""

    name: str
    fd: int

    @property
    def groups(self) -> list[int]: ...

    def attach(self, target: int | str) -> int: ...

    def device_fd(self, bdf: str) -> int: ...

    def map(self, iova: int, length: int) -> None: ...

    def unmap(self, iova: int, length: int) -> None: ...

    def unmap_all(self) -> None: ...

    def info(self) -> BackendInfo: ...

    def close(self) -> BaseException | None: ...


# ---- selection -------------------------------------------------------------------------------

def requested_backend(backend: str | None) -> str | None:
    """The forced backend (argument, else $IOMMU_DMA_BACKEND), None for automatic."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "").strip()
    if not choice or choice == "auto":
        return None
    if choice not in BACKENDS:
        source = "backend argument" if backend is not None else f"${BACKEND_ENV}"
        raise IommuDmaError(f"{source} is {choice!r}: expected one of "
                            f"{', '.join(BACKENDS)} (or auto)")
    return choice


def iommufd_usable(path: str = iommufd.IOMMUFD_PATH) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def cdev_usable(bdf: str) -> bool:
    path = iommufd.cdev_path(bdf)
    return path is not None and os.access(path, os.R_OK | os.W_OK)


def auto_backend(bdfs: list[str], iommufd_path: str = iommufd.IOMMUFD_PATH) -> str:
    """iommufd when /dev/iommu and every given device's cdev are there and usable."""
    if bdfs and iommufd_usable(iommufd_path) and all(cdev_usable(b) for b in bdfs):
        return IOMMUFD
    return CONTAINER


def bdfs_of(target: int | str) -> list[str]:
    """The vfio-pci devices a target names: a BDF, or every vfio-pci member of a group."""
    group = parse_group(target)
    if group is None:
        return [find(str(target), nvme=False).bdf]
    return [bdf for bdf, driver in group_devices(group) if driver == VFIO_DRIVER]


def parse_group(target: int | str) -> int | None:
    """A group number from 9, '9' or '/dev/vfio/9'; None when target looks like a BDF."""
    if isinstance(target, int):
        return target
    name = target.rsplit("/", 1)[-1] if target.startswith("/dev/vfio/") else target
    return int(name) if name.isdigit() else None


# ---- interrupt remapping ---------------------------------------------------------------------

def unsafe_interrupts_allowed(backend: str) -> bool:
    """The backend's allow_unsafe_interrupts module parameter is set (Y or 1)."""
    module, param = UNSAFE_PARAMS[backend].split(".")
    try:
        value = (SYS_MODULE / module / "parameters" / param).read_text().strip()
    except OSError:
        return False
    return value in ("Y", "1")


def interrupt_remapping_seen() -> bool:
    """True when /proc/interrupts shows an interrupt-remapping chip ("IR-PCI-MSI"...)."""
    try:
        return "IR-" in PROC_INTERRUPTS.read_text()
    except OSError:
        return False


def unsafe_interrupts_warning(backend: str) -> str:
    return (f"{backend}: {UNSAFE_PARAMS[backend]}=1 is set and no interrupt remapping is seen "
            "(virtio-iommu, or an IOMMU without intremap): VFIO attached the device anyway, so "
            "it could raise interrupts it should not (MSI writes are not isolated); fine on a "
            "test bench, not on a shared machine")


def missing_remapping_text(backend: str) -> str:
    """The refusal text when VFIO would not attach for lack of interrupt remapping."""
    return (f"{backend}: VFIO refused the device (EPERM): the IOMMU has no interrupt remapping "
            f"(virtio-iommu, or intel-iommu without intremap=on); boot the kernel with "
            f"{UNSAFE_PARAMS[backend]}=1 (test benches only: a device could forge interrupts) "
            "or use an IOMMU with interrupt remapping")


def _warn_if_unsafe(backend: str) -> None:
    if unsafe_interrupts_allowed(backend) and not interrupt_remapping_seen():
        log.warning("%s", unsafe_interrupts_warning(backend))


def _refused(e: VfioError, backend: str) -> VfioError:
    """EPERM on attach means no interrupt remapping: say so and name the parameter."""
    if e.errno == errno.EPERM:
        return VfioError(e.op, errno.EPERM, missing_remapping_text(backend))
    return e


# ---- the legacy container --------------------------------------------------------------------

class Type1Backend:
    """/dev/vfio/vfio with groups attached and the TYPE1v2 IOMMU (fd: the container fd)."""

    name = CONTAINER

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.group_fds: dict[int, int] = {}          # group number -> group fd
        self.unmap_all_supported = False

    @property
    def groups(self) -> list[int]:
        return sorted(self.group_fds)

    def attach(self, target: int | str) -> int:
        group = self._group_of(target)
        if group not in self.group_fds:
            self._attach_group(group)
        return group

    @staticmethod
    def _group_of(target: int | str) -> int:
        group = parse_group(target)
        if group is not None:
            return group
        info = find(str(target), nvme=False)
        if info.iommu_group is None:
            raise NoIommuError("attach", f"{info.bdf} has no IOMMU group (IOMMU off? boot "
                                         "with intel_iommu=on)")
        if info.driver != VFIO_DRIVER:
            raise NotBoundError(info.bdf, info.driver, "attach")
        return info.iommu_group

    def _attach_group(self, group: int) -> None:
        path = f"/dev/vfio/{group}"
        gfd = open_group(path, group)
        try:
            if not vfio.group_get_status(gfd) & vfio.VFIO_GROUP_FLAGS_VIABLE:
                raise GroupNotViableError(group, group_devices(group))
            try:
                vfio.group_set_container(gfd, self.fd)
            except VfioError as e:
                raise _refused(e, CONTAINER) from None
            try:
                if not self.group_fds:
                    # vfio.h: SET_IOMMU is only valid once a group is in the container
                    self._set_iommu()
            except BaseException:
                vfio.group_unset_container(gfd)
                raise
        except BaseException:
            os.close(gfd)
            raise
        self.group_fds[group] = gfd
        _warn_if_unsafe(CONTAINER)

    def _set_iommu(self) -> None:
        try:
            vfio.set_iommu(self.fd, vfio.VFIO_TYPE1v2_IOMMU)
        except VfioError as e:
            raise _refused(e, CONTAINER) from None
        self.unmap_all_supported = vfio.check_extension(self.fd, vfio.VFIO_UNMAP_ALL)

    def group_fd(self, group: int) -> int:
        if group not in self.group_fds:
            raise IommuDmaError(f"IOMMU group {group} is not attached to this container")
        return self.group_fds[group]

    def device_fd(self, bdf: str) -> int:
        info = find(bdf, nvme=False)
        group = self.attach(info.bdf)
        return vfio.group_get_device_fd(self.group_fds[group], info.bdf)

    def map(self, iova: int, length: int) -> None:
        vfio.iommu_map_dma(self.fd, iova, iova, length)

    def unmap(self, iova: int, length: int) -> None:
        vfio.iommu_unmap_dma(self.fd, iova, length)

    def unmap_all(self) -> None:
        vfio.iommu_unmap_all(self.fd)

    def info(self) -> BackendInfo:
        i = vfio.iommu_get_info(self.fd)
        return BackendInfo(i.page_sizes, i.iova_ranges, i.dma_avail)

    def close(self) -> BaseException | None:
        """Detach every group and close every fd; returns the first failure."""
        first: BaseException | None = None
        for gfd in self.group_fds.values():
            try:
                vfio.group_unset_container(gfd)
            except VfioError as e:
                first = first or e
            os.close(gfd)
        self.group_fds.clear()
        os.close(self.fd)
        return first


def open_container(path: str = CONTAINER_PATH) -> int:
    """Open /dev/vfio/vfio and check it speaks the VFIO API with a TYPE1v2 IOMMU."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoIommuError(f"open {path}", f"{path} does not exist (modprobe vfio-pci)",
                           errno.ENOENT) from None
    except PermissionError:
        raise PermissionDeniedError(path) from None
    try:
        version = vfio.get_api_version(fd)
        if version != vfio.VFIO_API_VERSION:
            raise VfioError("VFIO_GET_API_VERSION", None,
                            f"kernel speaks VFIO API {version}, expected {vfio.VFIO_API_VERSION}")
        if not vfio.check_extension(fd, vfio.VFIO_TYPE1v2_IOMMU):
            raise NoIommuError("VFIO_CHECK_EXTENSION", "the kernel offers no VFIO TYPE1v2 "
                               "IOMMU (modprobe vfio_iommu_type1)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_group(path: str, group: int) -> int:
    try:
        return vfio.open_node(path)
    except FileNotFoundError:
        members = group_devices(group)
        if not members:
            raise NoIommuError(f"open {path}", f"IOMMU group {group} does not exist",
                               errno.ENOENT) from None
        bdf, driver = members[0]
        raise NotBoundError(bdf, driver, f"open {path}") from None


# ---- iommufd ---------------------------------------------------------------------------------

@dataclass
class BoundDevice:
    """A device opened through its cdev, bound to our iommufd and attached to the IOAS."""

    bdf: str
    path: str            # /dev/vfio/devices/vfioN
    fd: int
    dev_id: int          # VFIO_DEVICE_BIND_IOMMUFD out_devid
    hwpt_id: int         # VFIO_DEVICE_ATTACH_IOMMUFD_PT pt_id written back
    group: int


class IommufdBackend:
    """/dev/iommu with one IOAS; devices bound through their cdevs (fd: the iommufd).

    The bound device fd stays with the backend until close (like a group stays in a legacy
    container); device_fd() hands out duplicates of it."""

    name = IOMMUFD

    def __init__(self, path: str = iommufd.IOMMUFD_PATH) -> None:
        self.fd = iommufd.open_iommufd(path)
        try:
            self.ioas_id = iommufd.ioas_alloc(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.devices: dict[str, BoundDevice] = {}
        self.alignment = 0

    @property
    def groups(self) -> list[int]:
        return sorted({d.group for d in self.devices.values()})

    def attach(self, target: int | str) -> int:
        bdfs = bdfs_of(target)
        group = parse_group(target)
        if not bdfs:
            raise NoIommuError("attach", f"IOMMU group {group} has no device bound to vfio-pci")
        for bdf in bdfs:
            bound = self._bind(bdf)
            group = bound.group
        assert group is not None
        return group

    def _bind(self, bdf: str) -> BoundDevice:
        if bdf in self.devices:
            return self.devices[bdf]
        info = find(bdf, nvme=False)
        if info.iommu_group is None:
            raise NoIommuError("attach", f"{bdf} has no IOMMU group (IOMMU off? boot with "
                                         "intel_iommu=on)")
        if info.driver != VFIO_DRIVER:
            raise NotBoundError(bdf, info.driver, "attach")
        others = [m for m in info.group_members if m[1] not in (None, VFIO_DRIVER, "pcieport")]
        if others:
            raise GroupNotViableError(info.iommu_group, [(bdf, info.driver), *others])
        path = iommufd.cdev_path(bdf)
        if path is None:
            raise NoIommuError("attach", f"iommufd: {bdf} has no VFIO cdev "
                               f"(/sys/bus/pci/devices/{bdf}/vfio-dev/vfioN): the kernel lacks "
                               "CONFIG_VFIO_DEVICE_CDEV; use IOMMU_DMA_BACKEND=container")
        try:
            fd = vfio.open_node(path)
        except FileNotFoundError:       # unbound between the sysfs look and the open
            raise NotBoundError(bdf, None, f"open {path}") from None
        try:
            dev_id, hwpt_id = self._bind_attach(fd, path)
        except BaseException:
            os.close(fd)
            raise
        bound = BoundDevice(bdf, path, fd, dev_id, hwpt_id, info.iommu_group)
        self.devices[bdf] = bound
        _warn_if_unsafe(IOMMUFD)
        return bound

    def _bind_attach(self, fd: int, path: str) -> tuple[int, int]:
        try:
            dev_id = iommufd.device_bind_iommufd(fd, self.fd)
            hwpt_id = iommufd.device_attach_pt(fd, self.ioas_id)
        except DeviceBusyError:
            raise DeviceBusyError(path, "VFIO_DEVICE_BIND_IOMMUFD") from None
        except VfioError as e:
            if e.errno == errno.EINVAL and e.op == "VFIO_DEVICE_BIND_IOMMUFD":
                raise DeviceBusyError(path, e.op) from None
            raise _refused(e, IOMMUFD) from None
        return dev_id, hwpt_id

    def device_fd(self, bdf: str) -> int:
        return os.dup(self._bind(find(bdf, nvme=False).bdf).fd)

    def map(self, iova: int, length: int) -> None:
        iommufd.ioas_map_fixed(self.fd, self.ioas_id, iova, iova, length)

    def unmap(self, iova: int, length: int) -> None:
        iommufd.ioas_unmap(self.fd, self.ioas_id, iova, length)

    def unmap_all(self) -> None:
        iommufd.ioas_unmap_all(self.fd, self.ioas_id)

    def info(self) -> BackendInfo:
        ranges, alignment = iommufd.ioas_iova_ranges(self.fd, self.ioas_id)
        self.alignment = alignment
        # iommufd.h: out_iova_alignment <= PAGE_SIZE; 1 = any IOVA. The IOMMU page we align
        # to is the larger of it and the CPU page (pinning works in CPU pages).
        page = max(alignment, os.sysconf("SC_PAGE_SIZE"))
        if page & (page - 1):
            raise VfioError("IOMMU_IOAS_IOVA_RANGES", errno.EPROTO,
                            f"iommufd: out_iova_alignment {alignment:#x} is not a power of two")
        return BackendInfo(page, ranges, None)

    def close(self) -> BaseException | None:
        """Close the device fds (which unbinds them), then the iommufd (which destroys the
        IOAS and its mappings)."""
        first: BaseException | None = None
        for dev in self.devices.values():
            try:
                os.close(dev.fd)
            except OSError as e:
                first = first or e
        self.devices.clear()
        os.close(self.fd)
        return first


def open_backend(name: str) -> IommuBackend:
    """A backend by name, opened now (errors name the backend and the fix)."""
    if name == IOMMUFD:
        return IommufdBackend()
    return Type1Backend(open_container())
