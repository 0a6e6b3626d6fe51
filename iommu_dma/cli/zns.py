"""Zoned Namespaces: `iommu-dma zns report-zones|open-zone|close-zone|finish-zone|reset-zone|
zone-append|id-ns|id-ctrl` (nvme-cli's `nvme zns` names, options and JSON keys)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iommu_dma.cli import output
from iommu_dma.cli.common import (
    CliError,
    add_nsid,
    add_output_format,
    controller,
    int_range,
    nonnegative,
    positive,
    set_handler,
)
from iommu_dma.nvme import zns

if TYPE_CHECKING:
    from iommu_dma.nvme.zns import Zone, ZonedNamespace

# nvme-cli's names of the zone types (libnvme nvme_zone_type_to_string)
ZONE_TYPES = {zns.ZONE_TYPE_SEQ_WRITE_REQUIRED: "SEQWRITE_REQ"}


@contextmanager
def _zoned(args: argparse.Namespace) -> Iterator[ZonedNamespace]:
    with controller(args.bdf) as ctrl:
        yield zns.ZonedNamespace.of(ctrl, args.nsid)


def zone_json(z: Zone) -> dict[str, Any]:
    """One zone as nvme-cli 2.3's report-zones JSON has it."""
    state = z.state
    return {"slba": z.zslba, "wp": z.wp, "cap": z.zcap,
            "state": state.label if isinstance(state, zns.ZoneState) else "Unknown State",
            "type": ZONE_TYPES.get(z.zt, "Unknown"), "attrs": z.za}


def zone_line(z: Zone) -> str:
    """nvme-cli's normal report line (State: the raw byte, ZS in its upper nibble)."""
    c = output.c_hex
    return (f"SLBA: {c(z.zslba):<10} WP: {c(z.wp):<10} Cap: {c(z.zcap):<9} State: "
            f"{c(z.zs << 4):<4} Type: {c(z.zt):<4} Attrs: {c(z.za):<4} AttrsInfo: {z.zai}")


def cmd_report_zones(args: argparse.Namespace) -> int:
    with _zoned(args) as zns_ns:
        if args.start_lba >= zns_ns.ns.blocks:
            raise CliError(f"--start-lba {args.start_lba} is past the end of namespace "
                           f"{args.nsid} (LBAs 0..{zns_ns.ns.blocks - 1})")
        # nr_zones as nvme-cli 2.3 prints it: the zones of the state from LBA 0 on (not from
        # --start-lba; seen on the bench)
        total = zns_ns.count_zones(0, args.state)
        zones = zns_ns.report_zones(args.start_lba, args.descs or None, state=args.state) \
            if total else []
    if args.output_format == "json":
        output.emit_json({"nr_zones": total, "zone_list": [zone_json(z) for z in zones]})
    else:
        output.print_lines([f"nr_zones: {total}", *map(zone_line, zones)])
    return 0


