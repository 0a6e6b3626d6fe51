"""Human (nvme-cli-like) and JSON printing of parsed NVMe structures."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from iommu_dma.cli import nvme_json
from iommu_dma.nvme.identify import (
    ErrorLogEntry,
    IdentifyController,
    IdentifyNamespace,
    PowerState,
    SmartLog,
)
from iommu_dma.nvme.status import status_name

# Identify Controller fields nvme-cli prints in hex (%#x); the others are decimal or text.
CTRL_HEX = {"vid", "ssvid", "ieee", "cmic", "cntlid", "ver", "oaes", "ctratt", "cntrltype",
            "oacs", "frmw", "lpa", "avscc", "apsta", "sanicap", "anacap", "sqes", "cqes", "oncs",
            "fuses", "fna", "vwc", "icsvscc", "nwpc", "ocfs", "sgls", "fcatt", "ofcs"}
NS_HEX = {"nsze", "ncap", "nuse", "nsfeat", "flbas", "mc", "dpc", "dps", "nmic", "rescap", "fpi",
          "dlfeat", "nsattr"}
DATA_UNIT = 512 * 1000          # a SMART data unit: 1000 blocks of 512 bytes
FEATURE_NAMES = {
    0x01: "Arbitration", 0x02: "Power Management", 0x03: "LBA Range Type",
    0x04: "Temperature Threshold", 0x05: "Error Recovery", 0x06: "Volatile Write Cache",
    0x07: "Number of Queues", 0x08: "Interrupt Coalescing",
    0x09: "Interrupt Vector Configuration", 0x0A: "Write Atomicity Normal",
    0x0B: "Asynchronous Event Configuration", 0x0C: "Autonomous Power State Transition",
    0x0D: "Host Memory Buffer", 0x0E: "Timestamp", 0x0F: "Keep Alive Timer",
    0x10: "Host Controlled Thermal Management", 0x11: "Non-Operational Power State Config",
    0x80: "Software Progress Marker", 0x81: "Host Identifier",
    0x82: "Reservation Notification Mask", 0x83: "Reservation Persistence",
}
SELECT_NAMES = {0: "Current", 1: "Default", 2: "Saved", 3: "Supported capabilities"}


def c_hex(value: int) -> str:
    """printf's %#x: 0x1b36, but plain 0 for zero."""
    return f"{value:#x}" if value else "0"


def human_bytes(n: int) -> str:
    """1.07 GB / 64.00 MiB style: binary units, two decimals."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"


def emit_json(data: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def field_lines(pairs: Iterable[tuple[str, str]], width: int = 10) -> list[str]:
    return [f"{name:<{width}}: {value}" for name, value in pairs]


# ---- Identify -----------------------------------------------------------------------------

def id_ctrl_lines(idc: IdentifyController) -> list[str]:
    pairs = []
    for name, value in idc.to_dict().items():
        if name == "psds":
            continue
        if isinstance(value, str):
            shown = value
        elif name in CTRL_HEX:
            shown = f"{value:x}" if name == "ieee" else c_hex(value)
        else:
            shown = str(value)
        pairs.append((name, shown))
    lines = ["NVME Identify Controller:", *field_lines(pairs)]
    lines += [psd_line(i, p) for i, p in enumerate(idc.psds)]
    return lines


def psd_line(index: int, p: PowerState) -> str:
    """One power state, the fields of nvme-cli's "ps N :" lines (raw units)."""
    return (f"ps {index:4d} : mp:{p.max_power} flags:{c_hex(p.flags)} enlat:{p.entry_lat} "
            f"exlat:{p.exit_lat} rrt:{p.read_tput} rrl:{p.read_lat} rwt:{p.write_tput} "
            f"rwl:{p.write_lat} idlp:{p.idle_power} ips:{p.idle_scale} actp:{p.active_power} "
            f"apw:{p.active_power_work} aps:{p.active_scale}")


def lbaf_line(index: int, ms: int, lbads: int, rp: int, in_use: bool) -> str:
    line = f"lbaf {index:2d} : ms:{ms:<3d} lbads:{lbads:<2d} rp:{c_hex(rp)}"
    return line + " (in use)" if in_use else line


def id_ns_lines(idn: IdentifyNamespace, nsid: int) -> list[str]:
    pairs = []
    for name, value in idn.to_dict().items():
        if name in ("lbaf", "lba_size"):
            continue
        shown = c_hex(value) if name in NS_HEX else str(value)
        pairs.append((name, shown))
    lines = [f"NVME Identify Namespace {nsid}:", *field_lines(pairs, 8)]
    lines += [lbaf_line(i, f.ms, f.lbads, f.rp, i == idn.format_index)
              for i, f in enumerate(idn.lbaf)]
    return lines


