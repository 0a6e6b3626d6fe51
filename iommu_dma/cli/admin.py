"""Admin commands: id-ctrl, id-ns, smart-log, error-log, get-feature, set-feature, format."""

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
from iommu_dma.nvme.features import (
    FEATURES,
    MAX_FEATURE_DATA,
    Feature,
    decode_fields,
    feature_info,
    feature_name,
    get_feature,
    set_feature,
)
from iommu_dma.nvme.namespace import InactiveNamespaceError
from iommu_dma.nvme.status import NvmeError


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


def _feature_dict(f: Feature, nsid: int) -> dict[str, Any]:
    d: dict[str, Any] = {"feature_id": f.fid, "name": f.name, "sel": f.sel, "nsid": nsid,
                         "value": f.value, "fields": f.fields()}
    if f.data:
        d["data"] = f.data.hex()
    return d


def _feature_lines(f: Feature) -> list[str]:
    lines = [output.feature_line(f.fid, f.sel, f.value)]
    for name, value in f.fields().items():
        if name in ("entries", "ranges") and isinstance(value, list):
            lines += [f"    {name}[{i}]: {e}" for i, e in enumerate(value)]
        else:
            lines.append(f"    {name:<18}: {value}")
    return lines


def cmd_get_feature(args: argparse.Namespace) -> int:
    if args.sel not in output.SELECT_NAMES:
        raise CliError(f"--sel {args.sel}: choose 0 (current), 1 (default), 2 (saved) or "
                       "3 (supported capabilities)")
    fids = [args.feature_id] if args.feature_id is not None else sorted(FEATURES)
    results: list[dict[str, Any]] = []
    lines: list[str] = []
    with controller(args.bdf) as ctrl:
        for fid in fids:
            nsid = args.nsid or (1 if feature_info(fid).ns_specific and args.feature_id is None
                                 else 0)
            try:
                f = get_feature(ctrl, fid, sel=args.sel, nsid=nsid, cdw11=args.cdw11,
                                data_len=args.data_len)
            except NvmeError as e:
                if args.feature_id is not None:
                    raise
                # every feature: one that the device refuses is listed with its status
                results.append({"feature_id": fid, "name": feature_name(fid), "sel": args.sel,
                                "nsid": nsid, "error": e.name, "sct": e.sct, "sc": e.sc})
                lines.append(f"get-feature:{fid:#04x} ({feature_name(fid)}): {e.name} "
                             f"(SCT {e.sct:#x}, SC {e.sc:#04x})")
                continue
            results.append(_feature_dict(f, nsid))
            lines += _feature_lines(f)
    if _json(args):
        output.emit_json(results[0] if args.feature_id is not None else {"features": results})
    else:
        output.print_lines(lines)
    return 0


def _read_data(path: str | None, length: int | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        data = fh.read(MAX_FEATURE_DATA + 1)
    if length is not None:
        data = data[:length].ljust(length, b"\0")
    if len(data) > MAX_FEATURE_DATA:
        raise CliError(f"--data {path}: more than {MAX_FEATURE_DATA} bytes; a feature's data "
                       "buffer is at most that (use --data-len to send a prefix)")
    return data


def cmd_set_feature(args: argparse.Namespace) -> int:
    info = feature_info(args.feature_id)
    data = _read_data(args.data, args.data_len)
    if info.data_len and data is None:
        raise CliError(f"feature {info.fid:#04x} ({info.name}) takes a {info.data_len}-byte "
                       "data buffer: give it with --data FILE")
    with controller(args.bdf) as ctrl:
        dw0 = set_feature(ctrl, args.feature_id, args.value, save=args.save,
                          nsid=args.nsid or 0, data=data, cdw12=args.cdw12)
    fields = decode_fields(args.feature_id, args.value)
    if _json(args):
        output.emit_json({"feature_id": info.fid, "name": info.name, "nsid": args.nsid or 0,
                          "value": args.value, "save": args.save, "fields": fields,
                          "result": dw0})
    else:
        print(f"set-feature:{info.fid:#04x} ({info.name}), value:{args.value:#010x}, "
              f"cdw12:{args.cdw12:#010x}, save:{int(args.save)}")
        output.print_lines([f"    {k:<18}: {v}" for k, v in fields.items()])
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


def _feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace-id", dest="nsid", type=any_nsid_type, default=0,
                   help="namespace ID (namespace-specific features)")
    p.add_argument("-l", "--data-len", type=int_range(0, MAX_FEATURE_DATA, "a data length"),
                   default=None, help="bytes of the data buffer (default: the feature's own "
                                      "size, e.g. 8 for Timestamp, 512 for Host Behavior)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    _parser(sub, common, "id-ctrl", "Identify Controller", cmd_id_ctrl)
    add_nsid(_parser(sub, common, "id-ns", "Identify Namespace", cmd_id_ns))
    _parser(sub, common, "smart-log", "SMART / Health Information log page", cmd_smart_log)
    p = _parser(sub, common, "error-log", "Error Information log page", cmd_error_log)
    p.add_argument("-e", "--log-entries", type=nonnegative, default=0,
                   help="entries to fetch (default: all the controller keeps, ELPE+1)")
    p = _parser(sub, common, "get-feature", "Get Features", cmd_get_feature)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-f", "--feature-id", type=int_range(0, 0xFF, "a feature ID"),
                       default=None, help="feature identifier, e.g. 7 or 0x07 (Number of "
                                          "Queues)")
    which.add_argument("-a", "--all", action="store_true",
                       help="every feature nvme-cli names; refusals listed with their status")
    _feature_options(p)
    p.add_argument("-s", "--sel", type=nonnegative, default=0,
                   help="0 current, 1 default, 2 saved, 3 supported capabilities")
    p.add_argument("-c", "--cdw11", type=int_range(0, 0xFFFF_FFFF, "a 32-bit dword"), default=0,
                   help="command dword 11 (e.g. Temperature Threshold's TMPSEL/THSEL)")
    p = _parser(sub, common, "set-feature", "Set Features", cmd_set_feature)
    p.add_argument("-f", "--feature-id", type=int_range(0, 0xFF, "a feature ID"), required=True,
                   help="feature identifier, e.g. 4 (Temperature Threshold)")
    _feature_options(p)
    p.add_argument("-v", "--value", type=int_range(0, 0xFFFF_FFFF, "a 32-bit dword"), default=0,
                   help="command dword 11: the feature's value")
    p.add_argument("--cdw12", type=int_range(0, 0xFFFF_FFFF, "a 32-bit dword"), default=0,
                   help="command dword 12")
    p.add_argument("-d", "--data", metavar="FILE", default=None,
                   help="file holding the data buffer (LBA Range Type, Timestamp, APST, Host "
                        "Behavior Support, ...)")
    p.add_argument("-s", "--save", action="store_true",
                   help="SV: keep the value across power cycles")
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
