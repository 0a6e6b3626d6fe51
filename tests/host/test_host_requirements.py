"""Host requirements are checked before any boot, and every gap is named in one error."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from iommu_dma.testing import vm
from iommu_dma.testing.bench import BENCHES, Bench, get_bench

EDGE = get_bench("edge")


def everything_present(**override: object) -> vm.HostProbes:
    """Probes of a host that has everything; keyword arguments replace single probes."""
    probes = vm.HostProbes(
        which=lambda name: f"/usr/bin/{name}",
        kernel=lambda: (Path("/boot/vmlinuz-6.1.0-99-amd64"), ""),
        busybox=lambda: "/usr/bin/busybox",
        is_static=lambda path: True,
        vng=lambda: "/venv/bin/vng",
        mem_available=lambda: 16 << 30,
    )
    for name, probe in override.items():
        setattr(probes, name, probe)
    return probes


def test_a_complete_host_passes() -> None:
    assert vm.host_problems(EDGE, everything_present()) == []
    vm.check_host(EDGE, everything_present())


def test_this_machine_passes() -> None:
    """Everything but the bench kernel, which `make bench-kernel` builds (before `make test`
    runs pytest); its absence fails the benches that boot it, naming that target."""
    for bench in BENCHES.values():
        problems = [m for m in vm.host_problems(bench)
                    if not (bench.kernel == "bench" and m.install == vm.BENCH_KERNEL_HINT)]
        assert problems == [], problems


def test_every_missing_item_in_one_error_with_package_and_install_command() -> None:
    bare = everything_present(
        which=lambda name: None,
        kernel=lambda: (None, "no /boot/vmlinuz-* image"),
        busybox=lambda: None,
        vng=lambda: None,
        mem_available=lambda: 1 << 30,
    )
    with pytest.raises(vm.HostRequirementsError) as info:
        vm.check_host(EDGE, bare)
    assert isinstance(info.value, vm.VmError)          # callers catching VmError still do
    text = str(info.value)
    assert "cannot boot bench 'edge'" in text
    for needle in ("qemu-system-x86_64", "apt-get install qemu-system-x86",
                   "kernel image", "apt-get install linux-image-amd64",
                   "statically linked busybox", "apt-get install busybox-static",
                   "apt-get install file",
                   "vng", "pip install 'iommu-dma[test]'",
                   "MemAvailable is 1024 MiB", "2048 MiB of guest memory"):
        assert needle in text, needle
    assert [m.package for m in info.value.missing] == [
        "qemu-system-x86", "linux-image-amd64", "busybox-static", "file", "", ""]
    assert ("apt-get install busybox-static file linux-image-amd64 qemu-system-x86"
            in text.splitlines()[-1])


def test_dynamic_busybox_is_not_enough() -> None:
    probes = everything_present(is_static=lambda path: path != "/usr/bin/busybox")
    [missing] = vm.host_problems(EDGE, probes)
    assert missing.package == "busybox-static"
    assert "/usr/bin/busybox is dynamically linked" in missing.problem
    assert "plain busybox package is not enough" in missing.problem


def test_memory_margin() -> None:
    need = EDGE.memory_bytes + vm.MEMORY_MARGIN
    assert vm.host_problems(EDGE, everything_present(mem_available=lambda: need)) == []
    [missing] = vm.host_problems(EDGE, everything_present(mem_available=lambda: need - 1))
    assert missing.what == "free memory"
    small = Bench("small", EDGE.controllers, memory="512M")
    assert vm.host_problems(small, everything_present(mem_available=lambda: need - 1)) == []
    # an unreadable /proc/meminfo is not a reason to refuse
    assert vm.host_problems(EDGE, everything_present(mem_available=lambda: None)) == []


def test_unreadable_kernel_is_named(tmp_path: Path) -> None:
    env = {vm.KERNEL_ENV: str(tmp_path / "nope")}
    kernel, problem = vm.kernel_image(env)
    assert kernel is None and "nope is not a file" in problem
    with pytest.raises(vm.VmError, match="apt-get install linux-image-amd64"):
        vm.find_kernel(probes=vm.HostProbes.reading(env))


def test_run_checks_before_it_boots(tmp_path: Path) -> None:
    """A host without QEMU fails in vm.run before anything boots (no guest script written)."""
    no_qemu = {**os.environ, "PATH": str(tmp_path / "empty")}
    with pytest.raises(vm.HostRequirementsError, match="apt-get install qemu-system-x86"):
        vm.run(EDGE, "true", work_dir=tmp_path, env=no_qemu)
    assert not (tmp_path / "guest.sh").exists()


def test_static_elf_detection_agrees_with_virtme_ng() -> None:
    """Same answer as virtme-ng's own search and `file -L` test on this machine."""
    mkinitramfs = pytest.importorskip("virtme.mkinitramfs")
    run = pytest.importorskip("virtme.commands.run")
    theirs = mkinitramfs.find_busybox("/", True)
    assert vm.HostProbes().busybox() == theirs
    assert theirs is not None
    assert vm.is_static_elf(theirs) == run.is_statically_linked(theirs) is True
    python = shutil.which("python3")
    assert python is not None
    assert vm.is_static_elf(python) is False
    assert vm.is_static_elf(__file__) is False          # not an ELF at all
