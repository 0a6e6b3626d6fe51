"""An example device test suite on iommu-dma's pytest fixtures (pynvme's names):

    pytest --pciaddr 0000:01:00.0 examples/test_device_example.py

It writes the namespace's last blocks: run it on a test device only.
"""

import os

import pytest

from iommu_dma import Namespace, NvmeError
from iommu_dma.nvme import sqe


def test_identify_matches_config_space(nvme0, pcie):
    assert nvme0.identify.vid == pcie.vendor_id
    assert nvme0.identify.sn.strip()


@pytest.mark.parametrize("buf", [4096, 65536], indirect=True)
def test_write_read_on_a_fresh_queue_pair(nvme0, qpair, buf):
    ns = Namespace(nvme0, 1, queue=qpair)
    nlb = len(buf) // ns.lba_size
    slba = ns.blocks - nlb
    data = os.urandom(len(buf))
    buf.view[:] = data
    ns.write_from(slba, buf, nlb)
    buf.view[:] = bytes(len(buf))
    ns.read_into(slba, buf, nlb)
    assert bytes(buf) == data


def test_an_unknown_opcode_fails_by_name(nvme0n1):
    with pytest.raises(NvmeError) as e:
        nvme0n1.command(sqe.Sqe(0x7F, 0))
    assert e.value.name == "Invalid Command Opcode"
