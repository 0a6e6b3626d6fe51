"""The native table of mapped IOVA ranges (asked per command by the queue engine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iommu_dma.native import ffi, lib

K = 4096


@pytest.fixture
def table() -> Iterator[object]:
    t = lib.idma_maptable_new()
    yield t
    lib.idma_maptable_free(t)


def test_contains_inside_and_across_adjacent(table) -> None:
    assert lib.idma_maptable_add(table, 0x100000, 4 * K) == 0
    assert lib.idma_maptable_add(table, 0x100000 + 4 * K, 4 * K) == 0
    assert lib.idma_maptable_contains(table, 0x100000 + 8, 100) == 1
    assert lib.idma_maptable_contains(table, 0x100000 + 3 * K, 2 * K) == 1  # spans both
    assert lib.idma_maptable_contains(table, 0x100000, 8 * K) == 1
    assert lib.idma_maptable_contains(table, 0x100000, 8 * K + 1) == 0
    assert lib.idma_maptable_contains(table, 0x100000 - 1, 2) == 0
    assert lib.idma_maptable_contains(table, 0x100000, 0) == 0


def test_gap_is_not_covered(table) -> None:
    lib.idma_maptable_add(table, 0x200000, K)
    lib.idma_maptable_add(table, 0x200000 + 2 * K, K)
    assert lib.idma_maptable_contains(table, 0x200000, 3 * K) == 0
    assert lib.idma_maptable_contains(table, 0x200000 + K, 1) == 0


def test_overlap_refused_and_remove_exact(table) -> None:
    assert lib.idma_maptable_add(table, 0x300000, 2 * K) == 0
    assert lib.idma_maptable_add(table, 0x300000 + K, 2 * K) == -1
    assert lib.idma_maptable_add(table, 0x300000 - K, 2 * K) == -1
    assert lib.idma_maptable_remove(table, 0x300000, K) == -1
    assert lib.idma_maptable_remove(table, 0x300000, 2 * K) == 0
    assert lib.idma_maptable_count(table) == 0
    assert lib.idma_maptable_contains(table, 0x300000, 1) == 0


def test_many_ranges_stay_sorted(table) -> None:
    starts = [(i * 7919 % 1000) * 2 * K for i in range(1000)]
    for s in starts:
        assert lib.idma_maptable_add(table, s, K) == 0
    assert lib.idma_maptable_count(table) == 1000
    for s in starts:
        assert lib.idma_maptable_contains(table, s, K) == 1
        assert lib.idma_maptable_contains(table, s + K, 1) == 0
    assert ffi.NULL != table
