"""Our polled user-space path against the kernel nvme driver (fio), in one guest boot.

    python -m benchmarks.randread [--runtime 10] [--kernel bench]

Boots the "perf" bench (null-co 4 KiB-block namespace) and, in that one boot, measures fio on
the kernel driver (4 KiB randread io_uring QD32 and psync QD1, 128 KiB sequential read
io_uring QD8), then the device on vfio-pci: our C I/O worker at QD1 and QD32 (two runs each),
QD32 with --numjobs 2, 128 KiB sequential QD8, and Python driving the batch submit/poll calls
at QD32. With `--kernel bench` (the bench kernel, `make bench-kernel`) the C worker also runs
at QD1 and QD32 on each IOMMU backend, iommufd and the legacy container. Prints IOPS, latency,
MB/s, the ratios to the kernel and each target of issue 14 beside its figure, then the
deterministic engine cost (benchmarks.engine_cost, on the host). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "iommu_dma" / "data" / "setup_vfio.sh"      # the script the package ships


def fio(dev: str, engine: str, qd: int, runtime: float, rw: str = "randread",
        bs: str = "4k") -> dict[str, float]:
    cmd = ["fio", "--name=kernel", f"--filename={dev}", "--direct=1", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={qd}", f"--ioengine={engine}", f"--runtime={runtime}",
           "--time_based", "--ramp_time=1", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"iops": job["iops"], "lat_us": job["lat_ns"]["mean"] / 1000,
            "mb_s": job["bw_bytes"] / 1e6}


def ours(ns, qd: int, runtime: float, rw: str = "randread", bs: int = 4096,
         numjobs: int = 1) -> dict[str, float]:
    from iommu_dma.nvme.perf import Workload, run

    r = run(ns, Workload(rw=rw, bs=bs, iodepth=qd, runtime=runtime, numjobs=numjobs))
    if r.problems:                      # a timed-out or failing run is no measurement
        raise SystemExit(f"C worker {rw} {bs} QD{qd}: {'; '.join(r.problems)}")
    return {"iops": r.iops, "lat_us": r.lat_avg_ns / 1000,
            "mb_s": r.bytes / r.seconds / 1e6 if r.seconds else 0.0}


def python_batches(ns, qd: int, runtime: float) -> dict[str, float]:
    """Python keeps qd reads in flight: per round one native reap into preallocated tag/status
    arrays and one native submit of the reaped slots (LBAs drawn in Python beforehand)."""
    from iommu_dma.nvme.queue import BatchIo

    ctrl = ns.ctrl
    q = ctrl.create_io_queue(depth=qd + 1)
    buf = ctrl.alloc(qd * ns.lba_size)
    b = BatchIo(q.qpair, ns.nsid, ns.lba_size, buf.addr, qd)
    rng = random.Random(1)
    b.lbas[:] = array("Q", [rng.randrange(ns.blocks) for _ in range(len(b.lbas))])
    ios = errors = 0
    try:
        start = time.perf_counter()
        end = start + runtime
        inflight = b.submit(qd)
        while inflight:
            got = b.reap(1, 5.0)
            if not got:
                raise TimeoutError(f"{inflight} reads did not complete")
            ios += got
            inflight -= got
            errors += b.errors(got)
            if time.perf_counter() < end:
                inflight += b.submit(got)
        elapsed = time.perf_counter() - start
    finally:
        ctrl.delete_io_queue(q.qid)
        buf.free()
    if errors:
        print(f"python batches: {errors} reads failed", flush=True)
    return {"iops": ios / elapsed, "lat_us": qd / (ios / elapsed) * 1e6,
            "mb_s": ios * ns.lba_size / elapsed / 1e6}


def kernel_side(dev: str, runtime: float) -> dict[str, dict[str, float]]:
    print(f"kernel nvme driver on {dev}: fio, {runtime:.0f} s each", flush=True)
    seq = fio(dev, "io_uring", 8, runtime, rw="read", bs="128k")
    return {"kernel io_uring QD32": fio(dev, "io_uring", 32, runtime),
            "kernel psync QD1": fio(dev, "psync", 1, runtime),
            "kernel io_uring 128k seq QD8": seq}


def our_side(bdf: str, runtime: float) -> dict[str, dict[str, float]]:
    from iommu_dma.nvme.controller import Controller

    res: dict[str, dict[str, float]] = {}
    with Controller.open(bdf) as ctrl:
        ns = ctrl.namespace(1)
        print(f"iommu-dma on {bdf} (vfio-pci, {ctrl.container.backend_name}), namespace 1: "
              f"{ns.blocks} x {ns.lba_size} B", flush=True)
        ours(ns, 1, 1.0)                                  # warm-up, not reported
        for run in (1, 2):
            res[f"C worker QD1 run {run}"] = ours(ns, 1, runtime)
            res[f"C worker QD32 run {run}"] = ours(ns, 32, runtime)
        res["C worker QD32 numjobs 2"] = ours(ns, 32, runtime, numjobs=2)
        res["C worker 128k seq QD8"] = ours(ns, 8, runtime, rw="read", bs=128 * 1024)
        res["Python batches QD32"] = python_batches(ns, 32, runtime)
    return res


def backend_side(bdf: str, runtime: float) -> dict[str, dict[str, float]]:
    """C worker QD1 and QD32 on each IOMMU backend (a kernel with iommufd only)."""
    from iommu_dma.nvme.controller import Controller

    res: dict[str, dict[str, float]] = {}
    for backend in ("iommufd", "container"):
        with Controller.open(bdf, backend=backend) as ctrl:
            ns = ctrl.namespace(1)
            for qd in (1, 32):
                res[f"C worker QD{qd} on {backend}"] = ours(ns, qd, runtime)
    return res


def in_guest(runtime: float) -> int:
    from iommu_dma.testing.guest import nvme_bdfs

    bdf = nvme_bdfs()[0]
    ctrl_dir = next((Path("/sys/bus/pci/devices") / bdf / "nvme").iterdir())
    res = kernel_side(f"/dev/{ctrl_dir.name}n1", runtime)
    subprocess.run(["bash", str(SETUP), "bind", bdf], check=True)
    try:
        res |= our_side(bdf, runtime)
        if Path("/dev/iommu").exists():
            res |= backend_side(bdf, runtime)
    finally:
        subprocess.run(["bash", str(SETUP), "unbind", bdf], check=True)
    report(res)
    return 0


def _mean(res: dict[str, dict[str, float]], names: list[str], key: str) -> float:
    return sum(res[n][key] for n in names) / len(names)


def report(res: dict[str, dict[str, float]]) -> None:
    k32, k1 = res["kernel io_uring QD32"], res["kernel psync QD1"]
    kseq = res["kernel io_uring 128k seq QD8"]
    print(f"\n{'workload':34} {'IOPS':>10} {'avg lat':>11} {'MB/s':>9}  ratio to the kernel")
    for name, r in res.items():
        base = kseq if "128k" in name else k1 if "QD1" in name else k32
        ratio = "" if name.startswith("kernel") else (
            f"IOPS x{r['iops'] / base['iops']:.2f}, latency x{r['lat_us'] / base['lat_us']:.2f}")
        print(f"{name:34} {r['iops']:10.0f} {r['lat_us']:8.1f} us {r['mb_s']:9.1f}  {ratio}")
    qd1 = _mean(res, ["C worker QD1 run 1", "C worker QD1 run 2"], "lat_us") / k1["lat_us"]
    qd32_iops = _mean(res, ["C worker QD32 run 1", "C worker QD32 run 2"], "iops")
    rows = [
        ("QD1 avg latency / kernel psync", qd1, "<=", 0.42),
        ("QD32 IOPS / kernel io_uring", qd32_iops / k32["iops"], ">=", 19.0),
        ("Python batches / C worker, QD32", res["Python batches QD32"]["iops"] / qd32_iops,
         ">=", 0.9),
        ("numjobs 2 / one job, QD32", res["C worker QD32 numjobs 2"]["iops"] / qd32_iops,
         ">=", 1.6),
        ("128k seq QD8 MB/s / kernel io_uring", res["C worker 128k seq QD8"]["mb_s"]
         / kseq["mb_s"], ">=", 1.5),
    ]
    print(f"\n{'target (issue 14; means of the two runs)':40} {'measured':>9} {'target':>9}")
    for what, got, op, want in rows:
        met = got <= want if op == "<=" else got >= want
        print(f"{what:40} {got:9.2f} {op + ' ' + str(want):>9}  {'met' if met else 'not met'}")
    print("RESULT " + json.dumps(res))


def engine_cost() -> None:
    """The deterministic figure (host only), printed after the guest's."""
    if shutil.which("valgrind") is None:
        print("\nengine cost: not measured (valgrind is missing: Debian package valgrind)")
        return
    p = subprocess.run([sys.executable, "-m", "benchmarks.engine_cost"], cwd=ROOT,
                       capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("C worker", "Python batch",
                                                                  "engine cost"))]
    print("\n" + "\n".join(lines) if p.returncode == 0 else
          f"\nengine cost: failed ({p.returncode}): {p.stderr[-500:]}")


