"""The namespace over NBD: `iommu-dma serve` against nbdkit's file plugin on the kernel driver.

    python -m benchmarks.nbd [--runtime 10] [--serve OPTIONS ...] [--no-profile]

Boots the "perf" bench (null-co 1 GiB namespace, 4 KiB blocks) and, in that one guest boot,
drives two NBD exports of namespace 1 with fio's nbd ioengine (libnbd, one connection) over a
Unix socket:

- the kernel-backed export: the controller on the kernel nvme driver and
  `nbdkit --foreground --exit-with-parent -U SOCK file /dev/nvmeXn1` (nbdkit's C file plugin,
  default threads; it does buffered I/O, so reads may come from the guest's page cache and
  writes go to it);
- our export: the controller on vfio-pci and `iommu-dma serve BDF -n 1 --socket SOCK`
  (default options: wait=interrupt, nbdkit's 16 threads), then extra rows with other
  options: --wait poll, --wait hybrid, --threads 1 (or those given with --serve).

Workloads: 4 KiB random read at iodepth 16 and 1 MiB sequential write at iodepth 4 (the
null-co namespace drops the writes). Prints IOPS, MB/s, average latency, the server's CPU
(nbdkit's process CPU time as a share of the wall time; 200% is both vCPUs) and fio's, the
ratio ours / kernel-backed and the target (ours >= 1.0x). Unless --no-profile, one more
short randread run on our default export samples nbdkit's threads from /proc (state and the
kernel function each sleeps in) to show where the server's time goes. Numbers only; nothing
is asserted: the exit status is non-zero only when a step fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.randread import ROOT, SETUP, boot_perf_bench
from iommu_dma.nbd.server import terminate

START_TIMEOUT = 240.0               # `iommu-dma serve` imports a lot of Python under TCG
STOP_TIMEOUT = 120.0
# our export's rows: `iommu-dma serve` options; the first (default options) is the target's
VARIANTS = ("", "--wait poll", "--wait hybrid", "--threads 1")
Figures = dict[str, float]


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    direction: str                  # the fio JSON section: "read" or "write"


WORKLOADS = (
    Workload("4 KiB randread QD16", "randread", "4k", 16, "read"),
    Workload("1 MiB seq write QD4", "write", "1M", 4, "write"),
)


# ---- processes -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@dataclass
class Export:
    """A running NBD server: its URI, the nbdkit process serving it (for its CPU time)."""
    label: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    uri: str = ""
    nbdkit_pid: int = 0

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def fail(self, why: str) -> SystemExit:
        return SystemExit(f"{self.label}: {why}\n$ {shlex.join(self.argv)}\n{self.log_text()}")


def _stop(e: Export) -> None:
    if not terminate(e.proc, STOP_TIMEOUT):
        raise e.fail(f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM")
    if e.proc.returncode not in (0, -signal.SIGTERM):
        raise e.fail(f"ended with status {e.proc.returncode}")


@contextmanager
def kernel_export(dev: str, workdir: Path) -> Iterator[Export]:
    """nbdkit's file plugin on the kernel block device; listening once nbdkit wrote its pid
    file (nbdkit writes it after it bound the socket)."""
    sock, pidfile, log = workdir / "kernel.sock", workdir / "kernel.pid", workdir / "kernel.log"
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile),
            "file", dev]
    for stale in (sock, pidfile):
        stale.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    e = Export("kernel-backed export (nbdkit file)", argv, proc, log,
               uri=f"nbd+unix:///?socket={sock}", nbdkit_pid=proc.pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (pidfile.exists() and pidfile.read_text().strip().isdigit()):
            if proc.poll() is not None:
                raise e.fail(f"exited with status {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise e.fail(f"not listening after {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        yield e
    finally:
        _stop(e)


def serve_argv(bdf: str, sock: Path, extra: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("iommu-dma")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "iommu_dma.cli.main"]
    return cmd + ["serve", bdf, "-n", "1", "--socket", str(sock), *extra]


@contextmanager
def our_export(bdf: str, variant: str, n: int, workdir: Path) -> Iterator[Export]:
    """`iommu-dma serve ... VARIANT` (more options), until it printed its URI on stdout;
    SIGTERM afterwards."""
    sock, log, out_path = (workdir / f"ours{n}.sock", workdir / f"ours{n}.log",
                           workdir / f"ours{n}.out")
    argv = serve_argv(bdf, sock, shlex.split(variant))
    sock.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    e = Export(f"iommu-dma serve {variant or '(default)'}", argv, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not out_path.read_text().endswith("\n"):
            if proc.poll() is not None:
                raise e.fail(f"exited with status {proc.returncode} before printing its URI")
            if time.monotonic() > deadline:
                raise e.fail(f"printed no URI within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        e.uri = out_path.read_text().splitlines()[0].strip()
        nbdkits = [p for p in children(proc.pid)
                   if Path(f"/proc/{p}/comm").read_text().strip() == "nbdkit"]
        if not nbdkits:
            raise e.fail("no nbdkit child process")
        e.nbdkit_pid = nbdkits[0]
        yield e
    finally:
        _stop(e)


# ---- fio -----------------------------------------------------------------------------------

def fio_argv(uri: str, w: Workload, runtime: float) -> list[str]:
    return ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.iodepth}", f"--runtime={runtime:g}", "--time_based",
            "--ramp_time=1", "--output-format=json"]


def fio(e: Export, w: Workload, runtime: float) -> Figures:
    argv = fio_argv(e.uri, w, runtime)
    cpu0, t0 = cpu_seconds(e.nbdkit_pid), time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    server_cpu = 100.0 * (cpu_seconds(e.nbdkit_pid) - cpu0) / wall
    if proc.returncode != 0 or "{" not in proc.stdout:
        raise e.fail(f"fio {w.name} failed ({proc.returncode}):\n$ {shlex.join(argv)}\n"
                     f"{proc.stdout}{proc.stderr}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    r = job[w.direction]
    if job.get("error") or r["total_ios"] == 0:
        raise e.fail(f"fio {w.name}: error {job.get('error')}, {r['total_ios']} I/Os\n"
                     f"{proc.stderr}")
    return {"iops": r["iops"], "mb_s": r["bw_bytes"] / 1e6, "lat_us": r["lat_ns"]["mean"] / 1000,
            "server_cpu_pct": server_cpu, "fio_cpu_pct": job["usr_cpu"] + job["sys_cpu"]}


def measure(e: Export, runtime: float, res: dict[str, dict[str, Figures]]) -> None:
    print(f"{e.label}: {e.uri} (nbdkit pid {e.nbdkit_pid})\n  $ {shlex.join(e.argv)}",
          flush=True)
    for w in WORKLOADS:
        r = fio(e, w, runtime)
        res.setdefault(w.name, {})[e.label] = r
        print(f"  {w.name}: {r['iops']:.0f} IOPS, {r['mb_s']:.1f} MB/s, "
              f"{r['lat_us']:.0f} us, server CPU {r['server_cpu_pct']:.0f}%", flush=True)


def _threads(pid: int) -> dict[int, tuple[str, float, str]]:
    """Per thread of pid: (state, CPU seconds, kernel function it sleeps in)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            wchan = (t / "wchan").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue                            # the thread just ended
        out[int(t.name)] = (f[0], (int(f[11]) + int(f[12])) / tick,
                            "running" if f[0] == "R" else wchan or "?")
    return out


