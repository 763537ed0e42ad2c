"""The page allocator: all-or-nothing allocation, and the free count returns to full."""
import random

import pytest

from ringlet.errors import ConfigError
from ringlet.kv_cache import PageAllocator


def test_free_count_returns_to_full_after_random_traffic():
    rng = random.Random(0)
    alloc = PageAllocator(37)
    held = []
    for _ in range(500):
        if held and rng.random() < 0.45:
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            pages = alloc.allocate(rng.randint(1, 9))
            if pages is not None:
                held.append(pages)
        in_use = [p for pages in held for p in pages]
        assert len(in_use) == len(set(in_use)), "a page was handed out twice"
        assert alloc.num_free + len(in_use) == 37
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == 37


def test_allocation_beyond_free_takes_nothing():
    alloc = PageAllocator(4)
    first = alloc.allocate(3)
    assert alloc.allocate(2) is None
    assert alloc.num_free == 1
    alloc.free(first)
    assert sorted(alloc.allocate(4)) == [0, 1, 2, 3]


def test_double_free_is_caught():
    alloc = PageAllocator(2)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(pages)


def test_empty_pool_is_a_config_error():
    with pytest.raises(ConfigError):
        PageAllocator(0)