# ---- logs -----------------------------------------------------------------------------------

def celsius(kelvin: int) -> int:
    return kelvin - 273


def smart_dict(log: SmartLog) -> dict[str, Any]:
    """nvme-cli's JSON of the log, plus temperature_celsius (nvme_json.EXTRA_SMART)."""
    d = nvme_json.smart_log(log)
    d["temperature_celsius"] = celsius(log.temperature)
    return d


def smart_lines(log: SmartLog, bdf: str) -> list[str]:
    def temp(k: int) -> str:
        return f"{celsius(k)} °C ({k} K)"

    def units(n: int) -> str:
        return f"{n:,} ({human_bytes(n * DATA_UNIT)})"

    pairs = [
        ("critical_warning", c_hex(log.critical_warning)),
        ("temperature", temp(log.temperature)),
        ("available_spare", f"{log.avail_spare}%"),
        ("available_spare_threshold", f"{log.spare_thresh}%"),
        ("percentage_used", f"{log.percent_used}%"),
        ("endurance_group_critical_warning_summary",
         c_hex(log.endurance_grp_critical_warning_summary)),
        ("data_units_read", units(log.data_units_read)),
        ("data_units_written", units(log.data_units_written)),
        ("host_read_commands", f"{log.host_read_commands:,}"),
        ("host_write_commands", f"{log.host_write_commands:,}"),
        ("controller_busy_time", f"{log.controller_busy_time:,}"),
        ("power_cycles", f"{log.power_cycles:,}"),
        ("power_on_hours", f"{log.power_on_hours:,}"),
        ("unsafe_shutdowns", f"{log.unsafe_shutdowns:,}"),
        ("media_errors", f"{log.media_errors:,}"),
        ("num_err_log_entries", f"{log.num_err_log_entries:,}"),
        ("warning_temp_time", str(log.warning_temp_time)),
        ("critical_comp_time", str(log.critical_comp_time)),
    ]
    pairs += [(f"temperature_sensor_{i}", temp(t))
              for i, t in enumerate(log.temp_sensor, start=1) if t]
    pairs += [(k, str(getattr(log, k))) for k in ("thm_temp1_trans_count",
              "thm_temp2_trans_count", "thm_temp1_total_time", "thm_temp2_total_time")]
    return [f"Smart Log for NVME device:{bdf} namespace-id:ffffffff",
            *field_lines(pairs, 40)]


def error_entry_status(entry: ErrorLogEntry) -> str:
    sc, sct = entry.status_field & 0xFF, (entry.status_field >> 8) & 0x7
    return f"{entry.status_field:#x} ({status_name(sct, sc)})"


def error_log_lines(entries: Sequence[ErrorLogEntry], bdf: str) -> list[str]:
    lines = [f"Error Log Entries for device:{bdf} entries:{len(entries)}",
             "................."]
    for i, e in enumerate(entries):
        lines.append(f" Entry[{i:2d}]")
        lines.append(".................")
        lines += field_lines([
            ("error_count", str(e.error_count)), ("sqid", str(e.sqid)),
            ("cmdid", c_hex(e.cmdid)), ("status_field", error_entry_status(e)),
            ("parm_err_loc", c_hex(e.parm_error_location)), ("lba", c_hex(e.lba)),
            ("nsid", c_hex(e.nsid)), ("vs", c_hex(e.vs)), ("trtype", str(e.trtype)),
            ("cs", c_hex(e.cs))], 12)
        lines.append(".................")
    return lines


def feature_name(fid: int) -> str:
    return FEATURE_NAMES.get(fid, "Unknown" if fid < 0xC0 else "Vendor Specific")


def feature_line(fid: int, sel: int, value: int) -> str:
    return (f"get-feature:{fid:#04x} ({feature_name(fid)}), "
            f"{SELECT_NAMES.get(sel, 'Unknown')} value:{value:#010x}")


# ---- tables ---------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, width of the widest cell, two spaces apart."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


PERF_HEADERS = ("IOPS", "MB/s", "lat avg", "p50", "p99", "p99.9", "max (us)")


def perf_lines(result: dict[str, Any]) -> list[str]:
    lat = result["lat_ns"]
    row = [f"{result['iops']:.0f}", f"{result['mb_per_s']:.2f}",
           *(f"{lat[k] / 1000:.1f}" for k in ("avg", "p50", "p99", "p99.9", "max"))]
    return table(PERF_HEADERS, [row])


def print_lines(lines: Iterable[str], out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    for line in lines:
        stream.write(line + "\n")