def profile(e: Export, runtime: float) -> str:
    """One more randread run while the nbdkit process's threads are sampled every 50 ms from
    /proc (perf's sampling does not work in this TCG guest): what its threads were doing (R:
    on a CPU or runnable; else the kernel function they sleep in, e.g. futex_wait_queue: a
    lock, such as Python's GIL) and how the CPU time spread over the threads."""
    samples: Counter[str] = Counter()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            try:
                threads = _threads(e.nbdkit_pid)
            except FileNotFoundError:
                return
            for tid, (_, cpu, what) in threads.items():
                first.setdefault(tid, cpu)
                last[tid] = cpu
                samples[what] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = fio(e, WORKLOADS[0], runtime)
    finally:
        done.set()
        sampler.join()
    total = sum(samples.values()) or 1
    cpu = sorted((last[t] - first[t] for t in last), reverse=True)
    lines = [f"  {r['iops']:.0f} IOPS while sampled; {len(last)} threads seen, CPU seconds "
             f"of the busiest: {', '.join(f'{c:.2f}' for c in cpu[:6])}; all: {sum(cpu):.2f}"
             f" in {runtime:g} s",
             "  thread states (share of thread samples):"]
    lines += [f"    {n / total:6.1%}  {what}" for what, n in samples.most_common(8)]
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------

