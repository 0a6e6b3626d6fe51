"""The native table of mapped IOVA ranges (asked per command by the queue engine)."""

from __future__ import annotations

import threading
import time
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


def test_refcount_new_ref_free() -> None:
    t = lib.idma_maptable_new()
    assert lib.idma_maptable_refs(t) == 1
    assert lib.idma_maptable_ref(t) == t and lib.idma_maptable_refs(t) == 2
    lib.idma_maptable_free(t)
    assert lib.idma_maptable_refs(t) == 1 and lib.idma_maptable_add(t, 0x1000, K) == 0
    lib.idma_maptable_free(t)                    # last reference: freed
    lib.idma_maptable_free(ffi.NULL)             # ignored


def test_concurrent_add_remove_and_contains() -> None:
    """Writers churn ranges (the array grows, moves and is reallocated) while readers ask
    about ranges that never change: every answer stays right (and ASan sees no race on the
    freed array under `make test-asan`)."""
    t = lib.idma_maptable_new()
    stable = [i * 4 * K for i in range(1, 400, 2)]          # odd slots: always mapped
    for s in stable:
        assert lib.idma_maptable_add(t, s, K) == 0
    stop = threading.Event()
    wrong: list[str] = []

    def writer(first: int) -> None:
        slots = [i * 4 * K + 2 * K for i in range(first, 4000, 2)]
        while not stop.is_set():
            for s in slots:
                if lib.idma_maptable_add(t, s, K) != 0:
                    wrong.append(f"add {s:#x}")
            for s in slots:
                if lib.idma_maptable_remove(t, s, K) != 0:
                    wrong.append(f"remove {s:#x}")

    def reader() -> None:
        while not stop.is_set():
            for s in stable:
                if lib.idma_maptable_contains(t, s, K) != 1:
                    wrong.append(f"lost {s:#x}")
                if lib.idma_maptable_contains(t, s + K, 1) != 0:
                    wrong.append(f"gap {s + K:#x}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    stop.set()
    for th in threads:
        th.join()
    assert not wrong[:5]
    assert lib.idma_maptable_count(t) >= len(stable)
    lib.idma_maptable_free(t)
