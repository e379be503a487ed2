"""LruIndex: the id -> slot table of the tier store's caches, in order of last use."""

import pytest

from edgekv.lru import LruIndex


def test_rows_leave_in_order_of_last_use_like_an_ordered_dict_moved_to_end():
    lru = LruIndex()
    lru.add([10, 11, 12, 13], [0, 1, 2, 3])
    lru.touch([lru[12], lru[10]])  # 12, then 10 become the most recent
    assert list(lru) == [11, 13, 12, 10]
    assert lru.oldest(2) == [11, 13]
    assert lru.oldest(99) == [11, 13, 12, 10]
    assert lru.oldest(0) == []


def test_pop_frees_the_slot_and_forgets_the_id():
    lru = LruIndex()
    lru.add([5, 6], [7, 3])
    assert lru.pop(5) == 7 and 5 not in lru and len(lru) == 1
    assert list(lru) == [6]
    with pytest.raises(KeyError):
        lru.pop(5)
    lru.add([8], [7])  # the slot is reused by another id
    assert list(lru) == [6, 8] and lru[8] == 7


def test_slots_of_gives_every_slot_or_none():
    lru = LruIndex()
    lru.add([1, 2, 3], [4, 5, 6])
    assert lru.slots_of([3, 1]) == [6, 4]
    assert lru.slots_of([2]) == [5]
    assert lru.slots_of([]) == []
    assert lru.slots_of([1, 9]) is None
    assert lru.get(9) is None and lru.get(2) == 5


def test_slots_beyond_the_first_thousands_grow_the_tables():
    lru = LruIndex()
    lru.add([1], [5000])
    lru.add([2], [3])
    lru.touch([5000])
    assert list(lru) == [2, 1]
    lru.clear()
    assert len(lru) == 0 and list(lru) == [] and 1 not in lru
