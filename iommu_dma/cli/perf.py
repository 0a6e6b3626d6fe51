"""`perf`: fio-like workloads on the native I/O worker, with a live IOPS line."""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from iommu_dma.cli import output
from iommu_dma.cli.common import (
    CliError,
    add_output_format,
    confirm,
    controller,
    int_range,
    namespace,
    nonnegative,
    nsid_type,
    parse_size,
    positive,
    seconds,
    set_handler,
)

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace
    from iommu_dma.nvme.perf import MultiResult, PerfGroup, PerfResult, PerfRun, Workload

RW_CHOICES = ("read", "write", "randread", "randwrite", "rw", "randrw", "trim", "randtrim")
WAIT_CHOICES = ("poll", "interrupt", "hybrid")      # iommu_dma.nvme.interrupts.WAIT_MODES
PROBE_HEAD = 4 << 20            # bytes read from the start of the namespace
PROBE_SAMPLES = 64              # random LBAs read besides


def holds_data(ns: Namespace, seed: int = 0) -> bool:
    """Any non-zero byte in the first PROBE_HEAD bytes or in a sample of LBAs."""
    head = min(ns.blocks, max(1, PROBE_HEAD // ns.lba_size))
    step = max(1, (1 << 20) // ns.lba_size)
    for lba in range(0, head, step):
        if any(ns.read(lba, min(step, head - lba))):
            return True
    rng = random.Random(seed)
    return any(any(ns.read(rng.randrange(ns.blocks), 1)) for _ in range(PROBE_SAMPLES))


class LiveLine:
    """Prints IOPS and MB/s since the last tick: one \\r-updated line on a terminal, else one
    line per tick."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = (0, 0, time.monotonic())
        self.dirty = False

    def __call__(self, run: PerfRun | PerfGroup) -> None:
        ios, nbytes = run.snapshot()
        now = time.monotonic()
        dt = max(now - self.last[2], 1e-6)
        iops, mbps = (ios - self.last[0]) / dt, (nbytes - self.last[1]) / dt / 1e6
        self.last = (ios, nbytes, now)
        text = f"[{now - run.started:5.1f} s] {iops:10.0f} IOPS {mbps:9.2f} MB/s"
        if self.tty:
            self.stream.write(f"\r{text}")
            self.dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()


def bssplit_type(text: str) -> list[tuple[int, int]]:
    """argparse type of --bssplit: fio's SIZE/PERCENT:SIZE/PERCENT..."""
    from iommu_dma.nvme.perf import parse_bssplit

    try:
        return parse_bssplit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--bssplit ")) from None


def nsid_list(text: str) -> list[int]:
    """argparse type of -n: one NSID or several, comma-separated ("1,2")."""
    out = [nsid_type(part.strip()) for part in text.split(",")]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r} names a namespace twice")
    return out


def workload(args: argparse.Namespace) -> Workload:
    from iommu_dma.nvme.perf import Workload

    return Workload(rw=args.rw, bs=args.bs, iodepth=args.iodepth, runtime=args.runtime,
                    numjobs=args.numjobs, rwmixread=args.rwmixread, offset=args.offset,
                    size=args.size, verify=args.verify, wait=args.wait, bssplit=args.bssplit,
                    trim_pct=args.trim_pct, flush_pct=args.flush_pct,
                    rate_iops=args.rate_iops, spin_only=args.spin_only)


def describe(w: Workload, ns: Namespace | list[Namespace]) -> str:
    nss = ns if isinstance(ns, list) else [ns]
    mix = f" rwmixread={w.read_pct()}" if w.rw in ("rw", "randrw") else ""
    sizes = ("bssplit=" + ":".join(f"{b}/{p}" for b, p in w.bssplit)) if w.bssplit \
        else f"bs={w.bs}"
    extra = "".join(f" {k}={v}" for k, v in (("trim_pct", w.trim_pct),
                                             ("flush_pct", w.flush_pct),
                                             ("rate_iops", w.rate_iops)) if v)
    region = f" offset={w.offset} size={w.size}" if w.offset or w.size else ""
    return (f"{nss[0].ctrl.bdf} nsid {','.join(str(n.nsid) for n in nss)}: rw={w.rw}{mix} "
            f"{sizes}{extra}{region} iodepth={w.iodepth} numjobs={w.numjobs} "
            f"runtime={w.runtime:g}s wait={w.wait}{' verify' if w.verify else ''}")


def guard_data(args: argparse.Namespace, w: Workload, ns: Namespace) -> None:
    """Ask before writes or trims overwrite a namespace that holds data (unless --force)."""
    if w.writes_data() and not args.force and holds_data(ns):
        confirm(f"Namespace {ns.nsid} of {ns.ctrl.bdf} holds data; --rw {args.rw} "
                "overwrites it. Go on?", False,
                f"namespace {ns.nsid} of {ns.ctrl.bdf} holds data; refusing to overwrite it")


def cmd_perf(args: argparse.Namespace) -> int:
    from iommu_dma.nvme.perf import PerfRun, check_workload

    w = workload(args)
    if len(args.nsids) > 1:
        return cmd_perf_many(args, w)
    with namespace(args.bdf, args.nsids[0]) as ns:
        check_workload(ns, w)
        guard_data(args, w, ns)
        sys.stderr.write(describe(w, ns) + "\n")
        live = LiveLine(sys.stderr)
        try:
            result = PerfRun(ns, w).wait(live)
        finally:
            live.close()
    return report(args, w, result)


def cmd_perf_many(args: argparse.Namespace, w: Workload) -> int:
    """perf on several namespaces of one controller at once (-n 1,2)."""
    from iommu_dma.nvme.perf import PerfGroup, check_workload

    with controller(args.bdf) as ctrl:
        nss = [ctrl.namespace(n) for n in args.nsids]
        for ns in nss:
            check_workload(ns, w)
            guard_data(args, w, ns)
        sys.stderr.write(describe(w, nss) + "\n")
        live = LiveLine(sys.stderr)
        try:
            multi = PerfGroup(nss, w).wait(live)
        finally:
            live.close()
    return report(args, w, multi.combined, multi)


def workload_dict(w: Workload) -> dict[str, Any]:
    return {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "numjobs": w.numjobs,
            "runtime": w.runtime, "read_pct": w.read_pct(), "offset": w.offset,
            "size": w.size, "verify": w.verify, "wait": w.wait,
            "bssplit": [list(x) for x in w.bssplit] if w.bssplit else None,
            "trim_pct": w.trims(), "flush_pct": w.flush_pct, "rate_iops": w.rate_iops,
            "spin_only": w.spin_only}


def report(args: argparse.Namespace, w: Workload, result: PerfResult,
           multi: MultiResult | None = None) -> int:
    """Print the result (table or JSON; with several namespaces, each one's and the combined
    figures); CliError saying why when it cannot be trusted (a job timed out or failed, I/O
    errors, verify failures), even though some I/O finished."""
    data = {"workload": workload_dict(w), **result.to_dict()}
    if multi is not None:
        data["namespaces"] = {str(n): r.to_dict() for n, r in multi.namespaces.items()}
    if args.output_format == "json":
        output.emit_json(data)
    else:
        output.print_lines(table_lines(data, multi))
        output.print_lines(failed_lines(result))
    sys.stdout.flush()
    if result.problems:
        only_io_errors = result.problems == [p for p in result.problems if "I/O error" in p]
        why = ("; every other I/O completed" if only_io_errors and not result.timed_out
               else " (so its figures cannot be trusted)")
        raise CliError(f"perf: {'; '.join(result.problems)}{why}")
    return 0


FAILED_HEADERS = ("Op", "LBA", "Blocks", "Times", "Status")
OPS_HEADERS = ("Op", "I/Os", "IOPS", "MB/s", "lat avg", "max (us)")


def op_row(op: str, sec: dict[str, Any]) -> list[str]:
    """One op's line from its fio-style section."""
    lat = sec["lat_ns"]
    return [op, str(sec["total_ios"]), f"{sec['iops']:.0f}", f"{sec['bw_bytes'] / 1e6:.2f}",
            f"{lat['mean'] / 1000:.1f}", f"{lat['max'] / 1000:.1f}"]


def table_lines(data: dict[str, Any], multi: MultiResult | None) -> list[str]:
    """The result table; per-op lines when the run mixed more than reads and writes or sizes;
    with several namespaces, each one's table first."""
    lines: list[str] = []
    if multi is not None:
        for nsid, r in multi.namespaces.items():
            lines += [f"namespace {nsid}:", *output.perf_lines(r.to_dict()), ""]
        lines.append("combined:")
    lines += output.perf_lines(data)
    rows = [op_row(op, data[op]) for op in ("read", "write", "trim", "sync")
            if data[op]["total_ios"]]
    if len(rows) > 1 or data["workload"]["bssplit"]:
        lines += ["", *output.table(OPS_HEADERS, rows)]
        lines += [f"I/Os of {size} bytes: {n}" for size, n in data["bssplit_ios"].items()]
    return lines


def failed_lines(result: PerfResult) -> list[str]:
    """The failed I/Os, one line each (by LBA), after a line saying how many of all failed;
    nothing when none failed."""
    if not result.errors:
        return []
    lines = ["", f"Failed I/Os: {result.errors} of {result.ios} (the others completed)"]
    rows = [[f.op, str(f.lba), str(f.blocks), str(f.count), f.status_name]
            for f in result.failed_ios]
    if rows:
        lines += output.table(FAILED_HEADERS, rows)
    if result.failed_ios_not_listed:
        lines.append(f"{result.failed_ios_not_listed} more not listed (each job lists its "
                     "first 256 distinct failed I/Os)")
    if result.verify_skipped:
        lines.append(f"{result.verify_skipped} read(s) not verified: a write of their block "
                     "had failed, so its content is unknown")
    return lines


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("perf", parents=[common], help="fio-like benchmark on a namespace",
                       description="Run a fio-like workload on the native I/O worker (one I/O "
                                   "queue pair per job). Option names follow fio; sizes take "
                                   "k/m/g suffixes (binary).")
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    p.add_argument("-n", "--namespace-id", dest="nsids", type=nsid_list, required=True,
                   help="namespace ID, or several comma-separated (1,2): each runs the "
                        "workload with its own jobs at the same time; results per namespace "
                        "and combined")
    p.add_argument("--rw", choices=RW_CHOICES, default="randread",
                   help="default randread; trim/randtrim: every I/O a trim (Dataset "
                        "Management, deallocate)")
    p.add_argument("--rwmixread", type=int_range(0, 100, "a percentage"), default=None,
                   help="percentage of reads for rw/randrw (default 50), among the reads "
                        "and writes")
    p.add_argument("--bs", type=parse_size, default=4096, help="block size, e.g. 4k, 128k, 1m")
    p.add_argument("--bssplit", type=bssplit_type, default=None,
                   help="block sizes by weight instead of --bs, fio's syntax: 4k/50:128k/50 "
                        "(percentages adding up to 100; at most 8 sizes)")
    p.add_argument("--trim_pct", "--trim-pct", dest="trim_pct",
                   type=int_range(0, 100, "a percentage"), default=0,
                   help="percentage of all I/Os that are trims (Dataset Management, "
                        "deallocate); the rest follow --rw/--rwmixread")
    p.add_argument("--flush_pct", "--flush-pct", dest="flush_pct",
                   type=int_range(0, 100, "a percentage"), default=0,
                   help="percentage of all I/Os that are Flush commands")
    p.add_argument("--rate_iops", "--rate-iops", dest="rate_iops", type=nonnegative,
                   default=0, help="cap each job at this many I/Os a second (fio's "
                                   "rate_iops; 0 = no cap)")
    p.add_argument("--iodepth", type=positive, default=1,
                   help="I/Os in flight per job (at most the controller's queue size - 1)")
    p.add_argument("--runtime", type=seconds(), default=5.0,
                   help="seconds (default 5; at most a week)")
    p.add_argument("--numjobs", type=positive, default=1, help="jobs (one queue pair each)")
    p.add_argument("--size", type=parse_size, default=0,
                   help="bytes of the namespace to use from --offset, e.g. 64m (default: to "
                        "the end)")
    p.add_argument("--offset", type=parse_size, default=0,
                   help="byte where the region starts, e.g. 1g (a multiple of the LBA size)")
    p.add_argument("--verify", action="store_true", help="check the data read back")
    p.add_argument("--wait", choices=WAIT_CHOICES, default="poll",
                   help="how each job waits for completions: poll (default) spins on the "
                        "queue, a whole core per job, for the lowest latency; interrupt "
                        "sleeps on the queue's MSI-X vector while nothing has completed "
                        "(little CPU at low --iodepth, some latency per wake-up); hybrid "
                        "spins briefly (50 us) after each completion, then sleeps")
    p.add_argument("--spin-only", action="store_true",
                   help="with --wait poll: never sleep while waiting (by default a job that "
                        "sees its CPU taken away sleeps in 20 us steps for its next 256 I/Os: "
                        "faster on a shared host, slower on an idle one)")
    p.add_argument("--force", action="store_true",
                   help="write even when the namespace holds data, without asking")
    add_output_format(p)
    set_handler(p, cmd_perf)
