"""nvme-cli 2.x JSON of Identify Controller / Namespace and the SMART log (iommu_dma.cli.nvme_json).

The raw structures and the JSON are what QEMU's NVMe controller of the bench returned and what
Debian 12's nvme-cli 2.3 printed for them on the kernel nvme driver (`nvme id-ctrl /dev/nvme0 -b`
and `-o json`, likewise id-ns /dev/nvme0n1 and smart-log /dev/nvme0).
"""

from __future__ import annotations

import base64
import json
import struct
import zlib

from iommu_dma.cli import nvme_json, output
from iommu_dma.nvme.identify import IdentifyController, IdentifyNamespace, PowerState, SmartLog


def _raw(packed: str) -> bytes:
    return zlib.decompress(base64.b64decode(packed))


QEMU_ID_CTRL = _raw(
    "eNozk/4i5eni62hgYGCogAQCXX1DFfzCfFMVnEuKchRwAnM9Iz0jIwUFNoaQIAZWBgYGFkYGOAAxGxiQASPDIANcjMz"
    "MzOwgVjhj6aBzHe1BmgskVmJBfmeHiTIzjJSgyCvM0zMyMLTUNbDQyy9K1ytMzS21gmUIhlEwCkbBKBi+4AgnA4MAqN"
    "oeDYpRMApGwSgYBaNgxAAAOmcaLA==")
QEMU_ID_NS = _raw(
    "eNrtxzEOQGAQROEnJEi2UOhd5b8ZRzeiUxHt+zaT2aFxe/Q6Dv12PR0vHTnY+WpmSpakJVDZlV3ZhSRJkiRJ+u8ETpwDhg==")
QEMU_SMART = _raw("eNpjcGZkwAeYGfCDOIZRMJQBADPqAKY=")

NVME_CLI_ID_CTRL = {'vid': 6966,
 'ssvid': 6900,
 'sn': 'IDMA0001            ',
 'mn': 'QEMU NVMe Ctrl                          ',
 'fr': '7.2.22  ',
 'rab': 6,
 'ieee': 5395456,
 'cmic': 0,
 'mdts': 5,
 'cntlid': 0,
 'ver': 66560,
 'rtd3r': 0,
 'rtd3e': 0,
 'oaes': 256,
 'ctratt': 32768,
 'rrls': 0,
 'cntrltype': 1,
 'fguid': '00000000-0000-0000-0000-000000000000',
 'crdt1': 0,
 'crdt2': 0,
 'crdt3': 0,
 'nvmsr': 0,
 'vwci': 0,
 'mec': 0,
 'oacs': 266,
 'acl': 3,
 'aerl': 3,
 'frmw': 3,
 'lpa': 7,
 'elpe': 0,
 'npss': 0,
 'avscc': 0,
 'apsta': 0,
 'wctemp': 343,
 'cctemp': 373,
 'mtfa': 0,
 'hmpre': 0,
 'hmmin': 0,
 'tnvmcap': '0',
 'unvmcap': '0',
 'rpmbs': 0,
 'edstt': 0,
 'dsto': 0,
 'fwug': 0,
 'kas': 0,
 'hctma': 0,
 'mntmt': 0,
 'mxtmt': 0,
 'sanicap': 0,
 'hmminds': 0,
 'hmmaxd': 0,
 'nsetidmax': 0,
 'endgidmax': 0,
 'anatt': 0,
 'anacap': 0,
 'anagrpmax': 0,
 'nanagrpid': 0,
 'pels': 0,
 'domainid': 0,
 'megcap': '0',
 'sqes': 102,
 'cqes': 68,
 'maxcmd': 0,
 'nn': 256,
 'oncs': 349,
 'fuses': 0,
 'fna': 0,
 'vwc': 7,
 'awun': 0,
 'awupf': 0,
 'icsvscc': 0,
 'nwpc': 0,
 'acwu': 0,
 'ocfs': 3,
 'sgls': 1,
 'mnan': 0,
 'maxdna': '0',
 'maxcna': 0,
 'subnqn': 'nqn.2019-08.org.qemu:IDMA0001',
 'ioccsz': 0,
 'iorcsz': 0,
 'icdoff': 0,
 'fcatt': 0,
 'msdbd': 0,
 'ofcs': 0,
 'psds': [{'max_power': 2500,
           'flags': 0,
           'entry_lat': 16,
           'exit_lat': 4,
           'read_tput': 0,
           'read_lat': 0,
           'write_tput': 0,
           'write_lat': 0,
           'idle_power': 0,
           'idle_scale': 0,
           'active_power': 0,
           'active_power_work': 0,
           'active_scale': 0}]}

