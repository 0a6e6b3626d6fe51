"""Deterministic engine cost: instructions per 4 KiB read against a simulated NVMe controller.

    python -m benchmarks.engine_cost [--ios 20000]

Host only: no VM, no device, no timing. The engine is built once more with the simulated
controller of native/sim/ (`python native/build.py --sim`: the production sources at -O2, but
every doorbell write also lets the controller act, in the same thread): on an SQ tail doorbell
it completes each new command at once (CQE with the command's CID, the SQ head, phase tag,
success). Each workload runs in its own process under valgrind's callgrind, instrumented only
inside a measurement window opened and closed by the engine (callgrind client requests), with
the simulated controller's own instructions left out (--toggle-collect on its doorbell
function). A window runs N I/Os and another 2N I/Os after an unmeasured warm-up, so

    instructions per I/O = (Ir(2N) - Ir(N)) / N

counts the whole loop from submit to reaped completion and leaves out whatever is done once per
run (allocation, result summary, the Python call into the worker). Workloads, 4 KiB random
reads of namespace 1:

- C worker QD1 / QD32: the native I/O worker loop (idma_worker_run, as `iommu-dma perf` runs
  it: random LBAs, progress counters, latency histogram);
- Python batch QD32: Python drives BatchIo submit/reap calls the way benchmarks/randread.py's
  "Python batches" does (interpreter included).

The figure does not move with machine load: the same build gives the same count. It counts
instructions, not cycles (an sfence or an MMIO write costs far more than one instruction on a
device). The simulated doorbell is a call where production has one store: a few instructions
per doorbell of the figure are the simulation's. Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
TARGET = 200                        # instructions per 4 KiB read, C worker (issue 14)
PAGE = 4096
LBA_SIZE = 4096
BLOCKS = 1 << 20                    # namespace size in LBAs (4 GiB): only LBAs are drawn
BAR_SIZE = 16384
QID = 1


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                       # "worker" or "batch"
    qd: int


CASES = [Case("C worker QD1", "worker", 1), Case("C worker QD32", "worker", 32),
         Case("Python batch QD32", "batch", 32)]


# ---- the child: one workload inside callgrind ----

class SimQueue:
    """An I/O queue pair (qid 1, depth qd + 1) over anonymous memory, served by the simulated
    controller; its rings, PRP list pages and data buffer are in the engine's range table, so
    the per-command mapped-range check runs as it does on a device."""

    def __init__(self, qd: int) -> None:
        from iommu_dma.native import ffi, lib
        from iommu_dma.nvme.queue import QueuePair

        if not hasattr(lib, "idma_sim_new"):
            raise SystemExit("the engine is not the simulated build: set IOMMU_DMA_NATIVE=sim")
        self.depth = qd + 1
        self.batch: Any = None          # the BatchIo of the Python batch workload
        self._maps: list[mmap.mmap] = []
        self.bar = self._mem(BAR_SIZE)
        sq, cq = self._mem(self.depth * 64), self._mem(self.depth * 16)
        lists, self.buf = self._mem((self.depth - 1) * PAGE), self._mem(qd * LBA_SIZE)
        self.maptable = ffi.gc(lib.idma_maptable_new(), lib.idma_maptable_free)
        for addr, size in ((sq, self.depth * 64), (cq, self.depth * 16),
                           (lists, (self.depth - 1) * PAGE), (self.buf, qd * LBA_SIZE)):
            assert lib.idma_maptable_add(self.maptable, addr, size) == 0
        self.dev = ffi.gc(lib.idma_sim_new(ffi.cast("uint8_t *", self.bar), BAR_SIZE, 0),
                          lib.idma_sim_free)
        assert self.dev != ffi.NULL
        assert lib.idma_sim_attach(self.dev, QID, ffi.cast("void *", sq), ffi.cast("void *", cq),
                                   self.depth) == 0
        self.qpair = QueuePair(QID, self.depth, sq, cq, self.bar, BAR_SIZE, list_addr=lists,
                               list_pages=self.depth - 1, maptable=self.maptable)

    def _mem(self, size: int) -> int:
        from iommu_dma.native import ffi

        m = mmap.mmap(-1, (size + PAGE - 1) // PAGE * PAGE)
        self._maps.append(m)
        return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))

    def info(self) -> dict[str, int]:
        from iommu_dma.native import ffi, lib

        out = ffi.new("struct idma_sim_queue_info *")
        assert lib.idma_sim_queue_info(self.dev, QID, out) == 0
        return {k: int(getattr(out, k)) for k in dir(out)}


def run_worker_ios(sq: SimQueue, qd: int, ios: int) -> int:
    """The C worker as `iommu-dma perf --rw randread --bs 4096 --iodepth qd` runs it."""
    from iommu_dma.nvme.queue import WorkerConfig, new_progress, run_worker

    cfg = WorkerConfig(nsid=1, lba_size=LBA_SIZE, lba_count=BLOCKS, buf_addr=sq.buf, qd=qd,
                       read_pct=100, random=True, duration=3600.0, io_count=ios, seed=1)
    r = run_worker(sq.qpair, cfg, new_progress())
    if r.rc or r.errors or r.ios != ios:
        raise SystemExit(f"C worker QD{qd}: rc {r.rc}, {r.ios}/{ios} I/Os, {r.errors} errors")
    return r.ios


def new_batch(sq: SimQueue, qd: int) -> Any:
    """A BatchIo with random LBAs drawn beforehand, as benchmarks.randread sets it up."""
    from iommu_dma.nvme.queue import BatchIo

    b = BatchIo(sq.qpair, 1, LBA_SIZE, sq.buf, qd)
    rng = random.Random(1)
    b.lbas[:] = array("Q", [rng.randrange(BLOCKS) for _ in range(len(b.lbas))])
    return b


def run_batch_ios(sq: SimQueue, qd: int, ios: int) -> int:
    """benchmarks.randread.python_batches' loop, stopped by a count as well as the clock."""
    b = sq.batch
    done = errors = 0
    end = time.perf_counter() + 3600.0
    inflight = submitted = b.submit(min(qd, ios))
    while inflight:
        got = b.reap(1, 5.0)
        if not got:
            raise TimeoutError(f"{inflight} reads did not complete")
        done += got
        inflight -= got
        errors += b.errors(got)
        if time.perf_counter() < end and submitted < ios:
            k = b.submit(min(got, ios - submitted))
            inflight += k
            submitted += k
    if errors or done != ios:
        raise SystemExit(f"Python batch QD{qd}: {done}/{ios} reads, {errors} failed")
    return done


