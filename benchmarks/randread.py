"""4 KiB random read: our polled user-space path against the kernel nvme driver (fio).

    python -m benchmarks.randread [--runtime 10]

Boots the "perf" bench (null-co 4 KiB-block namespace) and, in that one guest boot, measures:
fio on the kernel driver (io_uring QD32, psync QD1), then the device on vfio-pci with our C
I/O worker (QD1, QD32) and with Python driving the batch submit/poll calls (QD32). Prints IOPS,
average latency and the ratios to the kernel. Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import subprocess
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "iommu_dma" / "data" / "setup_vfio.sh"      # the script the package ships


def fio(dev: str, engine: str, qd: int, runtime: float) -> dict[str, float]:
    cmd = ["fio", "--name=kernel", f"--filename={dev}", "--direct=1", "--rw=randread",
           "--bs=4k", f"--iodepth={qd}", f"--ioengine={engine}", f"--runtime={runtime}",
           "--time_based", "--ramp_time=1", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"iops": job["iops"], "lat_us": job["lat_ns"]["mean"] / 1000}


def ours(ns, qd: int, runtime: float) -> dict[str, float]:
    from iommu_dma.nvme.perf import Workload, run

    r = run(ns, Workload(rw="randread", bs=4096, iodepth=qd, runtime=runtime))
    if r.problems:                      # a timed-out or failing run is no measurement
        raise SystemExit(f"C worker QD{qd}: {'; '.join(r.problems)}")
    return {"iops": r.iops, "lat_us": r.lat_avg_ns / 1000}


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
    return {"iops": ios / elapsed, "lat_us": qd / (ios / elapsed) * 1e6}


def in_guest(runtime: float) -> int:
    from iommu_dma.nvme.controller import Controller
    from iommu_dma.testing.guest import nvme_bdfs

    bdf = nvme_bdfs()[0]
    ctrl_dir = next((Path("/sys/bus/pci/devices") / bdf / "nvme").iterdir())
    dev = f"/dev/{ctrl_dir.name}n1"
    res: dict[str, dict[str, float]] = {}
    print(f"kernel nvme driver on {dev}: fio 4k randread, {runtime:.0f} s each", flush=True)
    res["kernel io_uring QD32"] = fio(dev, "io_uring", 32, runtime)
    res["kernel psync QD1"] = fio(dev, "psync", 1, runtime)
    subprocess.run(["bash", str(SETUP), "bind", bdf], check=True)
    try:
        with Controller.open(bdf) as ctrl:
            ns = ctrl.namespace(1)
            print(f"iommu-dma on {bdf} (vfio-pci), namespace 1: {ns.blocks} x {ns.lba_size} B",
                  flush=True)
            ours(ns, 1, 1.0)                                  # warm-up, not reported
            res["iommu-dma C worker QD1"] = ours(ns, 1, runtime)
            res["iommu-dma C worker QD32"] = ours(ns, 32, runtime)
            res["iommu-dma Python batches QD32"] = python_batches(ns, 32, runtime)
    finally:
        subprocess.run(["bash", str(SETUP), "unbind", bdf], check=True)
    report(res)
    return 0


def report(res: dict[str, dict[str, float]]) -> None:
    k32, k1 = res["kernel io_uring QD32"], res["kernel psync QD1"]
    print(f"\n{'workload (4 KiB randread)':34} {'IOPS':>10} {'avg lat':>11}  ratio to kernel")
    for name, r in res.items():
        base = k1 if "QD1" in name else k32
        ratio = "" if name.startswith("kernel") else (
            f"IOPS x{r['iops'] / base['iops']:.2f}, latency x{r['lat_us'] / base['lat_us']:.2f}")
        print(f"{name:34} {r['iops']:10.0f} {r['lat_us']:8.1f} us  {ratio}")
    print("\ntargets: QD32 IOPS >= 8x kernel io_uring; QD1 latency <= 0.6x kernel psync")
    print("RESULT " + json.dumps(res))


def boot_perf_bench(module: str, runtime: float, cpus: int | None) -> int:
    """Run `python -m module --in-guest --runtime R` in one boot of the 'perf' bench."""
    from iommu_dma.testing import vm
    from iommu_dma.testing.bench import get_bench

    cmd = [sys.executable, "-m", module, "--in-guest", "--runtime", str(runtime)]
    print("booting the 'perf' bench (TCG, about 30 s)...", flush=True)
    bench = get_bench("perf")
    if cpus:
        bench = dataclasses.replace(bench, cpus=cpus)
    return vm.run(bench, shlex.join(cmd), cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.randread", description=__doc__)
    parser.add_argument("--runtime", type=float, default=10.0, help="seconds per workload")
    parser.add_argument("--cpus", type=int, default=None, help="guest vCPUs (default: bench's)")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        return in_guest(args.runtime)
    return boot_perf_bench("benchmarks.randread", args.runtime, args.cpus)


if __name__ == "__main__":
    sys.exit(main())
