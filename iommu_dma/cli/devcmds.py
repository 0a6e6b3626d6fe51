"""Commands device-test engineers script (nvme-cli's names and main options): abort, events,
namespace management and attachment (create-ns, delete-ns, attach-ns, detach-ns, list-ctrl,
list-ns), copy, write-uncor, sanitize, sanitize-log, device-self-test, self-test-log,
fw-download, fw-commit, security-send, security-recv.

A command the device refuses ends with one line naming the NVMe status, e.g.
`iommu-dma: error: Sanitize (block erase): Invalid Command Opcode (SCT 0x0, SC 0x01, DNR)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from iommu_dma.cli import output
from iommu_dma.cli.common import (
    CliError,
    add_nsid,
    add_output_format,
    confirm,
    controller,
    int_range,
    nonnegative,
    nsid_type,
    positive,
    seconds,
    set_handler,
)
from iommu_dma.nvme import firmware, nsmgmt, sanitize, security, selftest
from iommu_dma.nvme.constants import NSID_ALL
from iommu_dma.nvme.events import AEC_SMART_ALL, AsyncEvent, AsyncEventTimeoutError
from iommu_dma.nvme.features import get_feature, set_feature

U16 = int_range(0, 0xFFFF, "a 16-bit value")
U32 = int_range(0, 0xFFFF_FFFF, "a 32-bit value")
U8 = int_range(0, 0xFF, "an 8-bit value")


def _json(args: argparse.Namespace) -> bool:
    return bool(args.output_format == "json")


def _done(args: argparse.Namespace, text: str, data: dict[str, Any]) -> int:
    if _json(args):
        output.emit_json(data)
    else:
        print(text)
    return 0


def _id_list(text: str) -> list[int]:
    """'0,1,5' -> [0, 1, 5] (decimal or 0x...)."""
    try:
        values = [int(v, 0) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers, e.g. 0,1") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more non-negative integers")
    return values


# ---- Abort ---------------------------------------------------------------------------------

def cmd_abort(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        aborted = ctrl.abort(args.sqid, args.cid)
    # Base §5.1: completion DW0 bit 0 is 0 when the command was aborted, 1 when it was not
    word = "aborted" if aborted else "not aborted (CDW0 bit 0 = 1: the command, if any, " \
                                     "completes on its own)"
    return _done(args, f"abort: SQID {args.sqid} CID {args.cid}: {word}",
                 {"sqid": args.sqid, "cid": args.cid, "aborted": aborted,
                  "cdw0_bit0": int(not aborted)})


# ---- Asynchronous events ---------------------------------------------------------------------

def _parse_set(text: str) -> tuple[int, int]:
    fid, sep, value = text.partition("=")
    try:
        out = int(fid, 0), int(value, 0)
    except ValueError:
        out = (-1, -1)
    if not sep or not 0 <= out[0] <= 0xFF or not 0 <= out[1] <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: give FID=VALUE, e.g. 4=0x100 (Temperature "
                                         "Threshold 256 K)")
    return out


def event_dict(ev: AsyncEvent) -> dict[str, Any]:
    d: dict[str, Any] = {"time": ev.received, "raw": ev.raw, "type": ev.type,
                         "type_name": ev.type_name, "info": ev.info, "info_name": ev.info_name,
                         "log_page": ev.lid, "log_name": ev.log_name,
                         "log_bytes": len(ev.log), "log_error": ev.log_error}
    smart = ev.smart_log()
    if smart is not None:
        d["smart"] = {"critical_warning": smart.critical_warning,
                      "temperature": smart.temperature}
    return d


def _event_line(ev: AsyncEvent) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.received))
    line = f"[{stamp}] {ev}"
    smart = ev.smart_log()
    if smart is not None:
        line += (f"; critical_warning {output.c_hex(smart.critical_warning)}, temperature "
                 f"{smart.temperature} K")
    return line


def cmd_events(args: argparse.Namespace) -> int:
    got: list[AsyncEvent] = []
    with controller(args.bdf) as ctrl:
        events = ctrl.events
        assert events is not None
        old_aec = events.config()
        aec = args.aec if args.aec is not None else AEC_SMART_ALL | (
            ctrl.identify.oaes & 0xFFFF_FF00)
        saved = [(fid, get_feature(ctrl, fid).value) for fid, _ in args.set_feature]
        try:
            events.configure(aec)
            print(f"events: {ctrl.bdf}: {events.armed} request(s) outstanding, Asynchronous "
                  f"Event Configuration {aec:#x}; waiting up to {args.timeout:g} s for "
                  f"{args.count} event(s)", file=sys.stderr, flush=True)
            for fid, value in args.set_feature:       # provoke, e.g. a temperature threshold
                set_feature(ctrl, fid, value)
            deadline = time.monotonic() + args.timeout
            while len(got) < args.count:
                left = deadline - time.monotonic()
                try:
                    ev = events.get(timeout=max(left, 0.0))
                except AsyncEventTimeoutError:
                    break
                got.append(ev)
                if not _json(args):
                    print(_event_line(ev), flush=True)
        finally:
            for fid, value in saved:
                set_feature(ctrl, fid, value)
            events.configure(old_aec)
    if _json(args):
        output.emit_json({"events": [event_dict(e) for e in got]})
    if len(got) < args.count:
        raise CliError(f"{len(got)} of {args.count} asynchronous event(s) within "
                       f"{args.timeout:g} s")
    return 0


# ---- Namespace Management and Attachment ----------------------------------------------------

def cmd_create_ns(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        nsid = nsmgmt.create_namespace(ctrl, args.nsze, args.ncap if args.ncap is not None
                                       else args.nsze, args.flbas, dps=args.dps,
                                       nmic=args.nmic, csi=args.csi)
    return _done(args, f"create-ns: Success, created nsid:{nsid}", {"nsid": nsid})


def cmd_delete_ns(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        confirm(f"Delete namespace {args.nsid:#x} of {ctrl.bdf}? Its data is lost.",
                args.force, f"refusing to delete namespace {args.nsid} of {ctrl.bdf}")
        nsmgmt.delete_namespace(ctrl, args.nsid)
    return _done(args, f"delete-ns: Success, deleted nsid:{args.nsid}", {"nsid": args.nsid})


def _attach(args: argparse.Namespace, attach: bool) -> int:
    with controller(args.bdf) as ctrl:
        ids = args.controllers if args.controllers is not None else [ctrl.identify.cntlid]
        (nsmgmt.attach_namespace if attach else nsmgmt.detach_namespace)(ctrl, args.nsid, ids)
    word = "attach" if attach else "detach"
    return _done(args, f"{word}-ns: Success, nsid:{args.nsid} controllers:"
                       f"{','.join(map(str, ids))}", {"nsid": args.nsid, "controllers": ids})


def cmd_attach_ns(args: argparse.Namespace) -> int:
    return _attach(args, True)


def cmd_detach_ns(args: argparse.Namespace) -> int:
    return _attach(args, False)


def cmd_list_ctrl(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        if args.nsid:
            ids = nsmgmt.attached_controllers(ctrl, args.nsid, args.cntid)
        else:
            ids = nsmgmt.subsystem_controllers(ctrl, args.cntid)
    if _json(args):
        output.emit_json({"num_ctrl": len(ids), "ctrl_list": [{"ctrl_id": i} for i in ids]})
    else:
        print(f"num of ctrls present: {len(ids)}")
        output.print_lines([f"[{i:4d}]:{c:#x}" for i, c in enumerate(ids)])
    return 0


def cmd_list_ns(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        if args.all:
            ids = nsmgmt.allocated_namespaces(ctrl, args.nsid)
        else:
            ids = [n for n in ctrl.active_namespaces() if n > args.nsid]
    if _json(args):
        output.emit_json({"nsid_list": [{"nsid": n} for n in ids]})
    else:
        output.print_lines([f"[{i:4d}]:{n:#x}" for i, n in enumerate(ids)])
    return 0


# ---- Copy, Write Uncorrectable --------------------------------------------------------------

def cmd_copy(args: argparse.Namespace) -> int:
    if len(args.slbs) != len(args.blocks):
        raise CliError(f"--slbs names {len(args.slbs)} source range(s) and --blocks "
                       f"{len(args.blocks)}: give one block count per starting LBA")
    ranges = list(zip(args.slbs, args.blocks, strict=True))
    with controller(args.bdf) as ctrl:
        ctrl.namespace(args.nsid).copy(ranges, args.sdlba)
    total = sum(args.blocks)
    return _done(args, f"copy: Success ({len(ranges)} range(s), {total} blocks to LBA "
                       f"{args.sdlba})",
                 {"nsid": args.nsid, "sdlba": args.sdlba,
                  "ranges": [{"slba": s, "nlb": n} for s, n in ranges]})


def cmd_write_uncor(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        ctrl.namespace(args.nsid).write_uncorrectable(args.start_block, args.block_count)
    return _done(args, f"write-uncor: Success ({args.block_count} blocks at LBA "
                       f"{args.start_block})",
                 {"nsid": args.nsid, "slba": args.start_block, "nlb": args.block_count})


# ---- Sanitize, Device Self-test ---------------------------------------------------------------

def cmd_sanitize(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        confirm(f"Sanitize {ctrl.bdf} ({sanitize.SANACT_NAMES.get(args.sanact, '?')})? Every "
                "namespace of its NVM subsystem is erased.", args.force,
                f"refusing to sanitize {ctrl.bdf}")
        sanitize.start_sanitize(ctrl, args.sanact, ause=args.ause, owpass=args.owpass,
                                oipbp=args.oipbp, ndas=args.no_dealloc, ovrpat=args.ovrpat)
    return _done(args, "sanitize: Success (started; see sanitize-log)", {"sanact": args.sanact})


def cmd_sanitize_log(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        st = sanitize.sanitize_status(ctrl)
    return _done(args, f"sprog: {st.sprog}\nsstat: {st.sstat:#x} ({st.state})\n"
                       f"scdw10: {st.scdw10:#x}",
                 {"sprog": st.sprog, "sstat": st.sstat, "state": st.state,
                  "scdw10": st.scdw10})


def cmd_self_test(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        selftest.start_self_test(ctrl, args.self_test_code, args.nsid)
    name = selftest.STC_NAMES.get(args.self_test_code, "reserved")
    return _done(args, f"device-self-test: Success ({name} test started; see self-test-log)",
                 {"stc": args.self_test_code, "nsid": args.nsid})


def cmd_self_test_log(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        log = selftest.self_test_log(ctrl)
    results = [{"result": r.result, "result_name": r.result_name, "code": r.code,
                "segment": r.segment, "valid": r.valid, "power_on_hours": r.power_on_hours,
                "nsid": r.nsid, "failing_lba": r.failing_lba, "sct": r.sct, "sc": r.sc}
               for r in log.results]
    if _json(args):
        output.emit_json({"current_operation": log.current_operation,
                          "completion": log.completion, "results": results})
    else:
        print(f"Current operation  : {log.current_operation:#x}")
        print(f"Current completion : {log.completion}%")
        output.print_lines([f"Result[{i}]: {r['result_name']} (code {r['code']:#x}, "
                            f"segment {r['segment']}, poh {r['power_on_hours']})"
                            for i, r in enumerate(results)])
    return 0


# ---- Firmware --------------------------------------------------------------------------------

def cmd_fw_download(args: argparse.Namespace) -> int:
    with open(args.fw, "rb") as fh:
        image = fh.read(firmware.MAX_IMAGE + 1)
    if len(image) > firmware.MAX_IMAGE:
        raise CliError(f"--fw {args.fw}: more than {firmware.MAX_IMAGE} bytes")
    with controller(args.bdf) as ctrl:
        n = firmware.download_firmware(ctrl, image, xfer=args.xfer, offset=args.offset)
    return _done(args, f"fw-download: Success ({len(image)} bytes in {n} command(s))",
                 {"bytes": len(image), "commands": n})


def cmd_fw_commit(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        dw0 = firmware.commit_firmware(ctrl, args.slot, args.action, bpid=args.bpid)
    action = firmware.COMMIT_ACTIONS.get(args.action, "?")
    return _done(args, f"fw-commit: Success, slot:{args.slot} action:{args.action} ({action})",
                 {"slot": args.slot, "action": args.action, "result": dw0})


# ---- Security Send / Receive -------------------------------------------------------------------

def cmd_security_send(args: argparse.Namespace) -> int:
    data = b""
    if args.file:
        with open(args.file, "rb") as fh:
            data = fh.read(security.MAX_SECURITY_DATA + 1)
    if args.tl is not None:
        data = data[:args.tl].ljust(args.tl, b"\0")
    with controller(args.bdf) as ctrl:
        security.security_send(ctrl, args.secp, args.spsp, data, nssf=args.nssf)
    return _done(args, f"security-send: Success ({len(data)} bytes)", {"bytes": len(data)})


def cmd_security_recv(args: argparse.Namespace) -> int:
    with controller(args.bdf) as ctrl:
        data = security.security_receive(ctrl, args.secp, args.spsp, args.size, nssf=args.nssf)
    if _json(args):
        output.emit_json({"bytes": len(data), "data": data.hex()})
    else:
        sys.stdout.buffer.write(data)
    return 0


# ---- parsers -----------------------------------------------------------------------------------

def _parser(sub: Any, common: argparse.ArgumentParser, name: str, what: str,
            func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=what, description=what)
    p.add_argument("bdf", metavar="BDF", help="controller on vfio-pci, e.g. 0000:00:04.0")
    add_output_format(p)
    set_handler(p, func)
    return p


def _register_ns(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "create-ns", "Namespace Management: create", cmd_create_ns)
    p.add_argument("-s", "--nsze", type=positive, required=True, help="size in blocks (NSZE)")
    p.add_argument("-c", "--ncap", type=positive, default=None,
                   help="capacity in blocks (NCAP; default: NSZE)")
    p.add_argument("-f", "--flbas", type=U8, default=0, help="FLBAS: the LBA format index")
    p.add_argument("-d", "--dps", type=U8, default=0, help="DPS: protection settings")
    p.add_argument("-m", "--nmic", type=U8, default=0, help="NMIC: 1 = shareable")
    p.add_argument("-y", "--csi", type=U8, default=0, help="command set (0 NVM, 2 zoned)")
    p = _parser(sub, common, "delete-ns", "Namespace Management: delete", cmd_delete_ns)
    p.add_argument("-n", "--namespace-id", dest="nsid", type=nsid_type, required=True,
                   help="namespace ID (0xffffffff: every namespace)")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    for name, func in (("attach-ns", cmd_attach_ns), ("detach-ns", cmd_detach_ns)):
        p = _parser(sub, common, name, f"Namespace Attachment: {name[:6]}", func)
        add_nsid(p)
        p.add_argument("-c", "--controllers", type=_id_list, default=None,
                       help="controller IDs, e.g. 0,1 (default: this controller)")
    p = _parser(sub, common, "list-ctrl", "controller list: of the NVM subsystem (Identify "
                "CNS 13h), or attached to a namespace with -n (CNS 12h)", cmd_list_ctrl)
    p.add_argument("-n", "--namespace-id", dest="nsid", type=nsid_type, default=0,
                   help="the controllers attached to this namespace")
    p.add_argument("-c", "--cntid", type=U16, default=0, help="first controller ID to list")
    p = _parser(sub, common, "list-ns", "namespace list: active (CNS 02h) or, with --all, "
                "allocated (CNS 10h)", cmd_list_ns)
    p.add_argument("-n", "--namespace-id", dest="nsid", type=int_range(0, NSID_ALL - 1,
                   "an NSID"), default=0, help="list NSIDs above this one")
    p.add_argument("-a", "--all", action="store_true",
                   help="allocated namespaces, attached or not")


def _register_io(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "copy", "Copy: source ranges to consecutive blocks", cmd_copy)
    add_nsid(p)
    p.add_argument("-d", "--sdlba", type=nonnegative, required=True,
                   help="first destination LBA")
    p.add_argument("-s", "--slbs", type=_id_list, required=True,
                   help="starting LBAs of the source ranges, e.g. 0,100")
    p.add_argument("-b", "--blocks", type=_id_list, required=True,
                   help="blocks per source range, e.g. 8,8 (natural counts: nvme-cli's are "
                        "0's based, these are not)")
    p = _parser(sub, common, "write-uncor", "Write Uncorrectable", cmd_write_uncor)
    add_nsid(p)
    p.add_argument("-s", "--start-block", type=nonnegative, required=True, help="first LBA")
    p.add_argument("-c", "--block-count", type=positive, default=1,
                   help="blocks (a natural count: nvme-cli's is 0's based, this one is not)")


def _register_maintenance(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "sanitize", "Sanitize (erases the whole NVM subsystem)",
                cmd_sanitize)
    p.add_argument("-a", "--sanact", type=int_range(1, 4, "SANACT"), required=True,
                   help="1 exit failure mode, 2 block erase, 3 overwrite, 4 crypto erase")
    p.add_argument("-u", "--ause", action="store_true", help="AUSE: allow unrestricted exit")
    p.add_argument("-n", "--owpass", type=int_range(0, 15, "OWPASS"), default=0,
                   help="overwrite passes")
    p.add_argument("-i", "--oipbp", action="store_true", help="OIPBP: invert between passes")
    p.add_argument("-D", "--no-dealloc", action="store_true", help="NDAS: no deallocation")
    p.add_argument("-p", "--ovrpat", type=U32, default=0, help="overwrite pattern")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    _parser(sub, common, "sanitize-log", "Sanitize Status log page", cmd_sanitize_log)
    p = _parser(sub, common, "device-self-test", "Device Self-test", cmd_self_test)
    p.add_argument("-n", "--namespace-id", dest="nsid", type=int_range(0, NSID_ALL, "an NSID"),
                   default=NSID_ALL, help="0: controller only; default 0xffffffff: all")
    p.add_argument("-s", "--self-test-code", type=int_range(0, 15, "STC"), required=True,
                   help="1 short, 2 extended, 0xe vendor specific, 0xf abort")
    _parser(sub, common, "self-test-log", "Device Self-test log page", cmd_self_test_log)
    p = _parser(sub, common, "fw-download", "Firmware Image Download", cmd_fw_download)
    p.add_argument("-f", "--fw", metavar="FILE", required=True, help="firmware image")
    p.add_argument("-x", "--xfer", type=positive, default=firmware.DEFAULT_XFER,
                   help="bytes per command (default 4096; a multiple of 4)")
    p.add_argument("--offset", type=nonnegative, default=0, help="starting byte offset")
    p = _parser(sub, common, "fw-commit", "Firmware Commit", cmd_fw_commit)
    p.add_argument("-s", "--slot", type=int_range(0, 7, "a firmware slot"), default=0,
                   help="slot (0: the controller chooses)")
    p.add_argument("-a", "--action", type=int_range(0, 7, "a commit action"), required=True,
                   help="0 replace, 1 replace and activate, 2 activate, 3 activate now, "
                        "6/7 boot partition")
    p.add_argument("-b", "--bpid", type=int_range(0, 1, "BPID"), default=0,
                   help="boot partition ID")
    for name, func in (("security-send", cmd_security_send),
                       ("security-recv", cmd_security_recv)):
        p = _parser(sub, common, name, f"Security {name[9:].title()}", func)
        p.add_argument("-p", "--secp", type=U8, default=0, help="security protocol (SECP)")
        p.add_argument("-s", "--spsp", type=U16, default=0, help="protocol specific (SPSP)")
        p.add_argument("-N", "--nssf", type=U8, default=0, help="NVMe security specific (NSSF)")
        if name == "security-send":
            p.add_argument("-f", "--file", default=None, help="data to send")
            p.add_argument("-t", "--tl", type=nonnegative, default=None,
                           help="transfer length (default: the file's size)")
        else:
            p.add_argument("-x", "--size", type=nonnegative, default=0,
                           help="allocation length (bytes to receive)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "abort", "Abort a command (SQID, CID)", cmd_abort)
    p.add_argument("-q", "--sqid", type=U16, default=0, help="submission queue ID")
    p.add_argument("-c", "--cid", type=U16, required=True, help="command ID")
    p = _parser(sub, common, "events", "print asynchronous events as they arrive", cmd_events)
    p.add_argument("--count", type=positive, default=1, help="events to wait for (default 1)")
    p.add_argument("--timeout", type=seconds(), default=60.0,
                   help="seconds to wait for them (default 60)")
    p.add_argument("--aec", type=U32, default=None,
                   help="Asynchronous Event Configuration while waiting (default: every SMART "
                        "warning and the notices OAES lists); restored afterwards")
    p.add_argument("--set-feature", metavar="FID=VALUE", type=_parse_set, action="append",
                   default=[], help="after arming, Set Features FID to VALUE (to provoke an "
                   "event, e.g. 4=0x100: over-temperature threshold 256 K); restored afterwards")
    _register_ns(sub, common)
    _register_io(sub, common)
    _register_maintenance(sub, common)