def child(kind: str, qd: int, ios: int) -> int:
    from iommu_dma.native import lib

    lib.idma_fast_ns()                  # TSC calibration (5 ms of clock reads): not measured
    sq = SimQueue(qd)
    if kind == "batch":
        sq.batch = new_batch(sq, qd)
    run = run_worker_ios if kind == "worker" else run_batch_ios
    run(sq, qd, min(ios, 64 * qd))      # warm-up: lazy symbol binding, first-touch pages
    for label, n in (("n1", ios), ("n2", 2 * ios)):
        lib.idma_sim_callgrind_begin()
        run(sq, qd, n)
        lib.idma_sim_callgrind_end(label.encode())
    info = sq.info()
    print("SIM " + json.dumps({k: info[k] for k in ("fetched", "reads", "sq_doorbells",
                                                     "cq_doorbells", "cq_full",
                                                     "bad_doorbells")}))
    print(f"valgrind: {lib.idma_sim_running_on_valgrind()}")
    return 0


# ---- the parent: build, run each case under callgrind, report ----

def clean_env() -> dict[str, str]:
    """This environment without sanitizer preloads (make test-asan runs the tests that call
    us with libasan preloaded; neither valgrind nor gcc wants it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC")}
    env.pop("IOMMU_DMA_NATIVE", None)
    return env


def sim_module() -> Path | None:
    found = sorted((ROOT / "iommu_dma").glob("_native_sim*.so"))
    return found[0] if found else None


def ensure_sim_build() -> Path:
    """Build iommu_dma._native_sim when missing or older than a native source."""
    built = sim_module()
    inputs = [*NATIVE.glob("*.[ch]"), *NATIVE.glob("sim/*.[ch]"), NATIVE / "build.py"]
    if built is None or built.stat().st_mtime < max(p.stat().st_mtime for p in inputs):
        subprocess.run([sys.executable, str(NATIVE / "build.py"), "--sim"], check=True,
                       cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL)
        built = sim_module()
    if built is None:
        raise SystemExit("native/build.py --sim built no iommu_dma/_native_sim*.so")
    return built


def _totals(path: Path) -> int:
    m = re.search(r"^(?:totals|summary):\s*(\d+)", path.read_text(), re.M)
    if not m:
        raise SystemExit(f"{path}: no totals line")
    return int(m.group(1))


def _functions(path: Path) -> dict[str, int]:
    """Exclusive Ir per function of one callgrind dump (callgrind_annotate)."""
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(path)],
                         check=True, capture_output=True, text=True).stdout
    funcs: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S+)", line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r"'\d+$", "", m.group(2))       # recursion depth suffix
            funcs[name] = funcs.get(name, 0) + int(m.group(1).replace(",", ""))
    return funcs


@dataclass
class Measured:
    case: Case
    ios: int
    ir_n1: int
    ir_n2: int
    sim: dict[str, int]
    parts: dict[str, Path]

    def profile(self, top: int = 15) -> list[tuple[float, str]]:
        """Instructions per I/O of each function (exclusive), largest first."""
        a, b = _functions(self.parts["n1"]), _functions(self.parts["n2"])
        rows = [((b.get(k, 0) - a.get(k, 0)) / self.ios, k) for k in set(a) | set(b)]
        return sorted((r for r in rows if abs(r[0]) >= 0.5), reverse=True)[:top]

    @property
    def per_io(self) -> float:
        return (self.ir_n2 - self.ir_n1) / self.ios


def measure(case: Case, ios: int, workdir: Path) -> Measured:
    out = workdir / f"{case.kind}-qd{case.qd}.cg"
    env = clean_env() | {"IOMMU_DMA_NATIVE": "sim", "PYTHONHASHSEED": "0"}
    # Collected: the window's instructions (the worker: only inside idma_worker_run, so the
    # Python wrapper's conversion of a timing-dependent histogram stays out), never the
    # simulated controller's (toggled off inside its doorbell function).
    # (A --toggle-collect implies --collect-atstart=no: the explicit setting comes after it.)
    collect = (["--toggle-collect=idma_worker_run", "--collect-atstart=no"]
               if case.kind == "worker" else ["--collect-atstart=yes"])
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           "--toggle-collect=idma_sim_doorbell", *collect,
           f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.engine_cost",
           "--child", case.kind, "--qd", str(case.qd), "--ios", str(ios)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{case.name}: callgrind run failed ({p.returncode}):\n"
                         f"{p.stdout}{p.stderr[-3000:]}")
    sim = json.loads(re.search(r"^SIM (.*)$", p.stdout, re.M).group(1))  # type: ignore[union-attr]
    parts = {}
    for f in workdir.glob(out.name + ".*"):
        m = re.search(r"^desc: Trigger: Client Request: (\w+)", f.read_text(), re.M)
        if m:
            parts[m.group(1)] = f
    if set(parts) != {"n1", "n2"}:
        raise SystemExit(f"{case.name}: expected callgrind dumps n1 and n2, found {sorted(parts)}"
                         f" (is the engine built with <valgrind/callgrind.h>?)")
    return Measured(case, ios, _totals(parts["n1"]), _totals(parts["n2"]), sim, parts)


def report(results: list[Measured]) -> None:
    print(f"\n{'engine cost, 4 KiB randread':24} {'instr/IO':>9}  {'target':>9}  "
          f"{'Ir (N I/Os)':>13} {'Ir (2N I/Os)':>13}")
    for r in results:
        target = f"<= {TARGET}" if r.case.kind == "worker" else ""
        print(f"{r.case.name:24} {r.per_io:9.1f}  {target:>9}  {r.ir_n1:13d} {r.ir_n2:13d}")
    print(f"\ninstructions per I/O from submit to reaped completion, simulated controller "
          f"excluded; N = {results[0].ios if results else 0}")
    print("RESULT " + json.dumps({r.case.name: round(r.per_io, 1) for r in results}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_cost",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ios", type=int, default=20000, help="N: I/Os of the first window")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help="comma-separated case names (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="also print each workload's top functions, instructions per I/O")
    parser.add_argument("--child", choices=("worker", "batch"), help=argparse.SUPPRESS)
    parser.add_argument("--qd", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ios < 1:
        parser.error("--ios must be at least 1")
    if args.child:
        return child(args.child, args.qd, args.ios)
    wanted = [c for c in CASES if c.name in args.cases.split(",")]
    if not wanted:
        parser.error(f"--cases: none of {[c.name for c in CASES]}")
    built = ensure_sim_build()
    print(f"engine with the simulated controller: {built.relative_to(ROOT)}; "
          f"callgrind, N = {args.ios} and {2 * args.ios} I/Os per workload", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="engine-cost-") as tmp:
        for case in wanted:
            r = measure(case, args.ios, Path(tmp))
            print(f"  {case.name}: {r.per_io:.1f} instructions per I/O", flush=True)
            if args.profile:
                for v, func in r.profile():
                    print(f"    {v:7.1f}  {func}")
            results.append(r)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
