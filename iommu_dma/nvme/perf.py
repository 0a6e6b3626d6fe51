"""Workloads on the native I/O worker: fio-like jobs, one I/O queue pair per job.

The worker loop runs entirely in C with the GIL released, so jobs run in parallel threads and
a caller can watch live progress from Python.

An I/O that fails (e.g. a media error) does not stop a job: the worker counts it, lists it
(command and status; the first 256 distinct failed I/Os of each job) and goes on with the
others. The result's `failed_ios` name each one (LBA, blocks, read/write, the spec's status
name), `failed_ios_not_listed` counts those beyond the worker's list, and `problems`/`ok` say
that the run had errors. With verify, a failed read is an error, not a verify failure, and a
block whose write failed is not checked again until a write of it succeeds.

Workload.wait says how a job waits for its completions: "poll" spins on the CQ (a core per
job, the lowest latency); "interrupt" runs the job on a queue whose CQ signals an MSI-X vector
and sleeps on it whenever nothing has completed (little CPU at low queue depths); "hybrid"
spins briefly (HYBRID_SPIN) after each completion, then sleeps. A polled job that sees its
CPU taken away (two empty polls more than 300 us apart) waits in 20 us sleeps, after 50 us of
spinning, for its next 256 I/Os, so that it does not compete with whoever took the CPU (on a
TCG guest: the device emulation); `spin_only` turns that off. Measured (benchmarks.qd1, QD1 on
the TCG bench): spin-only 146-147 us against 150-158 us on an idle host, but 350 us against
288 us with a CPU-bound process beside the guest, hence the default. Jobs on queues that share a
vector (more jobs than the device has vectors) may wake each other's sleep, or wake late (by
at most the worker's 10 ms sleep slice).

Beyond reads and writes (fio's option names): `bssplit` draws each I/O's size from weighted
sizes; `trim_pct`/`flush_pct` make that share of the I/Os Dataset Management deallocates
(trims) and Flushes, `rw="trim"`/`"randtrim"` trims only; `rate_iops` caps each job's
submissions (a token bucket in the C worker); the result carries per-op figures (fio's
read/write/trim/sync sections), I/Os per size of the split and a per-second series.
`run_many` runs the same workload on several namespaces at once.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iommu_dma.errors import ClosedError, IommuDmaError
from iommu_dma.native import ffi, lib
from iommu_dma.nvme.interrupts import WaitMode, check_mode
from iommu_dma.nvme.queue import (
    EBUSY,
    ECLOSED,
    EINVAL,
    ETIMEDOUT,
    QueueError,
    WorkerConfig,
    WorkerResult,
    _cfg_struct,
    _result,
    new_progress,
)
from iommu_dma.nvme.status import STATUS_BITS, NvmeError, decode_status

if TYPE_CHECKING:
    from iommu_dma.nvme.namespace import Namespace
    from iommu_dma.nvme.queue import QueuePair

MAX_RUNTIME = 7 * 24 * 3600.0       # seconds: a week
RW_MODES = {  # fio --rw name -> (random, default read percentage)
    "read": (False, 100), "write": (False, 0), "randread": (True, 100),
    "randwrite": (True, 0), "rw": (False, 50), "randrw": (True, 50),
    "trim": (False, 0), "randtrim": (True, 0),
}
TRIM_MODES = ("trim", "randtrim")           # every I/O a trim (Dataset Management, deallocate)
OPCODES = {0x01: "write", 0x02: "read", 0x09: "trim", 0x00: "flush"}   # NVM Command Set §3.3
OP_KINDS = ("read", "write", "trim", "sync")    # worker op_* index -> fio's JSON section
MAX_BSSPLIT = 8                             # sizes of a split (IDMA_WORKER_MAX_BS)
FIO_PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0,
                   99.5, 99.9, 99.95, 99.99)   # fio's default clat/lat percentile list
PROBLEM_LISTS = 8                           # failed I/Os named in the problems phrase


@dataclass(frozen=True)
class FailedIo:
    """An I/O that completed with an error status: the command (opcode, first LBA, blocks),
    its 15-bit status and how many times it failed so (jobs merged)."""

    opcode: int
    lba: int
    blocks: int
    status: int
    count: int = 1

    @property
    def op(self) -> str:
        """"read", "write" (or the opcode in hex)."""
        return OPCODES.get(self.opcode, f"opcode {self.opcode:#04x}")

    @property
    def error(self) -> NvmeError:
        """The failure as an NvmeError (its .name is the spec's status name, .sct/.sc)."""
        return NvmeError(self.status, self.command)

    @property
    def command(self) -> str:
        return f"{self.op} LBA {self.lba} ({self.blocks} block{'s' if self.blocks != 1 else ''})"

    @property
    def status_name(self) -> str:
        """The status as the spec names it, with SCT/SC, e.g. "Unrecovered Read Error (SCT 0x2,
        SC 0x81)"."""
        return str(self.error).removeprefix(f"{self.command}: ")

    def __str__(self) -> str:
        times = f", {self.count} times" if self.count != 1 else ""
        return f"{self.command}: {self.status_name}{times}"

    def to_dict(self) -> dict[str, Any]:
        st = decode_status(self.status)
        return {"op": self.op, "lba": self.lba, "blocks": self.blocks, "count": self.count,
                "status": self.status_name, "name": self.error.name, "sct": st.sct,
                "sc": st.sc}


@dataclass
class OpStats:
    """One op kind's figures (read, write, trim or sync = flush): completed I/Os, bytes of the
    successful ones (a trim: bytes deallocated), errors, latency (ns; hist maps a bucket's low
    bound to its count)."""

    ios: int = 0
    bytes: int = 0
    errors: int = 0
    lat_min_ns: int = 0
    lat_max_ns: int = 0
    lat_sum_ns: int = 0
    hist: dict[int, int] = field(default_factory=dict)

    @property
    def lat_mean_ns(self) -> float:
        return self.lat_sum_ns / self.ios if self.ios else 0.0

    def percentile(self, pct: float) -> int:
        """Latency (ns) at pct, from the histogram (a bucket's upper bound, capped at max)."""
        return hist_percentile([self.hist], pct, self.lat_max_ns)

    def fio(self, seconds: float) -> dict[str, Any]:
        """fio's JSON section for this op: io_bytes, io_kbytes, bw (KiB/s), bw_bytes, iops,
        runtime (ms), total_ios, lat_ns {min, max, mean, N, percentile}."""
        span = seconds if seconds > 0 else 0.0
        return {"io_bytes": self.bytes, "io_kbytes": self.bytes // 1024,
                "bw_bytes": round(self.bytes / span) if span else 0,
                "bw": round(self.bytes / 1024 / span) if span else 0,
                "iops": round(self.ios / span, 3) if span else 0.0,
                "runtime": round(seconds * 1000), "total_ios": self.ios,
                "short_ios": 0, "drop_ios": 0, "errors": self.errors,
                "lat_ns": {"min": self.lat_min_ns, "max": self.lat_max_ns,
                           "mean": round(self.lat_mean_ns, 3), "N": self.ios,
                           "percentile": {f"{p:f}": self.percentile(p)
                                          for p in FIO_PERCENTILES} if self.ios else {}}}


def merge_ops(ops: list[OpStats]) -> OpStats:
    """Several jobs' figures of one op kind as one."""
    done = [o for o in ops if o.ios]
    hist: dict[int, int] = {}
    for o in done:
        for low, n in o.hist.items():
            hist[low] = hist.get(low, 0) + n
    return OpStats(ios=sum(o.ios for o in ops), bytes=sum(o.bytes for o in ops),
                   errors=sum(o.errors for o in ops),
                   lat_min_ns=min((o.lat_min_ns for o in done), default=0),
                   lat_max_ns=max((o.lat_max_ns for o in done), default=0),
                   lat_sum_ns=sum(o.lat_sum_ns for o in ops), hist=hist)


def hist_percentile(hists: list[dict[int, int]], pct: float, max_ns: int) -> int:
    """Percentile pct of merged histograms (bucket low bound -> count), via the engine."""
    buckets = ffi.new("uint64_t[]", lib.IDMA_HIST_BUCKETS)
    for h in hists:
        for low, n in h.items():
            buckets[lib.idma_hist_bucket(low)] += n
    return int(lib.idma_hist_percentile(buckets, pct, max_ns))


@dataclass(frozen=True)
class Second:
    """I/Os that completed in second `second` of a run (jobs added up): count, bytes of
    successful reads and writes, latency sum and max (ns); `span` is how much of that second
    the run lasted (1.0 but for the last one)."""

    second: int
    ios: int
    bytes: int
    lat_sum_ns: int
    lat_max_ns: int
    span: float = 1.0

    @property
    def iops(self) -> float:
        return self.ios / self.span if self.span > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / self.span / 1e6 if self.span > 0 else 0.0

    @property
    def lat_mean_ns(self) -> float:
        return self.lat_sum_ns / self.ios if self.ios else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"second": self.second, "ios": self.ios, "iops": round(self.iops, 1),
                "bytes": self.bytes, "mb_per_s": round(self.mbps, 3),
                "lat_mean_ns": round(self.lat_mean_ns), "lat_max_ns": self.lat_max_ns}