def _zone_action(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        if not args.select_all and args.start_lba is None:
            raise CliError(f"{action}-zone: give the zone's start LBA (-s ZSLBA) or -a "
                           "(--select-all) for every zone")
        with _zoned(args) as zns_ns:
            getattr(zns_ns, action)(None if args.select_all else args.start_lba,
                                    select_all=args.select_all)
        target = "all zones" if args.select_all else f"zone at ZSLBA {args.start_lba:#x}"
        print(f"zns-{action}-zone: Success, action:{action} {target} namespace:{args.nsid}")
        return 0
    return run


def cmd_zone_append(args: argparse.Namespace) -> int:
    data = Path(args.data).read_bytes()
    with _zoned(args) as zns_ns:
        if not data:
            raise CliError(f"{args.data}: the file is empty; no data")
        size = args.data_size or len(data)
        blocks = -(-size // zns_ns.lba_size)
        payload = data[:size].ljust(blocks * zns_ns.lba_size, b"\0")
        lba = zns_ns.append(args.zslba, payload)
    if args.output_format == "json":
        output.emit_json({"zslba": args.zslba, "result_lba": lba, "blocks": blocks})
    else:
        print(f"Success appended data to LBA {lba:x}")
    return 0


def cmd_id_ns(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        idn = ctrl.identify_namespace(args.nsid)
        ident = zns.identify_zns_namespace(ctrl, args.nsid)
    if args.output_format == "json":
        output.emit_json(ident.to_dict())
        return 0
    d = ident.to_dict()
    lines = ["ZNS Command Set Identify Namespace:"]
    pairs = [(k, output.c_hex(v) if isinstance(v, int) else str(v))
             for k, v in d.items() if k != "lbafe"]
    lines += output.field_lines(pairs, width=8)
    for i, e in enumerate(ident.lbafe):
        used = " (in use)" if i == idn.format_index else ""
        lines.append(f"lbafe {i:2}: zsze:{output.c_hex(e.zsze)} zdes:{e.zdes}{used}")
    output.print_lines(lines)
    return 0


def cmd_id_ctrl(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        ident = zns.identify_zns_controller(ctrl)
    if args.output_format == "json":
        output.emit_json(ident.to_dict())
    else:
        output.print_lines(["NVMe ZNS Identify Controller:", f"zasl    : {ident.zasl}"])
    return 0


def _sub(zsub: Any, common: argparse.ArgumentParser, name: str, what: str, func: Any,
         nsid: bool = True) -> argparse.ArgumentParser:
    p = zsub.add_parser(name, parents=[common], help=what, description=what)
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    if nsid:
        add_nsid(p)
    add_output_format(p)
    set_handler(p, func)
    return p


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    top = sub.add_parser("zns", parents=[common], help="Zoned Namespace commands (nvme zns)",
                         description="Zoned Namespace Command Set commands, named as nvme-cli's "
                                     "`nvme zns`.")
    zsub = top.add_subparsers(dest="zns_command", metavar="ZNS-COMMAND", required=True)
    p = _sub(zsub, common, "report-zones", "Report zones (Zone Management Receive)",
             cmd_report_zones)
    p.add_argument("-s", "--start-lba", type=nonnegative, default=0,
                   help="first LBA: report from the zone holding it (default 0)")
    p.add_argument("-d", "--descs", type=nonnegative, default=0,
                   help="number of zone descriptors to report (default: all of them)")
    p.add_argument("-S", "--state", type=int_range(0, 7, "a reporting option (ZRASF)"),
                   default=0, help="zones to list: 0 all, 1 empty, 2 implicitly opened, 3 "
                   "explicitly opened, 4 closed, 5 full, 6 read only, 7 offline")
    for action, what in (("open", "Open a zone (explicitly opened)"),
                         ("close", "Close an open zone"),
                         ("finish", "Finish a zone (it becomes Full)"),
                         ("reset", "Reset a zone (Empty, write pointer at its start)")):
        p = _sub(zsub, common, f"{action}-zone", f"{what} (Zone Management Send)",
                 _zone_action(action))
        p.add_argument("-s", "--start-lba", type=nonnegative, default=None,
                       help="the zone's start LBA (ZSLBA)")
        p.add_argument("-a", "--select-all", action="store_true",
                       help="every zone the action applies to (Select All)")
    p = _sub(zsub, common, "zone-append", "Append data to a zone; prints the LBA written",
             cmd_zone_append)
    p.add_argument("-s", "--zslba", type=nonnegative, required=True,
                   help="the zone's start LBA")
    p.add_argument("-d", "--data", metavar="FILE", required=True,
                   help="data to append (its last block zero-padded)")
    p.add_argument("-z", "--data-size", type=positive, default=None,
                   help="bytes of FILE to append (default: all of it)")
    _sub(zsub, common, "id-ns", "Identify Namespace, Zoned Command Set specific (CNS 05h)",
         cmd_id_ns)
    _sub(zsub, common, "id-ctrl", "Identify Controller, Zoned Command Set specific (CNS 06h)",
         cmd_id_ctrl, nsid=False)
