"""Pure logic of `iommu-dma serve`: nbdkit's command line, the URI, NBD errnos, the log relay."""

from __future__ import annotations

import errno
import sys

import pytest

from iommu_dma.cli.main import main
from iommu_dma.errors import ClosedError
from iommu_dma.nbd.export import ExportError, nbd_errno
from iommu_dma.nbd.server import (
    PLUGIN,
    LogRelay,
    ServeError,
    ServeOptions,
    check_python,
    nbdkit_argv,
    plugin_python,
)
from iommu_dma.nvme.constants import SCT_CMD_SPECIFIC, SCT_GENERIC, SCT_MEDIA
from iommu_dma.nvme.status import NvmeError, NvmeTimeoutError, make_status

# what nbdkit 1.32's python plugin printed for a failed pread (seen in a bench guest)
TRACEBACK = [
    "nbdkit: python.3: error: /x/iommu_dma/nbd/plugin.py: pread: error: Traceback (most recent "
    "call last):",
    '   File "/x/iommu_dma/nbd/plugin.py", line 52, in run',
    "     return fn(*args)",
    "            ^^^^^^^^^",
    " iommu_dma.nbd.plugin.RequestError: read: Read nsid 1 LBAs 1000+1: Unrecovered Read Error "
    "(SCT 0x2, SC 0x81) [EIO]",
    "",
]


def relay(verbose: bool) -> LogRelay:
    return LogRelay(iter(()), lambda line: None, verbose)


def test_a_plugin_traceback_becomes_one_line() -> None:
    r = relay(False)
    out = [o for o in map(r.line, ["nbdkit: starting", *TRACEBACK, "next"]) if o is not None]
    assert out == ["nbdkit: starting",
                   "iommu-dma serve: read: Read nsid 1 LBAs 1000+1: Unrecovered Read Error "
                   "(SCT 0x2, SC 0x81) [EIO]", "next"]


def test_another_exception_keeps_its_callback_name_and_verbose_keeps_everything() -> None:
    r = relay(False)
    lines = [TRACEBACK[0].replace("pread", "get_ready"), TRACEBACK[1],
             " iommu_dma.errors.NotBoundError: 0000:00:0a.0 is not bound to vfio-pci"]
    assert [r.line(x) for x in lines][-1] == \
        "iommu-dma serve: get_ready: 0000:00:0a.0 is not bound to vfio-pci"
    v = relay(True)
    assert [v.line(x) for x in TRACEBACK] == TRACEBACK


def test_nbdkit_command_line() -> None:
    argv = nbdkit_argv(ServeOptions("0000:00:0a.0", 2, socket="/tmp/s", readonly=True,
                                    threads=4, wait="hybrid", extra=("--tls=require",)),
                       "/tmp/pid", lba_size=4096)
    assert argv[:6] == ["nbdkit", "--foreground", "--exit-with-parent", "-P", "/tmp/pid",
                        "--filter=blocksize"]
    assert argv[argv.index("-U") + 1] == "/tmp/s" and "-r" in argv
    assert argv[argv.index("-t") + 1] == "4" and "--tls=require" in argv
    assert argv[argv.index("python"):] == ["python", str(PLUGIN), "bdf=0000:00:0a.0", "nsid=2",
                                           "wait=hybrid", "minblock=4096", "readonly=1"]
    tcp = nbdkit_argv(ServeOptions("0000:00:0a.0", port=10900, address="::1"), "/p")
    assert tcp[tcp.index("-p") + 1] == "10900" and tcp[tcp.index("-i") + 1] == "::1"
    assert "minblock=512" in tcp


def test_uris() -> None:
    assert ServeOptions("b", socket="/run/x.sock").uri == "nbd+unix:///?socket=/run/x.sock"
    assert ServeOptions("b").uri == "nbd://localhost:10809/"
    assert ServeOptions("b", port=1234, address="10.0.0.2").uri == "nbd://10.0.0.2:1234/"
    assert ServeOptions("b", port=1234, address="::1").uri == "nbd://[::1]:1234/"


@pytest.mark.parametrize("sct,sc,code", [
    (SCT_MEDIA, 0x81, errno.EIO),                 # Unrecovered Read Error
    (SCT_MEDIA, 0x80, errno.EIO),                 # Write Fault
    (SCT_GENERIC, 0x80, errno.ENOSPC),            # LBA Out of Range
    (SCT_GENERIC, 0x81, errno.ENOSPC),            # Capacity Exceeded
    (SCT_GENERIC, 0x20, errno.EPERM),             # Namespace is Write Protected
    (SCT_GENERIC, 0x02, errno.EINVAL),            # Invalid Field in Command
    (SCT_CMD_SPECIFIC, 0x82, errno.EPERM),        # Attempted Write to Read Only Range
    (SCT_GENERIC, 0x06, errno.EIO),               # Internal Error
])
def test_nvme_statuses_map_to_nbd_errnos(sct: int, sc: int, code: int) -> None:
    assert nbd_errno(NvmeError(make_status(sc, sct), "Read")) == code


def test_library_errors_map_to_nbd_errnos() -> None:
    assert nbd_errno(ClosedError("controller")) == errno.ESHUTDOWN
    assert nbd_errno(NvmeTimeoutError("Read timed out")) == errno.EIO
    assert nbd_errno(ExportError(errno.ENOTSUP, "fast zero")) == errno.ENOTSUP
    assert nbd_errno(MemoryError()) == errno.ENOMEM
    assert nbd_errno(ValueError("x")) == errno.EINVAL


def test_a_python_version_mismatch_is_named() -> None:
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    check_python(f"{ours}.1")
    with pytest.raises(ServeError, match=r"runs Python 2\.7\.18.*installed for Python"):
        check_python("2.7.18")


def test_nbdkit_python_plugin_is_installed_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make` installs nbdkit and its python plugin (Debian 12: Python 3.11, as our venv).
    Without the ASan run's LD_PRELOAD: nbdkit's embedded Python hangs under it."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    check_python(plugin_python())


def test_serve_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "0000:00:0a.0", "-n", "1", "--socket", "/tmp/s", "--port", "1"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["serve", "zz:zz", "-n", "1", "--socket", "/tmp/s"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iommu-dma: error:") and "zz:zz" in err and "Traceback" not in err