def merge_series(series: list[list[Second]], seconds: float) -> list[Second]:
    """Jobs' series added up second by second; the last second's span is what is left of
    `seconds` (the run's length)."""
    n = max((len(x) for x in series), default=0)
    out = []
    for i in range(n):
        parts = [x[i] for x in series if i < len(x)]
        span = min(1.0, seconds - i) if seconds > i else 1.0
        out.append(Second(second=i, ios=sum(p.ios for p in parts),
                          bytes=sum(p.bytes for p in parts),
                          lat_sum_ns=sum(p.lat_sum_ns for p in parts),
                          lat_max_ns=max(p.lat_max_ns for p in parts),
                          span=span if span > 0 else 1.0))
    return out


@dataclass
class JobResult(WorkerResult):
    """A job's WorkerResult with the failed I/Os its worker listed (first seen first), the
    reads not verified because a write of their block had failed, per-op figures (keys of
    OP_KINDS), I/Os per size of the block-size split (bytes -> count) and the per-second
    series."""

    failed_ios: list[FailedIo] = field(default_factory=list)
    verify_skipped: int = 0
    ops: dict[str, OpStats] = field(default_factory=dict)
    bs_ios: dict[int, int] = field(default_factory=dict)
    series: list[Second] = field(default_factory=list)

    @property
    def failed_ios_not_listed(self) -> int:
        """Failed I/Os beyond the worker's list (counted in errors only)."""
        return max(0, self.errors - sum(f.count for f in self.failed_ios))


