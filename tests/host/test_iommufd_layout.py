"""ctypes bindings of <linux/iommufd.h> and the VFIO cdev ioctls match gcc's layout (against the
bench kernel's uapi headers: Debian 12's /usr/include is 6.1 and has neither); backend choice,
the messages that name the backend and the fix."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from iommu_dma import backends, iommufd
from iommu_dma.backends import (
    CONTAINER,
    IOMMUFD,
    auto_backend,
    missing_remapping_text,
    requested_backend,
    unsafe_interrupts_allowed,
    unsafe_interrupts_warning,
)
from iommu_dma.container import Container
from iommu_dma.errors import IommuDmaError, NoIommuError, VfioError

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IOMMU_DMA_CACHE", "/var/cache/iommu-dma"))


def bench_headers(scratch: Path) -> tuple[list[str], str]:
    """gcc -I options for the bench kernel's uapi headers, and where they came from: the
    headers build_bench_kernel.sh installs next to bzImage, else (while it builds) the two
    headers of the unpacked 6.12 source, copied beside the host's <linux/types.h>."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_bench_kernel.sh"),
                          "--print-path"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        inc = Path(out.stdout.strip()).parent / "headers" / "include"
        if (inc / "linux" / "iommufd.h").exists():
            return [f"-I{inc}"], str(inc)
    for tree in sorted((CACHE / "kernel" / "work").glob("linux-source-*")):
        uapi = tree / "include" / "uapi" / "linux"
        if (uapi / "iommufd.h").exists() and (uapi / "vfio.h").exists():
            (scratch / "linux").mkdir(exist_ok=True)
            for name in ("iommufd.h", "vfio.h"):
                shutil.copy(uapi / name, scratch / "linux" / name)
            return [f"-I{scratch}", "-D__user="], str(uapi)   # headers_install strips __user
    pytest.fail("no uapi headers with <linux/iommufd.h>: build the bench kernel first with "
                "`make bench-kernel` (it installs them next to its bzImage)")


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/iommufd.h>",
             "#include <linux/vfio.h>", "int main(void) {"]
    for name, cls in iommufd.STRUCTS.items():
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof(struct {name}, {field}));')
    for c in iommufd.CONSTANTS:
        lines.append(f'printf("const {c} %llu\\n", (unsigned long long)({c}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def gcc_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to compare the layouts (apt-get install build-essential)")
    d = tmp_path_factory.mktemp("iommufd_layout")
    flags, _ = bench_headers(d)
    (d / "layout.c").write_text(_c_program())
    build = subprocess.run(["gcc", "-Wall", *flags, "-o", str(d / "layout"), str(d / "layout.c")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(iommufd.STRUCTS))
def test_struct_size_and_offsets_match_header(name: str, gcc_layout: dict[str, int]) -> None:
    cls = iommufd.STRUCTS[name]
    assert ctypes.sizeof(cls) == gcc_layout[f"{name} sizeof"]
    for field, *_ in cls._fields_:
        assert getattr(cls, field).offset == gcc_layout[f"{name} {field}"], field


def test_constants_match_header(gcc_layout: dict[str, int]) -> None:
    consts = {k.split()[1]: v for k, v in gcc_layout.items() if k.startswith("const ")}
    assert set(consts) == set(iommufd.CONSTANTS) and len(consts) >= 11
    for name, value in consts.items():
        assert iommufd.CONSTANTS[name] == value, name
    # _IO(';', n): iommufd commands from 0x80, the VFIO cdev ones at VFIO_BASE + 18..20
    assert iommufd.IOMMU_IOAS_ALLOC == 0x3B81 and iommufd.IOMMU_IOAS_UNMAP == 0x3B86
    assert iommufd.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert iommufd.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77


# ---- IOVA ranges the kernel returns are checked -----------------------------------------------


def test_iova_ranges_must_ascend_without_overlap() -> None:
    good = ((0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF))
    assert iommufd.check_ranges(good) == good
    for bad in (((5, 4),), ((0, 0x2000), (0x1000, 0x3000)), ((0x2000, 0x3000), (0, 0x1000))):
        with pytest.raises(VfioError, match="out of order or inverted"):
            iommufd.check_ranges(bad)


# ---- backend choice ---------------------------------------------------------------------------


def test_requested_backend_argument_env_and_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert requested_backend(None) is None
    assert requested_backend("iommufd") == IOMMUFD
    monkeypatch.setenv(backends.BACKEND_ENV, "container")
    assert requested_backend(None) == CONTAINER
    assert requested_backend("iommufd") == IOMMUFD          # the argument wins
    monkeypatch.setenv(backends.BACKEND_ENV, "auto")
    assert requested_backend(None) is None
    monkeypatch.setenv(backends.BACKEND_ENV, "iomufd")
    with pytest.raises(IommuDmaError, match=r"\$IOMMU_DMA_BACKEND is 'iomufd'.*container"):
        requested_backend(None)
    with pytest.raises(IommuDmaError, match="backend argument is 'vfio'"):
        requested_backend("vfio")


def _fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, cdev: bool) -> str:
    """/sys/bus/pci/devices/BDF[/vfio-dev/vfio0] and /dev/vfio/devices/vfio0 under tmp_path."""
    bdf = "0000:00:0a.0"
    dev = tmp_path / "sys" / bdf
    dev.mkdir(parents=True)
    nodes = tmp_path / "dev"
    nodes.mkdir()
    if cdev:
        (dev / "vfio-dev" / "vfio0").mkdir(parents=True)
        (nodes / "vfio0").write_text("")
    monkeypatch.setattr(iommufd, "PCI_DEVICES", tmp_path / "sys")
    monkeypatch.setattr(iommufd, "VFIO_CDEV_DIR", str(nodes))
    return bdf


def test_auto_choice_needs_dev_iommu_and_the_device_cdev(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bdf = _fake_sysfs(tmp_path, monkeypatch, cdev=True)
    dev_iommu = tmp_path / "iommu"
    assert auto_backend([bdf], str(dev_iommu)) == CONTAINER          # no /dev/iommu
    dev_iommu.write_text("")
    assert iommufd.cdev_path(bdf) == str(tmp_path / "dev" / "vfio0")
    assert auto_backend([bdf], str(dev_iommu)) == IOMMUFD
    assert auto_backend([], str(dev_iommu)) == CONTAINER               # nothing to look at
    (tmp_path / "dev" / "vfio0").unlink()                              # sysfs names it, no node
    assert auto_backend([bdf], str(dev_iommu)) == CONTAINER


def test_auto_choice_without_cdev_support(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bdf = _fake_sysfs(tmp_path, monkeypatch, cdev=False)
    (tmp_path / "iommu").write_text("")
    assert iommufd.cdev_name(bdf) is None
    assert auto_backend([bdf], str(tmp_path / "iommu")) == CONTAINER


@pytest.mark.skipif(os.path.exists("/dev/iommu"), reason="this host has iommufd")
def test_forced_iommufd_without_dev_iommu_names_config_and_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    for make in (lambda: Container(backend="iommufd"),
                 lambda: (monkeypatch.setenv(backends.BACKEND_ENV, "iommufd"), Container())):
        with pytest.raises(NoIommuError) as e:
            make()
        text = str(e.value)
        assert e.value.errno == errno.ENOENT and "/dev/iommu" in text
        assert "CONFIG_IOMMUFD" in text and "IOMMU_DMA_BACKEND=container" in text


# ---- interrupt remapping: the warning and the refusal -------------------------------------------


def test_refusal_names_missing_remapping_and_the_parameter() -> None:
    for backend, param in ((IOMMUFD, "iommufd.allow_unsafe_interrupts=1"),
                           (CONTAINER, "vfio_iommu_type1.allow_unsafe_interrupts=1")):
        text = missing_remapping_text(backend)
        assert text.startswith(f"{backend}:") and "interrupt remapping" in text
        assert param in text and "virtio-iommu" in text
        assert param in unsafe_interrupts_warning(backend)
    err = backends._refused(VfioError("VFIO_DEVICE_BIND_IOMMUFD", errno.EPERM), IOMMUFD)
    assert "iommufd.allow_unsafe_interrupts=1" in str(err) and "EPERM" in str(err)
    other = VfioError("VFIO_DEVICE_BIND_IOMMUFD", errno.ENODEV)
    assert backends._refused(other, IOMMUFD) is other


def test_unsafe_parameter_read_from_sysfs(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "SYS_MODULE", tmp_path)
    assert not unsafe_interrupts_allowed(IOMMUFD)                      # no such module
    params = tmp_path / "iommufd" / "parameters"
    params.mkdir(parents=True)
    (params / "allow_unsafe_interrupts").write_text("N\n")
    assert not unsafe_interrupts_allowed(IOMMUFD)
    (params / "allow_unsafe_interrupts").write_text("Y\n")
    assert unsafe_interrupts_allowed(IOMMUFD) and not unsafe_interrupts_allowed(CONTAINER)