def in_guest(runtime: float, variants: list[str], do_profile: bool) -> int:
    from iommu_dma.demo import kernel_block_device
    from iommu_dma.testing.guest import nvme_bdfs

    print(f"guest: {os.cpu_count()} CPUs; $ {shlex.join([sys.executable, *sys.argv])}",
          flush=True)
    bdf = nvme_bdfs()[0]
    dev = kernel_block_device(bdf)
    for w in WORKLOADS:
        print(f"fio {w.name}: $ {shlex.join(fio_argv('URI', w, runtime))}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    res: dict[str, dict[str, Figures]] = {}
    labels: list[str] = []
    prof = ""
    with kernel_export(dev, workdir) as e:
        labels.append(e.label)
        measure(e, runtime, res)
    subprocess.run(["bash", str(SETUP), "bind", bdf], check=True)
    try:
        for n, variant in enumerate(variants):
            t0 = time.perf_counter()
            with our_export(bdf, variant, n, workdir) as e:
                print(f"(serve listened after {time.perf_counter() - t0:.0f} s)", flush=True)
                labels.append(e.label)
                measure(e, runtime, res)
                if do_profile and n == 0:
                    print("sampling the server's threads during one more randread run...",
                          flush=True)
                    prof = profile(e, min(runtime, 5.0))
    finally:
        subprocess.run(["bash", str(SETUP), "unbind", bdf], check=True)
    report(res, labels, runtime)
    if prof:
        print(f"\n{labels[1]}: nbdkit's threads during {WORKLOADS[0].name}:\n{prof}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(res: dict[str, dict[str, Figures]], labels: list[str], runtime: float) -> None:
    kernel = labels[0]
    print(f"\nNBD exports of namespace 1, fio --ioengine=nbd (one connection, Unix socket), "
          f"{runtime:g} s per workload, guest with {os.cpu_count()} CPUs")
    print(f"{'workload':22} {'export':38} {'IOPS':>8} {'MB/s':>8} {'avg lat':>11} "
          f"{'srv CPU':>8} {'fio CPU':>8}  ours/kernel")
    for wname, rows in res.items():
        for label in labels:
            r = rows[label]
            ratio = "" if label == kernel else f"x{r['iops'] / rows[kernel]['iops']:.2f}"
            print(f"{wname:22} {label:38} {r['iops']:8.0f} {r['mb_s']:8.1f} "
                  f"{r['lat_us']:8.0f} us {r['server_cpu_pct']:7.0f}% {r['fio_cpu_pct']:7.0f}%"
                  f"  {ratio}")
    print("\ntarget: ours (iommu-dma serve, default options) >= 1.0x the kernel-backed export")
    targets: dict[str, Any] = {}
    for wname, rows in res.items():
        v = rows[labels[1]]["iops"] / rows[kernel]["iops"]
        targets[wname] = {"value": v, "met": v >= 1.0}
        print(f"  {wname:22} x{v:.2f}  {'met' if v >= 1.0 else 'NOT met'}")
    print("RESULT " + json.dumps({"results": res, "targets": targets}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nbd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=float, default=10.0, help="seconds per workload")
    parser.add_argument("--serve", action="append", default=None, metavar="OPTIONS",
                        help="a row of our export: `iommu-dma serve` with these options "
                             "(repeatable; default: " + ", ".join(repr(v) for v in VARIANTS)
                             + "; the first row is the target's)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip sampling our export's threads")
    parser.add_argument("--cpus", type=int, default=None, help="guest vCPUs (default: bench's)")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.serve is None else args.serve
    if args.in_guest:
        return in_guest(args.runtime, variants, not args.no_profile)
    if args.serve is None and not args.no_profile:
        return boot_perf_bench("benchmarks.nbd", args.runtime, args.cpus)
    # benchmarks.randread.boot_perf_bench, with our options passed on to the guest
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    cmd = [sys.executable, "-m", "benchmarks.nbd", "--in-guest", "--runtime", str(args.runtime)]
    cmd += [f"--serve={v}" for v in variants] + (["--no-profile"] if args.no_profile else [])
    print("booting the 'perf' bench (TCG, about 30 s)...", flush=True)
    bench = get_bench("perf")
    if args.cpus:
        bench = dataclasses.replace(bench, cpus=args.cpus)
    return vm.run(bench, shlex.join(cmd), cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