def _failed_ios(res: Any) -> list[FailedIo]:
    """The worker's failed[] list, read within its bounds."""
    n = min(int(res.nfailed), int(lib.IDMA_WORKER_MAX_FAILED))
    out = []
    for i in range(n):
        f = res.failed[i]
        out.append(FailedIo(opcode=int(f.opcode), lba=int(f.lba), blocks=int(f.nlb),
                            status=int(f.status) & ((1 << STATUS_BITS) - 1),
                            count=int(f.count)))
    return out


@dataclass(frozen=True)
class OpMix:
    """Worker settings beyond queue.WorkerConfig: a block-size split ((LBAs, weight) pairs,
    weights summing to 100, each size at most the config's block_lbas; empty: every I/O is
    block_lbas), the shares of trims and flushes (percent of all I/Os), an IOPS cap (0: none)."""

    split: tuple[tuple[int, int], ...] = ()
    trim_pct: int = 0
    flush_pct: int = 0
    rate_iops: int = 0

    def apply(self, cfg: Any) -> None:
        """Set these fields of a `struct idma_worker_cfg *`."""
        cfg.nbs = len(self.split)
        for i, (lbas, pct) in enumerate(self.split):
            cfg.bs_lbas[i], cfg.bs_pct[i] = lbas, pct
        cfg.trim_pct, cfg.flush_pct, cfg.rate_iops = self.trim_pct, self.flush_pct, self.rate_iops


def _op_stats(res: Any) -> dict[str, OpStats]:
    out = {}
    for k, name in enumerate(OP_KINDS):
        hist = {int(lib.idma_hist_low(i)): int(res.op_hist[k][i])
                for i in range(lib.IDMA_HIST_BUCKETS) if res.op_hist[k][i]}
        out[name] = OpStats(ios=int(res.op_ios[k]), bytes=int(res.op_bytes[k]),
                            errors=int(res.op_errors[k]), lat_min_ns=int(res.op_lat_min_ns[k]),
                            lat_max_ns=int(res.op_lat_max_ns[k]),
                            lat_sum_ns=int(res.op_lat_sum_ns[k]), hist=hist)
    return out


def _series(res: Any) -> list[Second]:
    n = min(int(res.nseries), int(lib.IDMA_WORKER_SERIES))
    return [Second(second=i, ios=int(e.ios), bytes=int(e.bytes), lat_sum_ns=int(e.lat_sum_ns),
                   lat_max_ns=int(e.lat_max_ns)) for i, e in ((i, res.series[i])
                                                               for i in range(n))]


def _bs_ios(res: Any, mix: OpMix, config: WorkerConfig) -> dict[int, int]:
    sizes = [lbas for lbas, _ in mix.split] or [config.block_lbas]
    out: dict[int, int] = {}
    for i, lbas in enumerate(sizes):
        nbytes = lbas * config.lba_size
        out[nbytes] = out.get(nbytes, 0) + int(res.bs_ios[i])
    return out


def run_worker(qpair: QueuePair, config: WorkerConfig, progress: Any = None,
               mix: OpMix | None = None) -> JobResult:
    """queue.run_worker, keeping what the worker listed of its failed I/Os, its per-op figures,
    sizes and series (GIL released for the whole run). Raises QueueError for a refused
    configuration, a queue pair another thread is using or closed during the run; I/O errors
    are reported in the result."""
    mix = mix or OpMix()
    cfg = _cfg_struct(config)
    mix.apply(cfg)
    res = ffi.new("struct idma_worker_result *")
    rc = lib.idma_worker_run(qpair.cdata, cfg, res, progress if progress is not None else ffi.NULL)
    if rc in (EINVAL, EBUSY, ECLOSED):
        raise qpair._error(rc)
    base = _result(res)
    fields = {name: getattr(base, name) for name in WorkerResult.__dataclass_fields__}
    return JobResult(**fields, failed_ios=_failed_ios(res),
                     verify_skipped=int(res.verify_skipped), ops=_op_stats(res),
                     bs_ios=_bs_ios(res, mix, config), series=_series(res))