NVME_CLI_ID_NS = {'nsze': 16384,
 'ncap': 16384,
 'nuse': 16384,
 'nsfeat': 20,
 'nlbaf': 7,
 'flbas': 4,
 'mc': 3,
 'dpc': 31,
 'dps': 0,
 'nmic': 0,
 'rescap': 0,
 'fpi': 0,
 'dlfeat': 1,
 'nawun': 0,
 'nawupf': 0,
 'nacwu': 0,
 'nabsn': 0,
 'nabo': 0,
 'nabspf': 0,
 'noiob': 0,
 'nvmcap': '0',
 'nsattr': 0,
 'nvmsetid': 0,
 'npwg': 0,
 'npwa': 0,
 'npdg': 0,
 'npda': 0,
 'nows': 0,
 'mssrl': 128,
 'mcl': 128,
 'msrc': 127,
 'nulbaf': 0,
 'anagrpid': 0,
 'endgid': 0,
 'eui64': '0000000000000000',
 'nguid': '00000000000000000000000000000000',
 'lbafs': [{'ms': 0, 'ds': 9, 'rp': 0}, {'ms': 8, 'ds': 9, 'rp': 0},
           {'ms': 16, 'ds': 9, 'rp': 0}, {'ms': 64, 'ds': 9, 'rp': 0},
           {'ms': 0, 'ds': 12, 'rp': 0}, {'ms': 8, 'ds': 12, 'rp': 0},
           {'ms': 16, 'ds': 12, 'rp': 0}, {'ms': 64, 'ds': 12, 'rp': 0}]}

NVME_CLI_SMART = {'critical_warning': 0,
 'temperature': 323,
 'avail_spare': 0,
 'spare_thresh': 0,
 'percent_used': 0,
 'endurance_grp_critical_warning_summary': 0,
 'data_units_read': '3',
 'data_units_written': '0',
 'host_read_commands': '94',
 'host_write_commands': '0',
 'controller_busy_time': '0',
 'power_cycles': '0',
 'power_on_hours': '0',
 'unsafe_shutdowns': '0',
 'media_errors': '0',
 'num_err_log_entries': '0',
 'warning_temp_time': 0,
 'critical_comp_time': 0,
 'thm_temp1_trans_count': 0,
 'thm_temp2_trans_count': 0,
 'thm_temp1_total_time': 0,
 'thm_temp2_total_time': 0}


def test_id_ctrl_equals_nvme_cli() -> None:
    idc = IdentifyController.parse(QEMU_ID_CTRL)
    got = nvme_json.id_ctrl(idc)
    assert got == NVME_CLI_ID_CTRL
    assert list(got) == list(NVME_CLI_ID_CTRL)           # same order as well
    assert json.loads(json.dumps(got)) == NVME_CLI_ID_CTRL
    assert (idc.sn, idc.fr) == ("IDMA0001", "7.2.22")     # the dataclass keeps them trimmed


def test_id_ctrl_cli_json_trims_the_strings_and_nothing_else() -> None:
    idc = IdentifyController.parse(QEMU_ID_CTRL)
    ours = nvme_json.id_ctrl(idc, padded_strings=False)
    assert set(ours) == set(NVME_CLI_ID_CTRL) | nvme_json.EXTRA_ID_CTRL
    for key, value in NVME_CLI_ID_CTRL.items():
        if key in nvme_json.CHANGED_ID_CTRL:
            assert ours[key] == value.rstrip(" "), key
        else:
            assert ours[key] == value, key


