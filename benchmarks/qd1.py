"""Where QD1 time goes: the C worker at QD1 with one knob changed at a time, in one guest boot.

    python -m benchmarks.qd1 [--runtime 5] [--rounds 2]

Boots the "perf" bench (null-co 4 KiB-block namespace). In that one boot: fio psync QD1 on the
kernel driver (the baseline), then on vfio-pci the C worker (4 KiB random reads, one queue pair
of depth 64, polled) in each variant below, the variants taking turns for --rounds rounds so
that drift in the guest's speed hits them alike:

- default: what `iommu-dma perf` does (shadow doorbells when the controller has them, the CQ
  head announced after every poll that reaped, sleep-when-descheduled on);
- no shadow doorbells: every doorbell a BAR0 write (no Doorbell Buffer Config, §5.8);
- CQ head every 8th: the CQ head doorbell deferred until 8 entries were consumed
  (QueuePair.set_cq_batch(8)), with and without shadow doorbells;
- spin only: the worker never sleeps while waiting (WorkerConfig.spin_only).

For each it prints the average and p99 latency, IOPS, the doorbell updates and BAR0 (MMIO)
writes per I/O from the queue's own counters, and the latency ratio to the kernel. The engine's
own work per I/O is what benchmarks.engine_cost counts (about 670 instructions at QD1): a few
microseconds in this guest at most, against the 100-200 us of one emulated I/O. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.randread import SETUP, boot_perf_bench, fio


@dataclass(frozen=True)
class Variant:
    name: str
    shadow: bool = True
    cq_batch: int = 1
    spin_only: bool = False


VARIANTS = [Variant("default"), Variant("no shadow doorbells", shadow=False),
            Variant("CQ head every 8th", cq_batch=8),
            Variant("no shadow + CQ head every 8th", shadow=False, cq_batch=8),
            Variant("spin only", spin_only=True)]
DEPTH = 64                      # room to defer CQ head updates (the batch is capped at depth - 1)


def run_variant(bdf: str, v: Variant, runtime: float) -> dict[str, float]:
    """One C worker QD1 run in variant v on a controller opened for it."""
    from iommu_dma.nvme.controller import Controller
    from iommu_dma.nvme.queue import WorkerConfig, run_worker

    Controller.use_shadow_doorbells = v.shadow
    try:
        with Controller.open(bdf) as ctrl:
            ns = ctrl.namespace(1)
            q = ctrl.create_io_queue(depth=DEPTH)
            buf = ctrl.alloc(ns.lba_size)
            try:
                q.qpair.set_cq_batch(v.cq_batch)
                before = q.qpair.info()
                cfg = WorkerConfig(nsid=1, lba_size=ns.lba_size, lba_count=ns.blocks,
                                   buf_addr=buf.addr, qd=1, random=True, duration=runtime,
                                   spin_only=v.spin_only)
                r = run_worker(q.qpair, cfg)
                after = q.qpair.info()
            finally:
                ctrl.delete_io_queue(q.qid)
                buf.free()
            shadow = ctrl.dbbuf is not None
    finally:
        Controller.use_shadow_doorbells = True
    if r.rc or r.errors or not r.ios:
        raise SystemExit(f"{v.name}: rc {r.rc}, {r.ios} I/Os, {r.errors} errors")
    per_io = {k: (after[k] - before[k]) / r.ios
              for k in ("sq_doorbells", "cq_doorbells", "sq_mmio", "cq_mmio")}
    return {"lat_us": r.lat_avg_ns / 1000, "p99_us": r.lat_p99_ns / 1000, "iops": r.iops,
            "shadow": float(shadow), **per_io}


def in_guest(runtime: float, rounds: int, names: list[str]) -> int:
    from iommu_dma.testing.guest import nvme_bdfs

    bdf = nvme_bdfs()[0]
    ctrl_dir = next((Path("/sys/bus/pci/devices") / bdf / "nvme").iterdir())
    kernel = fio(f"/dev/{ctrl_dir.name}n1", "psync", 1, runtime)
    subprocess.run(["bash", str(SETUP), "bind", bdf], check=True)
    variants = [v for v in VARIANTS if v.name in names]
    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    try:
        run_variant(bdf, variants[0], 1.0)                # warm-up, not reported
        for _ in range(rounds):
            for v in variants:
                runs[v.name].append(run_variant(bdf, v, runtime))
    finally:
        subprocess.run(["bash", str(SETUP), "unbind", bdf], check=True)
    report(kernel, runs)
    return 0


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def report(kernel: dict[str, float], runs: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n{'4 KiB randread QD1':30} {'avg lat':>9} {'p99':>9} {'IOPS':>7} "
          f"{'runs (avg lat)':>20}  {'SQ db':>5} {'SQ MMIO':>7} {'CQ db':>5} {'CQ MMIO':>7}  "
          "latency / kernel")
    print(f"{'kernel psync (fio)':30} {kernel['lat_us']:6.1f} us {'':>9} {kernel['iops']:7.0f}")
    for name, rows in runs.items():
        each = " / ".join(f"{r['lat_us']:.1f}" for r in rows)
        print(f"{name:30} {_mean(rows, 'lat_us'):6.1f} us {_mean(rows, 'p99_us'):6.1f} us "
              f"{_mean(rows, 'iops'):7.0f} {each:>20}  {_mean(rows, 'sq_doorbells'):5.2f} "
              f"{_mean(rows, 'sq_mmio'):7.2f} {_mean(rows, 'cq_doorbells'):5.2f} "
              f"{_mean(rows, 'cq_mmio'):7.2f}  x{_mean(rows, 'lat_us') / kernel['lat_us']:.2f}")
    shadow = next(iter(runs.values()))[0]["shadow"]
    print(f"(doorbell columns: updates and BAR0 writes per I/O; the controller "
          f"{'offers' if shadow else 'does not offer'} shadow doorbells)")
    print("RESULT " + json.dumps({"kernel psync QD1": kernel, **runs}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qd1",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant")
    parser.add_argument("--cpus", type=int, default=None, help="guest vCPUs (default: bench's)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated variant names (default: all)")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runtime <= 0 or args.rounds < 1:
        parser.error("--runtime must be positive and --rounds at least 1")
    names = args.variants.split(",")
    unknown = sorted(set(names) - {v.name for v in VARIANTS})
    if unknown:
        parser.error(f"--variants: no variant {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(v.name for v in VARIANTS)}")
    if args.in_guest:
        return in_guest(args.runtime, args.rounds, names)
    return boot_perf_bench("benchmarks.qd1", args.runtime, args.cpus,
                           extra=["--rounds", str(args.rounds), "--variants", args.variants])


if __name__ == "__main__":
    sys.exit(main())