def merge_failed(results: list[WorkerResult]) -> tuple[list[FailedIo], int]:
    """Every job's listed failed I/Os, the same command and status merged (counts added), by
    LBA; and how many failed I/Os no list holds (a result without a list: all its errors)."""
    merged: dict[tuple[int, int, int, int], int] = {}
    unlisted = 0
    for r in results:
        if not isinstance(r, JobResult):
            unlisted += r.errors
            continue
        unlisted += r.failed_ios_not_listed
        for f in r.failed_ios:
            key = (f.lba, f.opcode, f.blocks, f.status)
            merged[key] = merged.get(key, 0) + f.count
    out = [FailedIo(opcode=op, lba=lba, blocks=blocks, status=st, count=n)
           for (lba, op, blocks, st), n in sorted(merged.items())]
    return out, unlisted


@dataclass
class Workload:
    """What to run, in fio's terms (bs and size/offset in bytes)."""

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    runtime: float = 5.0              # seconds; 0 = until `ios` are done
    ios: int = 0                      # per job; 0 = until runtime is over
    numjobs: int = 1
    rwmixread: int | None = None      # percentage of reads for rw/randrw
    offset: int = 0
    size: int = 0                     # bytes of the namespace to use; 0 = to the end
    verify: bool = False              # with numjobs > 1: each job its own slice of the range
    seed: int = 1
    wait: WaitMode = "poll"           # poll, interrupt or hybrid (see the module text)
    bssplit: list[tuple[int, int]] | None = None
    """Block sizes drawn per I/O: (bytes, percent) pairs, percents summing to 100 (fio's
    bssplit, e.g. parse_bssplit("4k/50:128k/50")); None: every I/O is bs."""
    trim_pct: int = 0                 # percent of the I/Os that are trims (deallocate)
    flush_pct: int = 0                # percent of the I/Os that are flushes
    rate_iops: int = 0                # per job: at most this many I/Os a second (0 = no cap)
    spin_only: bool = False           # poll: never sleep while waiting (see the module text)

    def read_pct(self) -> int:
        """Reads among the data I/Os (reads and writes), in percent."""
        if self.rwmixread is not None and self.rw in ("rw", "randrw"):
            return self.rwmixread
        return RW_MODES[self.rw][1]

    def trims(self) -> int:
        """Trims among all I/Os, in percent (100 for rw trim/randtrim)."""
        return 100 if self.rw in TRIM_MODES else self.trim_pct

    def sizes(self) -> list[tuple[int, int]]:
        """(bytes, percent) of each block size: the split, or bs alone."""
        return list(self.bssplit) if self.bssplit else [(self.bs, 100)]

    def max_bs(self) -> int:
        return max(size for size, _ in self.sizes())

    def writes_data(self) -> bool:
        """Whether a run changes the namespace's data (writes or trims)."""
        return (self.read_pct() < 100 and self.trims() + self.flush_pct < 100) or \
            self.trims() > 0

    def mix(self, lba_size: int) -> OpMix:
        """The worker's OpMix for a namespace of lba_size-byte blocks."""
        split = tuple((size // lba_size, pct) for size, pct in self.bssplit or ())
        return OpMix(split=split, trim_pct=self.trims(), flush_pct=self.flush_pct,
                     rate_iops=self.rate_iops)


def parse_bssplit(text: str) -> list[tuple[int, int]]:
    """fio's bssplit syntax, "4k/50:128k/50": (bytes, percent) pairs. ValueError when a part
    is not SIZE/PERCENT. Sizes take k/m/g suffixes (binary)."""
    out = []
    for part in text.split(":"):
        size, sep, pct = part.partition("/")
        if not sep or not pct.strip().isdigit():
            raise ValueError(f"--bssplit {text!r}: each part is SIZE/PERCENT, e.g. "
                             "4k/50:128k/50")
        out.append((_size(size.strip(), text), int(pct)))
    return out


def _size(text: str, whole: str) -> int:
    shifts = {"": 0, "k": 10, "m": 20, "g": 30}
    t = text.lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in ("k", "m", "g") else ""
    digits = t[:-1] if unit else t
    if not digits.isdigit():
        raise ValueError(f"--bssplit {whole!r}: {text!r} is not a size (e.g. 4k, 128k, 1m)")
    return int(digits) << shifts[unit]


@dataclass
class PerfResult:
    """Jobs combined: totals, and latency percentiles from the merged histogram (ns)."""

    ios: int
    bytes: int
    seconds: float
    errors: int
    verify_failures: int
    lat_avg_ns: float
    lat_p50_ns: int
    lat_p99_ns: int
    lat_p999_ns: int
    lat_max_ns: int
    jobs: list[WorkerResult] = field(default_factory=list)
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)   # why the figures cannot be trusted
    failed_ios: list[FailedIo] = field(default_factory=list)    # by LBA, jobs merged
    failed_ios_not_listed: int = 0      # failed I/Os beyond the workers' lists
    verify_skipped: int = 0             # reads not verified: a write of their block failed
    ops: dict[str, OpStats] = field(default_factory=dict)   # read, write, trim, sync (flush)
    bs_ios: dict[int, int] = field(default_factory=dict)    # I/O size (bytes) -> I/Os
    series: list[Second] = field(default_factory=list)      # per second, jobs added up

    @property
    def ok(self) -> bool:
        """No job timed out or failed, no I/O error, no verify failure."""
        return not self.problems

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"iops": round(self.iops, 1), "mb_per_s": round(self.mbps, 2), "ios": self.ios,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "errors": self.errors,
                "verify_failures": self.verify_failures, "timed_out": self.timed_out,
                "ok": self.ok, "problems": list(self.problems),
                "failed_ios": [f.to_dict() for f in self.failed_ios],
                "failed_ios_not_listed": self.failed_ios_not_listed,
                "verify_skipped": self.verify_skipped,
                "lat_ns": {"avg": round(self.lat_avg_ns), "p50": self.lat_p50_ns,
                           "p99": self.lat_p99_ns, "p99.9": self.lat_p999_ns,
                           "max": self.lat_max_ns},
                **self.fio_sections(),
                "bssplit_ios": {str(k): v for k, v in sorted(self.bs_ios.items())},
                "series": [x.to_dict() for x in self.series],
                "jobs": [job_dict(i, r, self.seconds) for i, r in enumerate(self.jobs)]}

    def fio_sections(self) -> dict[str, Any]:
        """fio's per-op sections: read, write, trim, sync (flushes)."""
        return {name: self.ops[name].fio(self.seconds) if name in self.ops else
                OpStats().fio(self.seconds) for name in OP_KINDS}


