"""nvme-cli 2.x JSON (`nvme id-ctrl|id-ns|smart-log -o json`) of the parsed NVMe structures.

Keys, their order and the form of each value follow nvme-cli 2.3 (Debian 12's nvme-cli), as it
printed them for the bench's controller on the kernel nvme driver:

- integers are JSON numbers; 128-bit counters and capacities (tnvmcap, unvmcap, megcap, maxdna,
  nvmcap, the SMART data units, commands, hours ...) are decimal strings;
- sn, mn, fr are the whole field up to the first NUL, space padding kept ("IDMA0001            ");
  subnqn the same, left out when empty;
- eui64, nguid: the bytes in order as lower-case hex, fguid as 8-4-4-4-12 hex;
- psds: NPSS + 1 power state descriptors; lbafs: NLBAF + 1 LBA formats (ms, ds, rp);
- npwg..nows of Identify Namespace only when NSFEAT bit 4 (OPTPERF) is set;
- temperature_sensor_N (kelvin) only for the sensors that report a temperature (non-zero);
- the Vendor Specific areas are not part of nvme-cli's JSON (only its -V human output dumps them).

What we print beyond that is named in the EXTRA_* sets (kept for older users of our JSON),
and the values we print differently in CHANGED_* (see cli.admin).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from iommu_dma.nvme.identify import IdentifyController, IdentifyNamespace, SmartLog

OPTPERF = 0x10                  # NSFEAT bit 4: NPWG, NPWA, NPDG, NPDA and NOWS are defined

# keys ours adds to nvme-cli's, per command
EXTRA_ID_CTRL: frozenset[str] = frozenset()
EXTRA_ID_NS = frozenset({"nsid", "lba_size"})
EXTRA_SMART = frozenset({"temperature_celsius"})
# keys whose value ours prints differently (trimmed of the space padding)
CHANGED_ID_CTRL = frozenset({"sn", "mn", "fr"})

_CTRL_KEYS_1 = ("rab", "ieee", "cmic", "mdts", "cntlid", "ver", "rtd3r", "rtd3e", "oaes",
                "ctratt", "rrls", "cntrltype", "fguid")
_CTRL_KEYS_2 = ("nvmsr", "vwci", "mec", "oacs", "acl", "aerl", "frmw", "lpa", "elpe", "npss",
                "avscc", "apsta", "wctemp", "cctemp", "mtfa", "hmpre", "hmmin", "tnvmcap",
                "unvmcap", "rpmbs", "edstt", "dsto", "fwug", "kas", "hctma", "mntmt", "mxtmt",
                "sanicap", "hmminds", "hmmaxd", "nsetidmax", "endgidmax", "anatt", "anacap",
                "anagrpmax", "nanagrpid", "pels", "domainid", "megcap", "sqes", "cqes", "maxcmd",
                "nn", "oncs", "fuses", "fna", "vwc", "awun", "awupf", "icsvscc", "nwpc", "acwu",
                "ocfs", "sgls", "mnan", "maxdna", "maxcna")
_CTRL_KEYS_3 = ("ioccsz", "iorcsz", "icdoff", "fcatt", "msdbd", "ofcs")
_CTRL_U128 = frozenset({"tnvmcap", "unvmcap", "megcap", "maxdna"})

_NS_KEYS_1 = ("nsze", "ncap", "nuse", "nsfeat", "nlbaf", "flbas", "mc", "dpc", "dps", "nmic",
              "rescap", "fpi", "dlfeat", "nawun", "nawupf", "nacwu", "nabsn", "nabo", "nabspf",
              "noiob", "nvmcap", "nsattr", "nvmsetid")
_NS_OPTPERF = ("npwg", "npwa", "npdg", "npda", "nows")
_NS_KEYS_2 = ("mssrl", "mcl", "msrc", "nulbaf", "anagrpid", "endgid", "eui64", "nguid")

_SMART_KEYS_1 = ("critical_warning", "temperature", "avail_spare", "spare_thresh",
                 "percent_used", "endurance_grp_critical_warning_summary", "data_units_read",
                 "data_units_written", "host_read_commands", "host_write_commands",
                 "controller_busy_time", "power_cycles", "power_on_hours", "unsafe_shutdowns",
                 "media_errors", "num_err_log_entries", "warning_temp_time",
                 "critical_comp_time")
_SMART_U128 = frozenset({"data_units_read", "data_units_written", "host_read_commands",
                         "host_write_commands", "controller_busy_time", "power_cycles",
                         "power_on_hours", "unsafe_shutdowns", "media_errors",
                         "num_err_log_entries"})
_SMART_KEYS_2 = ("thm_temp1_trans_count", "thm_temp2_trans_count", "thm_temp1_total_time",
                 "thm_temp2_total_time")


def _c_string(raw: bytes, offset: int, size: int) -> str:
    """A fixed-size text field as nvme-cli prints it: up to the first NUL, padding kept."""
    return raw[offset:offset + size].split(b"\x00", 1)[0].decode("ascii", "replace")


def id_ctrl(idc: IdentifyController, *, padded_strings: bool = True) -> dict[str, Any]:
    """nvme-cli's JSON of Identify Controller. padded_strings=False: sn, mn, fr trimmed of
    their space padding (our JSON before nvme-cli parity, which our users compare with)."""
    d: dict[str, Any] = {"vid": idc.vid, "ssvid": idc.ssvid}
    if padded_strings:
        d.update(sn=_c_string(idc.raw, 4, 20), mn=_c_string(idc.raw, 24, 40),
                 fr=_c_string(idc.raw, 64, 8))
    else:
        d.update(sn=idc.sn, mn=idc.mn, fr=idc.fr)
    d.update((k, getattr(idc, k)) for k in _CTRL_KEYS_1)
    d.update(crdt1=idc.crdt[0], crdt2=idc.crdt[1], crdt3=idc.crdt[2])
    d.update((k, getattr(idc, k)) for k in _CTRL_KEYS_2)
    if idc.subnqn:
        d["subnqn"] = idc.subnqn
    d.update((k, getattr(idc, k)) for k in _CTRL_KEYS_3)
    for k in _CTRL_U128:
        d[k] = str(d[k])
    d["psds"] = [asdict(p) for p in idc.psds]
    return d


def id_ns(idn: IdentifyNamespace) -> dict[str, Any]:
    """nvme-cli's JSON of Identify Namespace (NLBAF as read; the formats listed bounded to
    64)."""
    d: dict[str, Any] = {k: getattr(idn, k) for k in _NS_KEYS_1}
    d["nlbaf"] = idn.raw[25]
    d["nvmcap"] = str(idn.nvmcap)
    if idn.nsfeat & OPTPERF:
        d.update((k, getattr(idn, k)) for k in _NS_OPTPERF)
    d.update((k, getattr(idn, k)) for k in _NS_KEYS_2)
    # rp as the byte holds it (bits 7:2 reserved), as nvme-cli prints it
    d["lbafs"] = [{"ms": f.ms, "ds": f.lbads, "rp": idn.raw[128 + 4 * i + 3]}
                  for i, f in enumerate(idn.lbaf)]
    return d


def smart_log(log: SmartLog) -> dict[str, Any]:
    """nvme-cli's JSON of the SMART / Health Information log page."""
    d: dict[str, Any] = {k: getattr(log, k) for k in _SMART_KEYS_1}
    for k in _SMART_U128:
        d[k] = str(d[k])
    for i, t in enumerate(log.temp_sensor, start=1):
        if t:
            d[f"temperature_sensor_{i}"] = t
    d.update((k, getattr(log, k)) for k in _SMART_KEYS_2)
    return d