def boot_perf_bench(module: str, runtime: float, cpus: int | None,
                    kernel: str | None = None, extra: list[str] | None = None) -> int:
    """Run `python -m module --in-guest --runtime R [extra...]` in one boot of the 'perf'
    bench (on the bench kernel with kernel="bench")."""
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    cmd = [sys.executable, "-m", module, "--in-guest", "--runtime", str(runtime),
           *(extra or [])]
    print("booting the 'perf' bench (TCG, about 30 s)...", flush=True)
    bench = get_bench("perf")
    if cpus:
        bench = dataclasses.replace(bench, cpus=cpus)
    if kernel:
        bench = dataclasses.replace(bench, kernel=kernel)
    return vm.run(bench, shlex.join(cmd), cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.randread", description=__doc__)
    parser.add_argument("--runtime", type=float, default=10.0, help="seconds per workload")
    parser.add_argument("--cpus", type=int, default=None, help="guest vCPUs (default: bench's)")
    parser.add_argument("--kernel", choices=("host", "bench"), default="host",
                        help="guest kernel: Debian's (host) or the bench kernel, which adds "
                             "the iommufd/container comparison")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        return in_guest(args.runtime)
    rc = boot_perf_bench("benchmarks.randread", args.runtime, args.cpus, args.kernel)
    engine_cost()
    return rc


if __name__ == "__main__":
    sys.exit(main())
