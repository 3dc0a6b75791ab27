"""give_back_host_memory returns the C heap's freed pages to the system (glibc), which plain free() keeps."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from library.io import host_memory

MiB = 2**20
pytestmark = pytest.mark.skipif(
    host_memory._TRIM is None or host_memory.resident_bytes() is None,
    reason="needs glibc's malloc_trim and /proc (Linux)",
)


def test_freed_heap_holes_go_back_to_the_system():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 2048  # blocks below glibc's mmap threshold: they live in the heap
    start = host_memory.resident_bytes()
    blocks = []
    for _ in range(2 * count):
        p = libc.malloc(block)
        ctypes.memset(p, 1, block)  # touched: resident
        blocks.append(p)
    held = host_memory.resident_bytes()
    assert held - start > 100 * MiB  # less where a block reused a freed page still resident
    # every other block freed: each hole sits between two live blocks, so free() cannot trim it
    freed, live = blocks[0::2], blocks[1::2]
    for p in freed:
        libc.free(p)
    try:
        given = host_memory.give_back_host_memory("test")
        after = host_memory.resident_bytes()
    finally:
        for p in live:
            libc.free(p)
    assert given is not None and given > 100 * MiB  # of the 128 MiB freed
    assert after - start < 128 * MiB + 28 * MiB


def test_resident_bytes_reads_this_process():
    rss = host_memory.resident_bytes()
    assert rss is not None and 10 * MiB < rss < 2**40