def job_dict(i: int, r: WorkerResult, seconds: float) -> dict[str, Any]:
    """One job as fio's "jobs" entry: jobname, error, elapsed, the per-op sections."""
    ops = r.ops if isinstance(r, JobResult) else {}
    own = r.elapsed_ns / 1e9 or seconds
    return {"jobname": f"job{i}", "error": r.rc, "elapsed": round(own),
            "job_runtime": round(own * 1000),
            **{name: ops.get(name, OpStats()).fio(own) for name in OP_KINDS}}


def check_sizes(ns: Namespace, w: Workload) -> None:
    """bs, or every size of bssplit: a multiple of the LBA size within one command's transfer;
    the split's percents summing to 100."""
    opt = "--bssplit" if w.bssplit else "--bs"
    if w.bssplit is not None and not 1 <= len(w.bssplit) <= MAX_BSSPLIT:
        raise ValueError(f"--bssplit: give 1 to {MAX_BSSPLIT} sizes")
    for size, pct in w.sizes():
        if size <= 0 or size % ns.lba_size:
            raise ValueError(f"{opt} {size} is not a multiple of the {ns.lba_size}-byte block "
                             f"of namespace {ns.nsid}")
        if size > ns.ctrl.max_transfer:
            raise ValueError(f"{opt} {size} exceeds the largest transfer of one command "
                             f"({ns.ctrl.max_transfer} B: the controller's MDTS, at most "
                             "4 MiB)")
        if not 0 <= pct <= 100:
            raise ValueError(f"--bssplit {size}/{pct}: {pct} is not a percentage")
    if w.bssplit and sum(p for _, p in w.bssplit) != 100:
        raise ValueError(f"--bssplit percentages add up to {sum(p for _, p in w.bssplit)}, "
                         "not 100")


def check_mix(w: Workload) -> None:
    """Trim/flush shares, the IOPS cap, and what verify cannot check."""
    for name, pct in (("--trim_pct", w.trim_pct), ("--flush_pct", w.flush_pct)):
        if not 0 <= pct <= 100:
            raise ValueError(f"{name} {pct} is not a percentage")
    if w.trims() + w.flush_pct > 100:
        raise ValueError(f"--trim_pct {w.trims()} + --flush_pct {w.flush_pct} exceed 100")
    if w.rate_iops < 0:
        raise ValueError(f"--rate_iops {w.rate_iops}: give a positive cap (0 = none)")
    if w.spin_only and w.wait != "poll":
        raise ValueError(f"--spin-only is for --wait poll; --wait {w.wait} sleeps on the "
                         "queue's interrupt by design (drop one of them)")
    if w.verify and (w.bssplit or w.trims()):
        raise ValueError("--verify checks fixed-size blocks of written data: not with "
                         "--bssplit or trims (drop --verify or them)")


def check_data_only(ns: Namespace) -> None:
    """The C worker moves data only (no MPTR, no PRINFO): refuse a namespace whose blocks carry
    metadata (NVM Command Set 1.0 §5.2), whose transfers it would size wrongly."""
    if not ns.ms:
        return
    layout = "extended LBAs" if ns.extended else "a separate metadata buffer"
    raise ValueError(f"namespace {ns.nsid} carries {ns.ms} bytes of metadata per block "
                     f"({layout}); the I/O worker moves data only: use a namespace without "
                     "metadata, or reformat this one to an LBA format without it "
                     f"(`iommu-dma format {ns.ctrl.bdf} -n {ns.nsid} --lbaf N`)")