def test_id_ns_equals_nvme_cli() -> None:
    got = nvme_json.id_ns(IdentifyNamespace.parse(QEMU_ID_NS))
    assert got == NVME_CLI_ID_NS and list(got) == list(NVME_CLI_ID_NS)


def test_smart_log_equals_nvme_cli() -> None:
    log = SmartLog.parse(QEMU_SMART)
    assert nvme_json.smart_log(log) == NVME_CLI_SMART
    assert output.smart_dict(log) == {**NVME_CLI_SMART, "temperature_celsius": 50}


def test_every_field_parsed_from_its_offset() -> None:
    raw = bytearray(4096)
    struct.pack_into("<IIIIH", raw, 84, 0x11, 0x22, 0x33, 0x44, 0x55)   # rtd3r..rrls
    raw[111] = 2
    raw[112:128] = bytes(range(1, 17))
    struct.pack_into("<HHH", raw, 128, 7, 8, 9)
    raw[253:256] = b"\x01\x02\x03"
    raw[263] = 2                                         # three power states
    raw[264:266] = b"\x01\x01"
    struct.pack_into("<HII", raw, 270, 5, 100, 200)          # mtfa, hmpre, hmmin
    raw[280:296] = (1 << 100).to_bytes(16, "little")     # tnvmcap beyond 64 bits
    struct.pack_into("<IHBBHHHHIIHHHBBIIIH", raw, 312, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                     14, 15, 16, 17, 18, 19)
    raw[368:384] = (12345).to_bytes(16, "little")
    raw[530], raw[531] = 1, 2
    struct.pack_into("<HHIII", raw, 532, 3, 4, 5, 6, 0)
    raw[544:560] = (99).to_bytes(16, "little")
    struct.pack_into("<I", raw, 560, 77)
    struct.pack_into("<IIHBBH", raw, 1792, 4, 1, 0, 2, 3, 4)
    struct.pack_into("<HxBIIBBBBHBxHB", raw, 2048 + 32, 900, 3, 10, 20, 1, 2, 3, 4, 50, 0x80,
                     60, 0x42)
    raw[3072:3076] = b"VEND"
    idc = IdentifyController.parse(bytes(raw))
    assert (idc.rtd3r, idc.rtd3e, idc.oaes, idc.ctratt, idc.rrls) == (0x11, 0x22, 0x33, 0x44, 0x55)
    assert idc.cntrltype == 2 and idc.fguid == "01020304-0506-0708-090a-0b0c0d0e0f10"
    assert idc.crdt == (7, 8, 9) and (idc.nvmsr, idc.vwci, idc.mec) == (1, 2, 3)
    assert (idc.avscc, idc.apsta, idc.mtfa, idc.hmpre, idc.hmmin) == (1, 1, 5, 100, 200)
    assert (idc.rpmbs, idc.edstt, idc.dsto, idc.fwug, idc.kas, idc.hctma, idc.mntmt, idc.mxtmt,
            idc.sanicap, idc.hmminds, idc.hmmaxd, idc.nsetidmax, idc.endgidmax, idc.anatt,
            idc.anacap, idc.anagrpmax, idc.nanagrpid, idc.pels, idc.domainid) == tuple(
                range(1, 20))
    assert (idc.tnvmcap, idc.megcap, idc.maxdna, idc.maxcna) == (1 << 100, 12345, 99, 77)
    assert (idc.icsvscc, idc.nwpc, idc.acwu, idc.ocfs, idc.sgls, idc.mnan) == (1, 2, 3, 4, 5, 6)
    assert (idc.ioccsz, idc.iorcsz, idc.icdoff, idc.fcatt, idc.msdbd, idc.ofcs) == (
        4, 1, 0, 2, 3, 4)
    assert len(idc.psds) == 3 and idc.psds[0] == PowerState(*[0] * 13)
    assert idc.psds[1] == PowerState(max_power=900, flags=3, entry_lat=10, exit_lat=20,
                                     read_tput=1, read_lat=2, write_tput=3, write_lat=4,
                                     idle_power=50, idle_scale=2, active_power=60,
                                     active_power_work=2, active_scale=1)
    assert idc.vs[:4] == b"VEND" and len(idc.vs) == 1024
    d = nvme_json.id_ctrl(idc)
    assert d["tnvmcap"] == str(1 << 100) and d["megcap"] == "12345" and "subnqn" not in d
    assert d["psds"][1]["active_power_work"] == 2 and len(d["psds"]) == 3


