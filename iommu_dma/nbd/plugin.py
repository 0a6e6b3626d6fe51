"""The script nbdkit's python plugin loads: `nbdkit python .../iommu_dma/nbd/plugin.py
bdf=BDF [nsid=N] [wait=MODE] [chunk=BYTES] [readonly=1]` (`iommu-dma serve` builds that line).

nbdkit (python plugin API 2) calls the module-level functions below. The controller is opened
once, before nbdkit listens (get_ready), with a queue pair per nbdkit worker thread, and shut
down (CC.SHN) after the last connection (cleanup). Requests run in parallel (nbdkit's
"parallel" thread model): NamespaceExport is thread-safe.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import nbdkit

from iommu_dma.discovery import normalize_bdf
from iommu_dma.errors import IommuDmaError
from iommu_dma.nbd.export import CHUNK, ExportError, NamespaceExport, nbd_errno
from iommu_dma.nvme.controller import Controller
from iommu_dma.nvme.interrupts import WAIT_MODES

API_VERSION = 2
PREFIX = "iommu-dma serve"

_config: dict[str, str] = {}
_state: dict[str, Any] = {}          # "ctrl", "export" once get_ready has run

F = TypeVar("F", bound=Callable[..., Any])


class RequestError(IommuDmaError):
    """What nbdkit logs for a failed request (its errno was set with nbdkit.set_error)."""


def _export() -> NamespaceExport:
    export = _state.get("export")
    if export is None:
        raise ExportError(errno.ESHUTDOWN, "the export is closed")
    return export


def _request(op: str) -> Callable[[F], F]:
    """Run a request; a failure sets its NBD errno and is logged in one line by nbdkit."""
    def wrap(fn: F) -> F:
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - every failure becomes an NBD error
                code = nbd_errno(e)
                nbdkit.set_error(code)
                text = " ".join(str(e).split()) or type(e).__name__
                if not isinstance(e, ExportError):          # its text names the errno
                    text += f" [{errno.errorcode.get(code, code)}]"
                raise RequestError(f"{op}: {text}") from None
        return run  # type: ignore[return-value]
    return wrap


# ---- configuration and lifetime ------------------------------------------------------------

def config(key: str, value: str) -> None:
    if key not in ("bdf", "nsid", "wait", "chunk", "readonly"):
        raise ValueError(f"{PREFIX}: unknown parameter {key}= (known: bdf, nsid, wait, chunk, "
                         "readonly)")
    _config[key] = value


def config_complete() -> None:
    if "bdf" not in _config:
        raise ValueError(f"{PREFIX}: bdf= is required (the controller's PCI address)")
    _config["bdf"] = normalize_bdf(_config["bdf"])
    if _config.get("wait", "interrupt") not in WAIT_MODES:
        raise ValueError(f"{PREFIX}: wait= must be one of {', '.join(WAIT_MODES)}")


def get_ready() -> None:
    """Open the controller and the namespace before nbdkit starts listening."""
    ctrl = Controller.open(_config["bdf"], wait=_config.get("wait", "interrupt"),  # type: ignore[arg-type]
                           per_thread_queues=True)
    try:
        ns = ctrl.namespace(int(_config.get("nsid", "1")))
        export = NamespaceExport(ns, readonly=_config.get("readonly") == "1",
                                 chunk=int(_config.get("chunk", str(CHUNK))))
    except BaseException:
        ctrl.close()
        raise
    _state.update(ctrl=ctrl, export=export)
    caps = export.caps
    print(f"{PREFIX}: namespace {ns.nsid} of {ctrl.bdf}: {caps.size} bytes in {caps.lba_size}-"
          f"byte blocks; write={caps.can_write} trim={caps.can_trim} "
          f"fast-zero={caps.cheap_zero} volatile-cache={caps.volatile_cache}",
          file=sys.stderr, flush=True)


def cleanup() -> None:
    """After the last connection: flush, then shut the controller down."""
    export, ctrl = _state.pop("export", None), _state.pop("ctrl", None)
    if export is not None:
        export.close()
        if export.caps.can_write:
            try:
                export.flush()
            except Exception as e:  # noqa: BLE001 - reported; the shutdown still runs
                print(f"{PREFIX}: flush at shutdown failed: {e}", file=sys.stderr, flush=True)
    if ctrl is not None:
        ctrl.close()
        print(f"{PREFIX}: controller {ctrl.bdf} shut down ({ctrl.queues_created} I/O queue "
              "pairs were created while serving)", file=sys.stderr, flush=True)


def unload() -> None:
    cleanup()


# ---- per connection ------------------------------------------------------------------------

def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's name for it
    _export()
    return 1


def get_size(h: int) -> int:
    return _export().caps.size


def can_write(h: int) -> bool:
    return _export().caps.can_write


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return _export().caps.can_trim


def can_zero(h: int) -> bool:
    return _export().caps.can_write


def can_fast_zero(h: int) -> bool:
    return _export().caps.cheap_zero


def can_fua(h: int) -> int:
    # native: FUA sets the commands' FUA bit (or nothing is cached: writes are durable)
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: int) -> bool:
    # every connection uses the same controller, and Flush covers what completed on all of its
    # queues: a flush on one connection persists the writes the others saw complete
    return True


def is_rotational(h: int) -> bool:
    return False


@_request("read")
def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    _export().pread(memoryview(buf).cast("B"), offset)


@_request("write")
def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    _export().pwrite(memoryview(buf).cast("B"), offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_request("flush")
def flush(h: int, flags: int) -> None:
    _export().flush()


@_request("trim")
def trim(h: int, count: int, offset: int, flags: int) -> None:
    _export().trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))


@_request("zero")
def zero(h: int, count: int, offset: int, flags: int) -> None:
    _export().zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
                   fua=bool(flags & nbdkit.FLAG_FUA), fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
