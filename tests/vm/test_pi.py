"""Metadata and end-to-end protection on the "cmds" bench, controller [1] (IDMAC001):
nsid 1 PI type 1, 8 bytes of separate metadata (MPTR); nsid 2 PI type 3, 16 bytes, extended
LBA, PI first; nsid 3 PI type 2, 512-byte blocks, 8 bytes separate.

The PI the controller generates (PRACT) is compared with ours (pi.PiFormat); wrong guards,
application and reference tags fail with the spec's status names; QEMU keeps every block's
metadata after all the data of the backing image, where both are checked."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommu_dma import Controller
from iommu_dma.nvme.namespace import Namespace
from iommu_dma.nvme.pi import PiTuple, PiType, Prinfo, crc16_t10dif
from iommu_dma.nvme.status import NvmeError
from iommu_dma.testing.bench import Bench, image_path
from tests.vm.cli_run import Cli

pytestmark = pytest.mark.iommu_dma_vm(bench="cmds")

rng = random.Random(1313)


def image(bench: Bench, images: Path, nsid: int, lba: int, nlb: int) -> tuple[bytes, bytes]:
    """(data, metadata) of blocks lba.. in the backing image of controller [1]."""
    cfg = bench.controllers[1].namespaces[nsid - 1]
    with open(image_path(images, 1, nsid), "rb") as f:
        f.seek(lba * cfg.lba_size)
        data = f.read(nlb * cfg.lba_size)
        f.seek(cfg.blocks * cfg.lba_size + lba * cfg.ms)
        return data, f.read(nlb * cfg.ms)


def fails(name: str, call: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(NvmeError) as e:
        call(*args, **kwargs)  # type: ignore[operator]
    assert e.value.name == name, str(e.value)


@pytest.fixture
def c1(vfio_bdfs: list[str]) -> Iterator[Controller]:
    with Controller.open(vfio_bdfs[1]) as c:
        c.recovery.retries = 0                  # every status as the controller gives it
        yield c


def test_formats(c1: Controller) -> None:
    ns1, ns2, ns3 = (c1.namespace(n) for n in (1, 2, 3))
    assert ns1.pi is not None and ns2.pi is not None and ns3.pi is not None
    assert (ns1.ms, ns1.extended, ns1.pi.pi_type, ns1.pi.pi_first, ns1.block_bytes) == (
        8, False, PiType.TYPE1, False, 4096)
    assert (ns2.ms, ns2.extended, ns2.pi.pi_type, ns2.pi.pi_first, ns2.block_bytes) == (
        16, True, PiType.TYPE3, True, 4096 + 16)
    assert (ns3.lba_size, ns3.ms, ns3.pi.pi_type) == (512, 8, PiType.TYPE2)


def test_pract_type1_controller_pi_equals_ours(c1: Controller, idma_bench: Bench,
                                               idma_bench_images: Path) -> None:
    ns = c1.namespace(1)
    assert ns.pi is not None
    data = rng.randbytes(3 * 4096)
    ns.write(10, data)                          # default: PRACT, the controller makes the PI
    assert ns.read(10, 3) == data               # PRACT read: checked and stripped
    got, meta = ns.read_metadata(10, 3)         # PRINFO 0: the metadata as stored
    assert got == data
    tuples = ns.pi.tuples(meta)
    assert [t.ref_tag for t in tuples] == [10, 11, 12]            # type 1: the LBA
    assert [t.guard for t in tuples] == [crc16_t10dif(data[i:i + 4096])
                                         for i in range(0, len(data), 4096)]
    assert meta == ns.pi.generate(data, 4096, 10)                 # byte for byte
    assert image(idma_bench, idma_bench_images, 1, 10, 3) == (data, meta)


def test_host_pi_checked_type1(c1: Controller, idma_bench: Bench,
                               idma_bench_images: Path) -> None:
    ns = c1.namespace(1)
    assert ns.pi is not None
    data = rng.randbytes(2 * 4096)
    meta = ns.pi.generate(data, 4096, 20, app_tag=0x1234)
    checks = dict(prinfo=Prinfo.PRCHK_ALL, apptag=0x1234, appmask=0xFFFF)
    ns.write(20, data, metadata=meta, **checks)
    assert ns.read_metadata(20, 2, **checks) == (data, meta)
    assert image(idma_bench, idma_bench_images, 1, 20, 2) == (data, meta)
    # a wrong guard
    bad = bytearray(meta)
    bad[8] ^= 0xFF                              # the second block's guard
    fails("End-to-end Guard Check Error", ns.write, 30, data, metadata=bytes(bad),
          prinfo=Prinfo.PRCHK_GUARD)
    # a wrong reference tag (type 1: the LBA; ILBRT is right, the tuple is not)
    fails("End-to-end Reference Tag Check Error", ns.write, 30, data,
          metadata=ns.pi.generate(data, 4096, 99), prinfo=Prinfo.PRCHK_REF)
    # a wrong application tag
    fails("End-to-end Application Tag Check Error", ns.write, 30, data, metadata=meta,
          prinfo=Prinfo.PRCHK_APP, apptag=0x4321, appmask=0xFFFF)
    # stored with a bad guard (no checks on write): the read with checks finds it
    ns.write(40, data, metadata=bytes(bad), prinfo=0)
    fails("End-to-end Guard Check Error", ns.read_metadata, 40, 2, prinfo=Prinfo.PRCHK_GUARD)
    assert ns.read_metadata(40, 2)[1] == bytes(bad)               # unchecked: as stored
    # ILBRT must match the SLBA for type 1 when the reference tag is checked
    fails("Invalid Protection Information", ns.write, 20, data, metadata=meta,
          prinfo=Prinfo.PRCHK_REF, reftag=21)


def test_type3_extended_ref_tag_not_checked(c1: Controller, idma_bench: Bench,
                                            idma_bench_images: Path) -> None:
    ns = c1.namespace(2)
    assert ns.pi is not None and ns.extended
    data = rng.randbytes(2 * 4096)
    extra = rng.randbytes(2 * 16)               # the 8 bytes after each PI are the host's
    meta = ns.pi.generate(data, 4096, 40, ilbrt=0xDEAD, metadata=extra, app_tag=0x77)
    checks = Prinfo.PRCHK_GUARD | Prinfo.PRCHK_APP
    # the tuples' reference tag (DEAD) is not ILBRT (BEEF): type 3 does not check it
    ns.write(40, data, metadata=meta, prinfo=checks, reftag=0xBEEF, apptag=0x77,
             appmask=0xFFFF)
    assert ns.read_metadata(40, 2, prinfo=checks, reftag=0x1, apptag=0x77,
                            appmask=0xFFFF) == (data, meta)
    try:                                        # PRCHK reference tag set on a type 3 format
        ns.read_metadata(40, 2, prinfo=Prinfo.PRCHK_ALL, reftag=0x1, apptag=0x77,
                         appmask=0xFFFF)
        print("type 3, PRCHK_REF with a wrong reference tag: success")
    except NvmeError as e:
        assert e.name == "Invalid Protection Information", str(e)
        print(f"type 3, PRCHK_REF: {e.name}")
    raw = ns.read(40, 2)                        # extended: data then metadata per block
    assert raw == data[:4096] + meta[:16] + data[4096:] + meta[16:]
    assert image(idma_bench, idma_bench_images, 2, 40, 2) == (data, meta)
    bad = bytearray(meta)
    bad[0] ^= 1
    fails("End-to-end Guard Check Error", ns.write, 44, data, metadata=bytes(bad),
          prinfo=Prinfo.PRCHK_GUARD)
    # PRACT with 16 bytes of metadata: the controller fills the PI (the first 8 bytes)
    ns.write(50, data, metadata=bytes(32), prinfo=Prinfo.PRACT)
    _, meta50 = ns.read_metadata(50, 2)
    tuples = ns.pi.tuples(meta50)
    assert [t.guard for t in tuples] == [crc16_t10dif(data[:4096]), crc16_t10dif(data[4096:])]
    print("type 3 PRACT reference tags:", [hex(t.ref_tag) for t in tuples])


def test_type2_ilbrt(c1: Controller, idma_bench: Bench, idma_bench_images: Path) -> None:
    ns = c1.namespace(3)
    assert ns.pi is not None
    data = rng.randbytes(4 * 512)
    meta = ns.pi.generate(data, 512, 7, ilbrt=1000)
    assert [t.ref_tag for t in ns.pi.tuples(meta)] == [1000, 1001, 1002, 1003]
    ns.write(7, data, metadata=meta, prinfo=Prinfo.PRCHK_ALL, reftag=1000)
    assert ns.read_metadata(7, 4, prinfo=Prinfo.PRCHK_ALL, reftag=1000) == (data, meta)
    fails("End-to-end Reference Tag Check Error", ns.read_metadata, 7, 4,
          prinfo=Prinfo.PRCHK_REF, reftag=2000)
    assert image(idma_bench, idma_bench_images, 3, 7, 4) == (data, meta)
    ns.write(100, data)                         # PRACT: ILBRT defaults to the SLBA
    tuples = ns.pi.tuples(ns.read_metadata(100, 4)[1])
    assert [t.ref_tag for t in tuples] == [100, 101, 102, 103]
    assert tuples[0] == PiTuple(crc16_t10dif(data[:512]), 0, 100)


def _pract_piece(ns: Namespace) -> None:
    """A PRACT write bigger than one command (MDTS 5: 128 KiB): ILBRT of each piece."""
    data = rng.randbytes(ns.max_blocks * 2 * ns.lba_size + ns.lba_size)
    nlb = len(data) // ns.lba_size
    ns.write(200, data)
    assert ns.read(200, nlb) == data
    assert ns.pi is not None
    assert ns.read_metadata(200, nlb)[1] == ns.pi.generate(data, ns.lba_size, 200)


def test_pract_split_at_mdts(c1: Controller) -> None:
    _pract_piece(c1.namespace(1))
    _pract_piece(c1.namespace(3))


def test_cli_metadata_and_prinfo(cli: Cli, vfio_bdfs: list[str], tmp_path: Path) -> None:
    bdf = vfio_bdfs[1]
    data = rng.randbytes(2 * 4096)
    with Controller.open(bdf) as c:
        pif = c.namespace(1).pi
    assert pif is not None
    meta = pif.generate(data, 4096, 300, app_tag=7)
    (tmp_path / "d").write_bytes(data)
    (tmp_path / "m").write_bytes(meta)

    cli.ok("write", bdf, "-n", "1", "-s", "300", "-d", tmp_path / "d", "-M", tmp_path / "m",
           "-p", "7", "-a", "7", "-m", "0xffff")
    cli.ok("read", bdf, "-n", "1", "-s", "300", "-c", "2", "-d", tmp_path / "d2", "-M",
           tmp_path / "m2", "-p", "5")
    assert (tmp_path / "d2").read_bytes() == data and (tmp_path / "m2").read_bytes() == meta
    bad = bytearray(meta)
    bad[0] ^= 1
    (tmp_path / "m").write_bytes(bytes(bad))
    cli.fails("write", bdf, "-n", "1", "-s", "300", "-d", tmp_path / "d", "-M", tmp_path / "m",
              "-p", "4", "--retries", "0", message="End-to-end Guard Check Error")
    cli.fails("write", bdf, "-n", "2", "-s", "0", "-d", tmp_path / "d",
              message="give --metadata FILE, or --prinfo 8")
