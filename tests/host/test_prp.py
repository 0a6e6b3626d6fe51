"""PRP construction (NVMe Base 2.0, 4.1.1): offsets, page crossings, list chaining."""

from __future__ import annotations

import pytest

from iommu_dma.native import ffi, lib

PAGE = 4096
LIST_IOVA = 0x7000_0000  # where the PRP list page "is" for the device


def build(addr: int, length: int, slots: int = 1024) -> tuple[int, int, list[int]]:
    lst = ffi.new("uint64_t[]", slots)
    prp1, prp2 = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    n = lib.idma_prp_build(addr, length, PAGE, lst, LIST_IOVA, slots, prp1, prp2)
    if n < 0:
        return n, 0, []
    return prp1[0], prp2[0], [lst[i] for i in range(n)]


def test_within_one_page() -> None:
    assert build(0x10000 + 8, 100) == (0x10008, 0, [])
    assert build(0x10000, PAGE) == (0x10000, 0, [])


def test_two_pages_use_prp2_as_data() -> None:
    assert build(0x10000, 2 * PAGE) == (0x10000, 0x11000, [])
    assert build(0x10000 + 0x800, PAGE) == (0x10800, 0x11000, [])


def test_three_pages_use_a_list() -> None:
    prp1, prp2, lst = build(0x10000 + 0x200, 2 * PAGE + 0x10)
    assert (prp1, prp2) == (0x10200, LIST_IOVA)
    assert lst == [0x11000, 0x12000]


def test_list_chains_to_next_list_page() -> None:
    per_page = PAGE // 8
    npages = per_page + 10                       # more entries than one list page holds
    prp1, prp2, lst = build(0x100000, npages * PAGE)
    data = [0x100000 + i * PAGE for i in range(1, npages)]
    assert prp2 == LIST_IOVA
    # slot 511 of the first list page points at the second list page
    assert lst[per_page - 1] == LIST_IOVA + per_page * 8
    assert lst[: per_page - 1] + lst[per_page:] == data


def test_full_list_page_does_not_chain_needlessly() -> None:
    per_page = PAGE // 8
    _, _, lst = build(0x100000, (per_page + 1) * PAGE)   # exactly 512 list entries
    assert len(lst) == per_page
    assert lst[-1] == 0x100000 + per_page * PAGE


@pytest.mark.parametrize("addr, length, err", [(0x10002, 8, -1), (0x10000, 0, -2)])
def test_rejects_misaligned_and_empty(addr: int, length: int, err: int) -> None:
    assert build(addr, length)[0] == err


def test_list_too_small() -> None:
    assert build(0x10000, 10 * PAGE, slots=4)[0] == -3


def test_rejects_bad_page_size_and_wrapping_range() -> None:
    lst = ffi.new("uint64_t[]", 4)
    prp1, prp2 = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    assert lib.idma_prp_build(0x10000, 8, 6000, lst, LIST_IOVA, 4, prp1, prp2) == -4
    assert lib.idma_prp_build(0x10000, 8, 2048, lst, LIST_IOVA, 4, prp1, prp2) == -4
    assert lib.idma_prp_build(2**64 - PAGE, 2 * PAGE, PAGE, lst, LIST_IOVA, 4, prp1, prp2) == -3
    assert lib.idma_prp_build(0x10000, 3 * PAGE, PAGE, ffi.NULL, LIST_IOVA, 4, prp1, prp2) == -3
