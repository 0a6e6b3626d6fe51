"""The wheel is the product: installed alone into a fresh virtualenv inside the bench guest, with
nothing of the checkout on the path, its `iommu-dma` command lists, binds, identifies and
unbinds a controller (with the setup_vfio.sh the wheel ships).

build/wheelhouse/ holds the iommu-dma wheel and its dependencies' wheels (`make wheelhouse`,
i.e. `python -m pip wheel . -w build/wheelhouse`); the install is offline (--no-index).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from iommu_dma.testing.bench import Bench
from iommu_dma.testing.guest import driver_of

pytestmark = pytest.mark.iommu_dma_vm(bench="default")

CHECKOUT = Path(__file__).resolve().parents[2]
WHEELHOUSE = CHECKOUT / "build" / "wheelhouse"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Venv:
    """A virtualenv under /tmp and an environment that knows nothing of the checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.env = {"PATH": f"{self.bin}:{SYSTEM_PATH}", "HOME": str(root), "LC_ALL": "C.UTF-8",
                    "VIRTUAL_ENV": str(root)}

    def run(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], cwd="/", env=self.env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def ok(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, (f"{' '.join(map(str, args))} failed ({proc.returncode}):"
                                      f"\n{proc.stdout}{proc.stderr}")
        return proc

    def iommu_dma(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ok(self.bin / "iommu-dma", *args)


def wheelhouse() -> list[str]:
    """The wheel files of build/wheelhouse; the test FAILS (not skips) without them."""
    names = sorted(w.name for w in WHEELHOUSE.glob("*.whl")) if WHEELHOUSE.is_dir() else []
    if not any(n.startswith("iommu_dma-") for n in names):
        pytest.fail(f"no iommu-dma wheel in {WHEELHOUSE}: run make wheelhouse first (it builds "
                    "the wheel and its dependencies' wheels there)")
    for dep in ("cffi", "pycparser", "pyudev"):
        assert any(n.startswith(f"{dep}-") for n in names), \
            f"no {dep} wheel in {WHEELHOUSE}: run make wheelhouse"
    return names


def make_venv(root: Path) -> Venv:
    """A fresh virtualenv at root with iommu-dma installed offline from the wheelhouse.

    The venv gets no pip of its own and no .pyc files: the checkout's pip installs into it
    (`pip --python`), which under TCG takes a fraction of the time of ensurepip plus
    byte-compiling; what lands in the venv is the same wheels."""
    v = Venv(root)
    base = getattr(sys, "_base_executable", sys.executable)   # not the checkout's .venv itself
    v.ok(base, "-m", "venv", "--without-pip", root)
    v.ok(sys.executable, "-m", "pip", "--python", v.bin / "python", "install", "-q",
         "--no-compile", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
         "--find-links", WHEELHOUSE, "iommu-dma")
    return v


def check_origin(v: Venv) -> None:
    """iommu_dma (and the setup script bind/unbind run) come from the venv, not the checkout."""
    assert "PYTHONPATH" not in v.env and str(CHECKOUT) not in v.env["PATH"]
    proc = v.ok(v.bin / "python", "-c",
                "import sys, iommu_dma, iommu_dma.cli.devices as d; "
                "print(iommu_dma.__file__); print(d.SETUP_SCRIPT); "
                "print(d.SETUP_SCRIPT.is_file()); print(iommu_dma.native_version()); "
                "print(*sys.path, sep='\\n')")
    module, script, exists, _native, *path = proc.stdout.splitlines()
    for p in (module, script):
        assert p.startswith(f"{v.root}/lib/"), p
    assert script.endswith("/iommu_dma/data/setup_vfio.sh") and exists == "True"
    assert not any(p.startswith(str(CHECKOUT)) for p in path if p), path
    launcher = (v.bin / "iommu-dma").read_text().splitlines()[0]
    assert launcher == f"#!{v.bin}/python", launcher


def check_commands(v: Venv, bdf: str, serial: str) -> None:
    listed = v.iommu_dma("list").stdout
    assert bdf in listed and serial in listed and " nvme " in listed, listed
    bind = v.iommu_dma("bind", bdf)
    try:
        assert f"iommu-dma: {bdf} bound to vfio-pci" in bind.stdout, bind.stdout
        assert "setup_vfio" not in bind.stdout + bind.stderr
        assert driver_of(bdf) == "vfio-pci"
        idc = json.loads(v.iommu_dma("id-ctrl", bdf, "-o", "json").stdout)
        assert idc["sn"].rstrip() == serial          # nvme-cli's JSON keeps the padding
    finally:
        unbind = v.iommu_dma("unbind", bdf)
    assert f"iommu-dma: {bdf} given back to the kernel nvme driver" in unbind.stdout
    assert "setup_vfio" not in unbind.stdout + unbind.stderr
    assert driver_of(bdf) == "nvme"
    out = v.iommu_dma("vm", "--help").stdout
    assert out.startswith("usage: iommu-dma vm") and "--bench" in out


def test_the_wheel_installs_and_runs(idma_bench: Bench, idma_nvme_bdfs: list[str]) -> None:
    wheelhouse()
    root = Path(tempfile.mkdtemp(prefix="idma-wheel-venv-", dir="/tmp"))
    try:
        v = make_venv(root)
        check_origin(v)
        check_commands(v, idma_nvme_bdfs[0], idma_bench.controllers[0].serial)
    finally:
        shutil.rmtree(root, ignore_errors=True)
