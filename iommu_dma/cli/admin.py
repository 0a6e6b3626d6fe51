"""Admin commands: id-ctrl, id-ns, smart-log, error-log, get-feature, format."""

from __future__ import annotations

import argparse
from typing import Any

from iommu_dma.cli import nvme_json, output
from iommu_dma.cli.common import (
    CliError,
    add_nsid,
    add_output_format,
    any_nsid_type,
    confirm,
    controller,
    int_range,
    nonnegative,
    seconds,
    set_handler,
)
from iommu_dma.nvme.namespace import InactiveNamespaceError


def _json(args: argparse.Namespace) -> bool:
    return bool(args.output_format == "json")


def cmd_id_ctrl(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        idc = ctrl.identify
    if _json(args):
        # nvme-cli's keys and values, sn, mn and fr with their space padding as nvme-cli's
        output.emit_json(nvme_json.id_ctrl(idc))
    else:
        output.print_lines(output.id_ctrl_lines(idc))
    return 0


def cmd_id_ns(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        idn = ctrl.identify_namespace(args.nsid)
        if not idn.active:
            active = ", ".join(map(str, ctrl.active_namespaces())) or "none"
            raise InactiveNamespaceError(f"{ctrl.bdf}: namespace {args.nsid} is not active; "
                                         f"active NSIDs: {active}")
    if _json(args):
        # nvme-cli's keys and values, plus nsid and lba_size (nvme_json.EXTRA_ID_NS)
        output.emit_json({"nsid": args.nsid, **nvme_json.id_ns(idn),
                          "lba_size": idn.lba_size})
    else:
        output.print_lines(output.id_ns_lines(idn, args.nsid))
    return 0


def cmd_smart_log(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        log = ctrl.smart_log()
        bdf = ctrl.bdf
    if _json(args):
        output.emit_json(output.smart_dict(log))
    else:
        output.print_lines(output.smart_lines(log, bdf))
    return 0


def cmd_error_log(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        entries = ctrl.error_log(args.log_entries or None)
        bdf = ctrl.bdf
    if _json(args):
        output.emit_json({"errors": [e.to_dict() for e in entries]})
    else:
        output.print_lines(output.error_log_lines(entries, bdf))
    return 0


def cmd_get_feature(args: argparse.Namespace) -> int:
    if args.sel not in output.SELECT_NAMES:
        raise CliError(f"--sel {args.sel}: choose 0 (current), 1 (default), 2 (saved) or "
                       "3 (supported capabilities)")
    with controller(args.bdf) as ctrl:
        value = ctrl.get_features(args.feature_id, nsid=args.nsid or 0, sel=args.sel,
                                  cdw11=args.cdw11)
    if _json(args):
        output.emit_json({"feature_id": args.feature_id, "name": output.feature_name(
            args.feature_id), "sel": args.sel, "nsid": args.nsid or 0, "value": value})
    else:
        output.print_lines([output.feature_line(args.feature_id, args.sel, value)])
    return 0


def cmd_format(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        ns = ctrl.namespace(args.nsid)               # InactiveNamespaceError when inactive
        nlbaf = ns.identify.nlbaf
        if args.lbaf > nlbaf:
            raise CliError(f"--lbaf {args.lbaf}: namespace {args.nsid} has LBA formats "
                           f"0..{nlbaf}")
        confirm(f"Format namespace {args.nsid} of {ctrl.bdf} ({output.human_bytes(ns.capacity)})"
                f" with LBA format {args.lbaf}? Every block on it will be lost.", args.force,
                f"refusing to format namespace {args.nsid} of {ctrl.bdf}")
        ctrl.format_nvm(args.nsid, args.lbaf, ses=args.ses, timeout=args.timeout)
        idn = ctrl.identify_namespace(args.nsid)
    if _json(args):
        output.emit_json({"nsid": args.nsid, "lbaf": args.lbaf, "lba_size": idn.lba_size,
                          "nsze": idn.nsze})
    else:
        print(f"Success formatting namespace:{args.nsid} (LBA format {idn.format_index}: "
              f"{idn.nsze} blocks of {idn.lba_size} bytes)")
    return 0


def _parser(sub: Any, common: argparse.ArgumentParser, name: str, what: str,
            func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=what, description=what)
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    add_output_format(p)
    set_handler(p, func)
    return p


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    _parser(sub, common, "id-ctrl", "Identify Controller", cmd_id_ctrl)
    add_nsid(_parser(sub, common, "id-ns", "Identify Namespace", cmd_id_ns))
    _parser(sub, common, "smart-log", "SMART / Health Information log page", cmd_smart_log)
    p = _parser(sub, common, "error-log", "Error Information log page", cmd_error_log)
    p.add_argument("-e", "--log-entries", type=nonnegative, default=0,
                   help="entries to fetch (default: all the controller keeps, ELPE+1)")
    p = _parser(sub, common, "get-feature", "Get Features", cmd_get_feature)
    p.add_argument("-f", "--feature-id", type=int_range(0, 0xFF, "a feature ID"), required=True,
                   help="feature identifier, e.g. 7 or 0x07 (Number of Queues)")
    p.add_argument("-n", "--namespace-id", dest="nsid", type=any_nsid_type, default=0,
                   help="namespace ID (namespace-specific features)")
    p.add_argument("-s", "--sel", type=nonnegative, default=0,
                   help="0 current, 1 default, 2 saved, 3 supported capabilities")
    p.add_argument("--cdw11", type=int_range(0, 0xFFFF_FFFF, "a 32-bit dword"), default=0,
                   help="command dword 11")
    p = _parser(sub, common, "format", "Format NVM (destroys the namespace's data)", cmd_format)
    add_nsid(p)
    p.add_argument("-l", "--lbaf", type=nonnegative, required=True,
                   help="LBA format index (see id-ns)")
    p.add_argument("--ses", type=nonnegative, default=0, choices=(0, 1, 2),
                   help="secure erase: 0 none, 1 user data, 2 cryptographic")
    p.add_argument("--timeout", type=seconds(), default=120.0,
                   help="seconds to wait for the Format to complete (default 120; more than 0: "
                        "a Format is never abandoned)")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