def test_power_states_bounded_to_32() -> None:
    raw = bytearray(4096)
    raw[263] = 255                                       # NPSS past the 32 descriptors
    assert len(IdentifyController.parse(bytes(raw)).psds) == 32


def test_id_ns_fields_and_optperf_keys() -> None:
    raw = bytearray(4096)
    struct.pack_into("<QQQ", raw, 0, 100, 100, 50)
    raw[24], raw[25] = 0x10, 0                            # OPTPERF, one format
    raw[31:34] = b"\x01\x02\x03"
    struct.pack_into("<HHHHHHH", raw, 34, 1, 2, 3, 4, 5, 6, 7)
    raw[48:64] = (1 << 80).to_bytes(16, "little")
    struct.pack_into("<HHHHHHIBxB", raw, 64, 8, 9, 10, 11, 12, 13, 14, 15, 16)
    struct.pack_into("<I", raw, 92, 17)
    raw[99] = 1
    struct.pack_into("<HH", raw, 100, 18, 19)
    raw[120:128] = bytes.fromhex("0011223344556677")
    struct.pack_into("<HBB", raw, 128, 8, 12, 0x06)       # rp byte with a reserved bit set
    idn = IdentifyNamespace.parse(bytes(raw))
    assert (idn.rescap, idn.fpi, idn.dlfeat) == (1, 2, 3)
    assert (idn.nawun, idn.nawupf, idn.nacwu, idn.nabsn, idn.nabo, idn.nabspf, idn.noiob) == (
        1, 2, 3, 4, 5, 6, 7)
    assert (idn.npwg, idn.npwa, idn.npdg, idn.npda, idn.nows, idn.mssrl, idn.mcl, idn.msrc,
            idn.nulbaf) == (8, 9, 10, 11, 12, 13, 14, 15, 16)
    assert (idn.anagrpid, idn.nsattr, idn.nvmsetid, idn.endgid) == (17, 1, 18, 19)
    d = nvme_json.id_ns(idn)
    assert d["nvmcap"] == str(1 << 80) and d["eui64"] == "0011223344556677"
    assert d["npwg"] == 8 and d["nows"] == 12
    assert d["lbafs"] == [{"ms": 8, "ds": 12, "rp": 6}] and idn.lbaf[0].rp == 2
    raw[24] = 0
    assert "npwg" not in nvme_json.id_ns(IdentifyNamespace.parse(bytes(raw)))


def test_smart_sensors_keep_their_numbers() -> None:
    raw = bytearray(512)
    struct.pack_into("<H", raw, 1, 300)
    struct.pack_into("<HHH", raw, 202, 310, 0, 320)      # sensors 2 and 4
    struct.pack_into("<IIII", raw, 216, 1, 2, 3, 4)
    raw[128:144] = (1 << 64).to_bytes(16, "little")
    log = SmartLog.parse(bytes(raw))
    d = nvme_json.smart_log(log)
    assert (d["temperature_sensor_2"], d["temperature_sensor_4"]) == (310, 320)
    assert not any(f"temperature_sensor_{i}" in d for i in (1, 3, 5, 6, 7, 8))
    assert (d["thm_temp1_trans_count"], d["thm_temp2_total_time"]) == (1, 4)
    assert d["power_on_hours"] == str(1 << 64)
    text = "\n".join(output.smart_lines(log, "0000:00:04.0"))
    assert "temperature_sensor_2" in text and "temperature_sensor_1 " not in text