def check_workload(ns: Namespace, w: Workload) -> tuple[int, int, int]:
    """Validate w against ns; (block_lbas, lba_start, lba_count) of the job's LBA range
    (block_lbas: the largest I/O, which sizes each slot's buffer)."""
    if w.rw not in RW_MODES:
        raise ValueError(f"--rw {w.rw!r}: choose one of {', '.join(RW_MODES)}")
    check_mode(w.wait, None)
    check_data_only(ns)
    check_sizes(ns, w)
    check_mix(w)
    if w.offset < 0 or w.size < 0 or w.offset % ns.lba_size or w.size % ns.lba_size:
        raise ValueError(f"--offset/--size must be multiples of {ns.lba_size} bytes")
    if w.rwmixread is not None and not 0 <= w.rwmixread <= 100:
        raise ValueError(f"--rwmixread {w.rwmixread} is not a percentage")
    if w.iodepth < 1 or w.numjobs < 1:
        raise ValueError("--iodepth and --numjobs must be at least 1")
    depth = max_iodepth(ns)
    if w.iodepth > depth:
        raise ValueError(f"--iodepth {w.iodepth} is more than the controller's queues allow: "
                         f"at most {depth} (CAP.MQES: {depth + 1} entries per queue, one kept "
                         "empty)")
    if not math.isfinite(w.runtime) or not 0 <= w.runtime <= MAX_RUNTIME:
        raise ValueError(f"--runtime {w.runtime}: give a finite number of seconds, at most "
                         f"{MAX_RUNTIME:g} (a week)")
    if w.runtime <= 0 and w.ios <= 0:
        raise ValueError("give a --runtime or a number of I/Os")
    start = w.offset // ns.lba_size
    count = (w.size // ns.lba_size) if w.size else ns.blocks - start
    block = w.max_bs() // ns.lba_size
    if start >= ns.blocks or start + count > ns.blocks or count < block:
        raise ValueError(f"--offset {w.offset} --size {w.size} do not fit namespace {ns.nsid}, "
                         f"whose size is {ns.capacity} bytes (the region must hold one I/O of "
                         f"{w.max_bs()} bytes)")
    if w.verify and count // block < w.numjobs:
        raise ValueError(f"--verify --numjobs {w.numjobs}: each job verifies its own part of "
                         f"the range, and {count // block} block(s) of {w.bs} bytes do not "
                         "make one per job")
    return block, start, count


def job_ranges(w: Workload, block: int, start: int, count: int) -> list[tuple[int, int]]:
    """(lba_start, lba_count) of each job. With verify, each job gets its own slice of the
    range (whole blocks): a job checks what it wrote itself, and another job writing the same
    blocks with its own pattern (seed), or a write there failing, would make that unknown.
    Without verify, every job covers the whole range."""
    if not w.verify or w.numjobs == 1:
        return [(start, count)] * w.numjobs
    per = count // block // w.numjobs * block
    return [(start + i * per, per) for i in range(w.numjobs)]


def max_iodepth(ns: Namespace) -> int:
    """The deepest --iodepth one I/O queue of ns's controller takes: CAP.MQES entries, one of
    which a full queue keeps empty."""
    return int(ns.ctrl.cap.mqes) - 1


class PerfRun:
    """Jobs started on ns; progress() is readable while they run; wait() gives the result."""

    def __init__(self, ns: Namespace, w: Workload) -> None:
        block, start, count = check_workload(ns, w)
        ctrl = ns.ctrl
        if w.numjobs > ctrl.max_io_queues - len(ctrl.io_queues):
            raise IommuDmaError(f"--numjobs {w.numjobs}: the controller has only "
                                f"{ctrl.max_io_queues - len(ctrl.io_queues)} free I/O queues")
        self.ns, self.w = ns, w
        # poll: the plain call (what a polled queue always was, stand-ins of ctrl included)
        wait: dict[str, Any] = {"wait": w.wait} if w.wait != "poll" else {}
        self.queues = []
        try:
            for _ in range(w.numjobs):
                self.queues.append(ctrl.create_io_queue(depth=w.iodepth + 1, **wait))
        except BaseException:
            for q in self.queues:                   # e.g. no MSI-X vectors: undo, then say so
                with contextlib.suppress(Exception):     # the first error is the news
                    ctrl.delete_io_queue(q.qid)
            raise
        self.buffers = [ctrl.alloc(w.iodepth * w.max_bs()) for _ in range(w.numjobs)]
        self.progress = [new_progress() for _ in range(w.numjobs)]
        self.results: list[WorkerResult | None] = [None] * w.numjobs
        self.failures: list[BaseException | None] = [None] * w.numjobs
        self.threads = [threading.Thread(target=self._job, args=(i, block, *part),
                                         daemon=True)
                        for i, part in enumerate(job_ranges(w, block, start, count))]
        self.started = time.monotonic()
        for t in self.threads:
            t.start()

    def _job(self, i: int, block: int, start: int, count: int) -> None:
        w = self.w
        irq = self.queues[i].irq                # None on a polled queue
        cfg = WorkerConfig(nsid=self.ns.nsid, lba_size=self.ns.lba_size, lba_count=count,
                           buf_addr=self.buffers[i].addr, lba_start=start, block_lbas=block,
                           qd=w.iodepth, read_pct=w.read_pct(), random=RW_MODES[w.rw][0],
                           verify=w.verify, duration=w.runtime, io_count=w.ios,
                           seed=w.seed + i,
                           # the worker sleeps on the queue's own eventfd, which stays open
                           # while it runs (closing the queue waits for the worker first)
                           irq_fd=irq.fd if irq is not None else -1, spin_only=w.spin_only,
                           idle_spin=irq.spin if irq is not None else 0.0)
        try:
            self.results[i] = run_worker(self.queues[i].qpair, cfg, self.progress[i],
                                         w.mix(self.ns.lba_size))
        except BaseException as e:              # re-raised by wait(), not printed by threading
            self.failures[i] = e

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def snapshot(self) -> tuple[int, int]:
        """(I/Os, bytes) completed so far by every job."""
        return (sum(int(p.ios) for p in self.progress), sum(int(p.bytes) for p in self.progress))

    def stop(self) -> None:
        for p in self.progress:
            p.stop = 1

    def wait(self, tick: Callable[[Any], None] | None = None,
             interval: float = 1.0) -> PerfResult:
        try:
            while self.running():
                next(t for t in self.threads if t.is_alive()).join(interval)
                if tick is not None and self.running():
                    tick(self)
        except KeyboardInterrupt:
            self.stop()
            for t in self.threads:
                t.join()
        finally:
            self._release()
        failed = next((e for e in self.failures if e is not None), None)
        if failed is not None:
            self.ns.ctrl.check_open()       # a controller that failed (e.g. removed) says why
            raise failed
        return combine([r for r in self.results if r is not None])

    def _release(self) -> None:
        if any(t.is_alive() for t in self.threads):
            return                                  # never free memory a job still uses
        for q in self.queues:
            try:
                self.ns.ctrl.delete_io_queue(q.qid)
            except ClosedError:                     # the controller is gone: so are its queues
                break
        for b in self.buffers:
            b.free()


def _first_error(r: WorkerResult) -> NvmeError:
    return NvmeError(r.first_error_status,
                     f"opcode {r.first_error_opcode:#04x} LBA {r.first_error_lba}")


def errors_phrase(errors: int, failed: list[FailedIo], unlisted: int,
                  limit: int = PROBLEM_LISTS) -> str:
    """"N I/O error(s): <failed I/O>; ...", naming up to limit of the listed failed I/Os."""
    named = "; ".join(str(f) for f in failed[:limit])
    more = []
    if len(failed) > limit:
        more.append(f"{len(failed) - limit} more listed in failed_ios")
    if unlisted:
        more.append(f"{unlisted} more not listed")
    tail = f" (and {', '.join(more)})" if more else ""
    return f"{errors} I/O error(s): {named}{tail}"


def problems(results: list[WorkerResult]) -> list[str]:
    """Why the combined figures cannot be trusted, one phrase each (empty when clean): a job
    that timed out or failed, I/O errors (each failed I/O listed, by LBA), verify failures."""
    out = []
    for i, r in enumerate(results):
        job = f"job {i}" if len(results) > 1 else "the I/O worker"
        if r.timed_out or r.rc == ETIMEDOUT:
            out.append(f"{job} timed out waiting for a completion after {r.ios} I/Os (the "
                       "controller stopped answering; unbind and bind it to reset it)")
        elif r.rc != 0:
            out.append(f"{job} stopped with an error after {r.ios} I/Os: {QueueError(r.rc)}")
    errors = sum(r.errors for r in results)
    failed, unlisted = merge_failed(results)
    if errors and failed:
        out.append(errors_phrase(errors, failed, unlisted))
    elif errors:                                # the workers listed none
        first = next(r for r in results if r.errors)
        out.append(f"{errors} I/O error(s), the first: {_first_error(first)}")
    failures = sum(r.verify_failures for r in results)
    if failures:
        first = next(r for r in results if r.verify_failures)
        out.append(f"{failures} verify failure(s): data read back differs from what was "
                   f"written (first at LBA {first.first_verify_lba})")
    return out


def combine(results: list[WorkerResult]) -> PerfResult:
    """The jobs' results as one. Raises when no I/O finished at all (nothing to report);
    otherwise the result's `problems` say what went wrong (timeouts, worker failures, I/O
    errors, verify failures), and `ok` is False."""
    if not results:
        raise IommuDmaError("no job finished")
    found = problems(results)
    failed, unlisted = merge_failed(results)
    ios = sum(r.ios for r in results)
    if ios == 0:
        first_error = next((r for r in results if r.errors), None)
        if first_error is not None:
            raise _first_error(first_error)
        if found:
            raise IommuDmaError(f"no I/O completed: {'; '.join(found)}")
    hist = ffi.new("uint64_t[]", lib.IDMA_HIST_BUCKETS)
    for r in results:
        for low, n in r.hist.items():
            hist[lib.idma_hist_bucket(low)] += n
    lat_max = max(r.lat_max_ns for r in results)
    avg = sum(r.lat_avg_ns * r.ios for r in results) / ios if ios else 0.0
    return PerfResult(
        ios=ios, bytes=sum(r.bytes for r in results),
        seconds=max(r.elapsed_ns for r in results) / 1e9,
        errors=sum(r.errors for r in results),
        verify_failures=sum(r.verify_failures for r in results), lat_avg_ns=avg,
        lat_p50_ns=int(lib.idma_hist_percentile(hist, 50.0, lat_max)),
        lat_p99_ns=int(lib.idma_hist_percentile(hist, 99.0, lat_max)),
        lat_p999_ns=int(lib.idma_hist_percentile(hist, 99.9, lat_max)),
        lat_max_ns=lat_max, jobs=results,
        timed_out=any(r.timed_out or r.rc == ETIMEDOUT for r in results), problems=found,
        failed_ios=failed, failed_ios_not_listed=unlisted,
        verify_skipped=sum(r.verify_skipped for r in results if isinstance(r, JobResult)),
        **depth_figures(results))


def depth_figures(results: list[WorkerResult]) -> dict[str, Any]:
    """ops, bs_ios and series of the jobs combined (only JobResults carry them)."""
    jobs = [r for r in results if isinstance(r, JobResult)]
    bs: dict[int, int] = {}
    for r in jobs:
        for size, n in r.bs_ios.items():
            bs[size] = bs.get(size, 0) + n
    seconds = max((r.elapsed_ns for r in results), default=0) / 1e9
    return {"ops": {name: merge_ops([r.ops[name] for r in jobs if name in r.ops])
                    for name in OP_KINDS},
            "bs_ios": bs, "series": merge_series([r.series for r in jobs], seconds)}


def run(ns: Namespace, w: Workload,
        tick: Callable[[PerfRun], None] | None = None) -> PerfResult:
    """Run workload w on ns and return the combined result (tick is called about once a
    second with the running PerfRun, e.g. to print a live IOPS line)."""
    return PerfRun(ns, w).wait(tick)


@dataclass
class MultiResult:
    """A workload run on several namespaces at once: each one's result (by NSID) and all of
    them combined (every job of every namespace)."""

    namespaces: dict[int, PerfResult]
    combined: PerfResult

    @property
    def problems(self) -> list[str]:
        return [f"namespace {n}: {p}" for n, r in self.namespaces.items() for p in r.problems]


class PerfGroup:
    """PerfRuns of one workload on several namespaces, started together; progress() and wait()
    like a PerfRun's."""

    def __init__(self, namespaces: list[Namespace], w: Workload) -> None:
        if not namespaces or len({ns.nsid for ns in namespaces}) != len(namespaces):
            raise ValueError("give one or more distinct namespaces")
        for ns in namespaces:                   # every error before any job starts
            check_workload(ns, w)
        self.runs: list[PerfRun] = []
        try:
            for ns in namespaces:
                self.runs.append(PerfRun(ns, w))
        except BaseException:
            self.stop()
            for r in self.runs:
                with contextlib.suppress(Exception):
                    r.wait()
            raise
        self.started = self.runs[0].started

    def running(self) -> bool:
        return any(r.running() for r in self.runs)

    def snapshot(self) -> tuple[int, int]:
        snaps = [r.snapshot() for r in self.runs]
        return sum(s[0] for s in snaps), sum(s[1] for s in snaps)

    def stop(self) -> None:
        for r in self.runs:
            r.stop()

    def wait(self, tick: Callable[[Any], None] | None = None,
             interval: float = 1.0) -> MultiResult:
        try:
            while self.running():
                alive = next(t for r in self.runs for t in r.threads if t.is_alive())
                alive.join(interval)
                if tick is not None and self.running():
                    tick(self)
        except KeyboardInterrupt:
            self.stop()
        per = {r.ns.nsid: r.wait() for r in self.runs}
        jobs = [j for res in per.values() for j in res.jobs]
        return MultiResult(namespaces=per, combined=combine(jobs))


def run_many(namespaces: list[Namespace], w: Workload,
             tick: Callable[[Any], None] | None = None) -> MultiResult:
    """Run workload w on every namespace at once (numjobs jobs, i.e. queue pairs, each) and
    return each namespace's result and all combined."""
    return PerfGroup(namespaces, w).wait(tick)
