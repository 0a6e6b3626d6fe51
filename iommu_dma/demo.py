"""`make demo`: boot the default bench and tour the `iommu-dma` command inside the guest.

On the host, `python -m iommu_dma.demo` boots the bench and runs itself inside the guest with
`--in-guest`; there it runs each step as a shell command and prints it as it goes:
list -> bind -> id-ctrl / id-ns -> write random data, read it back, compare -> perf randread
QD32 -> unbind -> the same workload on the kernel driver with fio -> list -> bind -> serve the
namespace over NBD, read by qemu-img -> the IOPS ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_MIB = 4
RUNTIME = 5


def step(title: str, command: list[str], capture: bool = False, show: bool = True) -> str:
    """Print and run command; its stdout (also printed, when show) when capture."""
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    if command[0] == "iommu-dma":
        rc, out = _in_process(command[1:], capture)
    else:
        proc = subprocess.run(command, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE if capture else None)
        rc, out = proc.returncode, proc.stdout or ""
    if capture and show:
        print(out, end="", flush=True)
    if rc != 0:
        raise SystemExit(f"demo step failed ({rc}): {shlex.join(command)}")
    return out


def _in_process(argv: list[str], capture: bool) -> tuple[int, str]:
    from iommu_dma.cli.main import main as cli_main

    if not capture:
        rc = cli_main(argv)
        sys.stdout.flush()
        return rc, ""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv)
    return rc, buf.getvalue()


def cli(*args: str) -> list[str]:
    """An iommu-dma command line (run in this process by step(): no 8 s of imports each)."""
    return ["iommu-dma", *args]


def kernel_block_device(bdf: str, nsid: int = 1) -> str:
    """/dev/nvmeXnN of the controller at bdf once the kernel driver has it (waits up to 10 s)."""
    subprocess.run(["udevadm", "settle"], check=False)
    deadline = time.monotonic() + 10
    while True:
        for d in sorted(Path(f"/sys/bus/pci/devices/{bdf}/nvme").glob("nvme*")):
            dev = Path(f"/dev/{d.name}n{nsid}")
            if dev.exists():
                return str(dev)
        if time.monotonic() > deadline:
            raise SystemExit(f"no block device for namespace {nsid} of {bdf} after unbind")
        time.sleep(0.2)


def fio_iops(dev: str) -> float:
    out = step("the same workload through the kernel nvme driver (fio, io_uring)",
               ["fio", "--name=k", f"--filename={dev}", "--direct=1", "--rw=randread",
                "--bs=4k", "--iodepth=32", "--ioengine=io_uring", f"--runtime={RUNTIME}",
                "--time_based", "--output-format=json"], capture=True, show=False)
    read = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    print(f"fio: {read['iops']:.0f} IOPS, average latency {read['lat_ns']['mean'] / 1000:.0f} us",
          flush=True)
    return float(read["iops"])


def perf_iops(table: str) -> float:
    """IOPS from the table `iommu-dma perf` prints (header, rule, values)."""
    return float(table.splitlines()[2].split()[0])


def data_round_trip(bdf: str) -> None:
    src, back = "/tmp/demo-data.bin", "/tmp/demo-back.bin"
    blocks = str(DATA_MIB * 256)
    step(f"{DATA_MIB} MiB of random data",
         ["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={DATA_MIB}", "status=none"])
    step(f"write {DATA_MIB} MiB of random data to namespace 1 from user space",
         cli("write", bdf, "-n", "1", "--start-block", "0", "--data", src))
    step("read it back", cli("read", bdf, "-n", "1", "--start-block", "0", "--block-count",
                             blocks, "--data", back))
    step("same bytes?", ["cmp", src, back])
    step("and the device's own Compare command agrees",
         cli("compare", bdf, "-n", "1", "--start-block", "0", "--data", src))


def serve_over_nbd(bdf: str) -> None:
    """Namespace 1 exported over NBD (`iommu-dma serve`, nbdkit), read by qemu-img."""
    sock, copy = "/tmp/demo-nbd.sock", "/tmp/demo-nbd.bin"
    argv = cli("serve", bdf, "-n", "1", "--socket", sock)
    print(f"\n== serve namespace 1 over NBD (nbdkit + our plugin), in the background\n"
          f"$ {shlex.join(argv)} &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "iommu_dma.cli.main", *argv[1:]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        uri = server.stdout.readline().strip()
        if not uri:
            raise SystemExit(f"demo step failed: serve ended ({server.wait()})")
        print(uri, flush=True)
        step("what an NBD client sees", ["nbdinfo", uri])
        step(f"a real NBD client (qemu-img) copies the first {DATA_MIB} MiB out of the export",
             ["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={uri}", f"of={copy}", "bs=1M",
              f"count={DATA_MIB}"])
        step("the bytes we wrote at the start", ["cmp", "/tmp/demo-data.bin", copy])
    finally:
        server.send_signal(signal.SIGTERM)
        print(f"\n== stop serving (SIGTERM): exit status {server.wait(120)}", flush=True)


def story(ours: float, kernel: float) -> None:
    ratio = ours / kernel if kernel else float("nan")
    print(f"\n== what we saw\n"
          f"4 KiB random reads, queue depth 32, {RUNTIME} s, on the same emulated controller:\n"
          f"  iommu-dma (user space, VFIO, polled):  {ours:10.0f} IOPS\n"
          f"  kernel nvme driver + fio io_uring:     {kernel:10.0f} IOPS\n"
          f"  ratio ours / kernel:                   {ratio:10.2f}\n"
          f"Served over NBD (iommu-dma serve, nbdkit), qemu-img read back the {DATA_MIB} MiB "
          "written at the start: the same bytes.\n"
          "Both ran inside a QEMU guest whose NVMe controller and IOMMU are emulated (and, "
          "without KVM, whose CPU is too): the emulation bounds these numbers, so they say "
          "nothing about real hardware; the ratio only compares the two paths on this bench.",
          flush=True)


def tour() -> None:
    """The demo itself, run as root inside the bench guest."""
    from iommu_dma.testing.guest import nvme_bdfs

    bdf = nvme_bdfs()[0]
    step("NVMe controllers, on the kernel nvme driver", cli("list"))
    step("hand them to vfio-pci (the packaged setup_vfio.sh underneath)", cli("bind"))
    step("Identify Controller, from user space", cli("id-ctrl", bdf))
    step("Identify Namespace 1", cli("id-ns", bdf, "-n", "1"))
    data_round_trip(bdf)
    table = step("4 KiB random reads, QD32, on our user-space driver",
                 cli("perf", bdf, "-n", "1", "--rw", "randread", "--iodepth", "32",
                     "--runtime", str(RUNTIME)), capture=True)
    ours = perf_iops(table)
    step("give the controllers back to the kernel", cli("unbind"))
    dev = kernel_block_device(bdf)
    step(f"the kernel reads the bytes we wrote ({dev})",
         ["cmp", "-n", str(DATA_MIB << 20), "/tmp/demo-data.bin", dev])
    kernel = fio_iops(dev)
    step("back on the kernel driver", cli("list"))
    step("and to vfio-pci once more, to serve over NBD", cli("bind", bdf))
    serve_over_nbd(bdf)
    story(ours, kernel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iommu_dma.demo", description=__doc__)
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bench", default="default", help="bench configuration to boot")
    args = parser.parse_args(argv)
    if args.in_guest:
        tour()
        return 0
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    bench = get_bench(args.bench)
    print(f"Booting bench {bench.name!r} (QEMU, emulated Intel IOMMU aw-bits={bench.aw_bits}, "
          f"{len(bench.controllers)} emulated NVMe controller(s)); about 30 s under TCG...",
          flush=True)
    try:
        result = vm.run(bench, shlex.join([sys.executable, "-m", "iommu_dma.demo", "--in-guest"]),
                        cwd=ROOT)
    except vm.VmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nDemo finished in {result.seconds:.0f} s (guest exit status {result.returncode}).")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
