"""TierStore: rows of bytes in a device hot cache, RAM and disk, under byte budgets."""

import errno
import os
import random
import threading

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgekv.errors import BudgetError, DiskFullError, EdgekvError
from edgekv.sizes import format_size, parse_size
from edgekv.tiers import TierStore, check_budgets

ROW = 48  # bytes per row: small and not a power of two


def ids_of(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def rows_for(ids: torch.Tensor) -> torch.Tensor:
    """Distinct, reproducible bytes per id: uint8 [n, ROW]."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (ROW,), dtype=torch.uint8, generator=gen)
    return (base + ids[:, None] * 7 + torch.arange(ROW) * (ids[:, None] % 13 + 1)).to(torch.uint8)


def make_store(tmp_path, *, device_rows=4, ram_rows=8, disk_rows=1000, disk=True) -> TierStore:
    return TierStore(ROW, device_cache_bytes=device_rows * ROW, ram_bytes=ram_rows * ROW,
                     disk_dir=tmp_path if disk else None, disk_bytes=disk_rows * ROW)


class CallCounter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# ---- bytes round-trip -------------------------------------------------------------------

def test_rows_round_trip_through_ram_disk_and_device_cache(tmp_path):
    with make_store(tmp_path, device_rows=4, ram_rows=8) as store:
        ids = ids_of(range(50))
        store.put(ids, rows_for(ids))  # 42 rows spill to disk
        assert store.resident_bytes() == {"device": 0, "ram": 8 * ROW, "disk": 42 * ROW}
        assert len(store) == 50 and 49 in store and 50 not in store
        for chunk in (ids[:3], ids[40:], ids.flip(0), ids[10:14], ids[:3]):  # evicts the cache often
            got = store.get(chunk)
            assert got.dtype == torch.uint8 and got.device.type == "cpu"
            assert torch.equal(got, rows_for(chunk))
        assert store.resident_bytes()["device"] == 4 * ROW


def test_put_larger_than_ram_budget_sends_oldest_rows_to_disk(tmp_path):
    with make_store(tmp_path, ram_rows=3) as store:
        store.put(ids_of([1, 2]), rows_for(ids_of([1, 2])))
        store.put(ids_of([3, 4, 5, 6]), rows_for(ids_of([3, 4, 5, 6])))
        assert set(store._ram) == {4, 5, 6} and set(store._disk) == {1, 2, 3}
        assert torch.equal(store.get(ids_of([6, 1, 3])), rows_for(ids_of([6, 1, 3])))


def test_get_touches_ram_rows_so_the_least_recently_used_spill(tmp_path):
    with make_store(tmp_path, ram_rows=3, device_rows=1) as store:
        store.put(ids_of([1, 2, 3]), rows_for(ids_of([1, 2, 3])))
        store.get(ids_of([1]))
        store.put(ids_of([4]), rows_for(ids_of([4])))
        assert 2 in store._disk and 1 in store._ram


def test_freed_slots_are_reused_and_free_forgets_rows(tmp_path):
    with make_store(tmp_path, ram_rows=2, disk_rows=4) as store:
        ids = ids_of(range(6))
        store.put(ids, rows_for(ids))
        store.get(ids_of([0, 5]))
        store.free(ids_of([0, 1, 5]))
        assert len(store) == 3 and 0 not in store
        assert store.resident_bytes()["device"] == 0  # cached copies of freed rows are gone
        with pytest.raises(KeyError):
            store.get(ids_of([0]))
        store.put(ids_of([5]), 255 - rows_for(ids_of([5])))  # an id may come back with new bytes
        assert torch.equal(store.get(ids_of([5])), 255 - rows_for(ids_of([5])))
        store.free(ids_of([5]))
        new = ids_of(range(10, 13))
        store.put(new, rows_for(new))  # fits only because the freed slots came back
        assert torch.equal(store.get(ids_of([2, 3, 4, 10, 11, 12])), rows_for(ids_of([2, 3, 4, 10, 11, 12])))


def test_bad_arguments_are_rejected(tmp_path):
    with make_store(tmp_path) as store:
        store.put(ids_of([1]), rows_for(ids_of([1])))
        with pytest.raises(ValueError, match="already stored"):
            store.put(ids_of([1]), rows_for(ids_of([1])))
        with pytest.raises(ValueError, match="unique"):
            store.get(ids_of([1, 1]))
        with pytest.raises(TypeError):
            store.get(torch.tensor([1], dtype=torch.int32))
        with pytest.raises(ValueError):
            store.put(ids_of([2]), torch.zeros(1, ROW + 1, dtype=torch.uint8))
        with pytest.raises(KeyError):
            store.prefetch(ids_of([1, 99]))
        assert store.get(ids_of([])).shape == (0, ROW)


def test_ram_pool_grows_instead_of_taking_its_budget_up_front(tmp_path):
    with TierStore(ROW, device_cache_bytes=ROW, ram_bytes=1 << 30, disk_dir=None, disk_bytes=0) as store:
        assert store.stats()["allocated_bytes"]["ram"] == 0
        ids = ids_of(range(100))
        store.put(ids, rows_for(ids))
        assert 100 * ROW <= store.stats()["allocated_bytes"]["ram"] <= 4 << 20
        assert torch.equal(store.get(ids), rows_for(ids))


# ---- budgets ----------------------------------------------------------------------------

class BudgetMachine(RuleBasedStateMachine):
    """Random put/get/prefetch/free against a dict model: budgets hold, bytes come back."""

    RAM_ROWS, DEVICE_ROWS, DISK_ROWS = 5, 3, 12

    @initialize(disk=st.booleans())
    def open_store(self, disk):
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.store = TierStore(ROW, device_cache_bytes=self.DEVICE_ROWS * ROW + 7,
                               ram_bytes=self.RAM_ROWS * ROW + 5, disk_dir=self.dir if disk else None,
                               disk_bytes=self.DISK_ROWS * ROW + 3)
        self.capacity = self.RAM_ROWS + (self.DISK_ROWS if disk else 0)
        self.live: set[int] = set()
        self.next_id = 0

    @rule(n=st.integers(0, 7))
    def put(self, n):
        ids = ids_of(range(self.next_id, self.next_id + n))
        self.next_id += n
        if len(self.live) + n > self.capacity:
            with pytest.raises(BudgetError, match="--ram"):
                self.store.put(ids, rows_for(ids))
        else:
            self.store.put(ids, rows_for(ids))
            self.live.update(ids.tolist())

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def get(self, data):
        chosen = ids_of(data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True, max_size=6)))
        assert torch.equal(self.store.get(chosen), rows_for(chosen))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def prefetch(self, data):
        self.store.prefetch(ids_of(data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True, max_size=6))))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True, max_size=4))
        self.store.free(ids_of(chosen))
        self.live.difference_update(chosen)

    @invariant()
    def budgets_hold_and_rows_are_all_there(self):
        resident = self.store.resident_bytes()
        assert resident["device"] <= self.DEVICE_ROWS * ROW + 7
        assert resident["ram"] <= self.RAM_ROWS * ROW + 5
        assert resident["disk"] <= self.DISK_ROWS * ROW + 3
        assert resident["ram"] + resident["disk"] == len(self.live) * ROW
        assert len(self.store) == len(self.live)
        every = ids_of(sorted(self.live))
        assert torch.equal(self.store.get(every), rows_for(every))

    def teardown(self):
        self.store.close()
        assert os.listdir(self.dir) == []
        os.rmdir(self.dir)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_too_small_budgets_name_the_minimum():
    with pytest.raises(BudgetError, match=r"at least 8 KiB .*--ram"):
        check_budgets(1024, min_ram_rows=8, device_cache_bytes=1 << 20, ram_bytes=4096,
                      disk_bytes=0, has_disk=False)
    with pytest.raises(BudgetError, match=r"1 KiB \(1024 bytes\)"):
        check_budgets(1024, min_ram_rows=1, device_cache_bytes=1000, ram_bytes=1 << 20,
                      disk_bytes=0, has_disk=False)
    with pytest.raises(BudgetError, match="--disk-bytes"):
        check_budgets(1024, min_ram_rows=1, device_cache_bytes=1024, ram_bytes=1024,
                      disk_bytes=100, has_disk=True)
    check_budgets(1024, min_ram_rows=8, device_cache_bytes=1024, ram_bytes=8192, disk_bytes=0, has_disk=False)
    with pytest.raises(BudgetError, match="device cache"):
        TierStore(ROW, device_cache_bytes=ROW - 1, ram_bytes=ROW, disk_dir=None, disk_bytes=0)


def test_full_ram_without_disk_is_a_budget_error_that_changes_nothing(tmp_path):
    with make_store(tmp_path, ram_rows=4, disk=False) as store:
        store.put(ids_of(range(3)), rows_for(ids_of(range(3))))
        with pytest.raises(BudgetError, match=r"no disk tier.*raise --ram or --disk-dir/--disk-bytes"):
            store.put(ids_of(range(3, 5)), rows_for(ids_of(range(3, 5))))
        assert len(store) == 3 and 3 not in store
        assert torch.equal(store.get(ids_of(range(3))), rows_for(ids_of(range(3))))


@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("100KB", 100_000),
    ("4096", 4096), ("0", 0), ("3 tib", 3 << 40), ("1.5gib", 3 << 29), ("7B", 7), (" 64 KiB ", 65536),
])
def test_parse_size_accepts_numbers_with_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-1GiB", "1.5", "2 GiBs", "1e9", "0x10", "nan"])
def test_parse_size_rejects_bad_text_with_a_hint(text):
    with pytest.raises(EdgekvError, match=r"invalid size .*512MiB or 2GiB"):
        parse_size(text)


def test_format_size_uses_binary_units():
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(4096) == "4 KiB"
    assert format_size(100) == "100 B"
    assert format_size(parse_size("512MiB")) == "512 MiB"


# ---- batched I/O ------------------------------------------------------------------------

def test_hundred_disk_rows_move_in_one_write_one_read_and_one_device_copy(tmp_path, monkeypatch):
    with make_store(tmp_path, ram_rows=10, device_rows=200) as store:
        writes = CallCounter(os.pwrite)
        monkeypatch.setattr(os, "pwrite", writes)
        ids = ids_of(range(110))
        store.put(ids, rows_for(ids))
        assert writes.calls == 1 and len(store._disk) == 100

        reads, copies = CallCounter(os.preadv), CallCounter(store._to_device)
        monkeypatch.setattr(os, "preadv", reads)
        monkeypatch.setattr(store, "_to_device", copies)
        on_disk = ids_of(random.Random(0).sample(range(100), 100))  # shuffled request order
        assert torch.equal(store.get(on_disk), rows_for(on_disk))
        assert reads.calls == 1 and copies.calls == 1



def test_a_read_costs_one_preadv_per_run_of_consecutive_disk_slots(tmp_path, monkeypatch):
    with make_store(tmp_path, ram_rows=10, device_rows=1) as store:
        ids = ids_of(range(110))
        store.put(ids, rows_for(ids))  # ids 0..99 in disk slots 0..99, 100..109 in RAM
        reads, copies = CallCounter(os.preadv), CallCounter(store._to_device)
        monkeypatch.setattr(os, "preadv", reads)
        monkeypatch.setattr(store, "_to_device", copies)
        wanted = ids_of([90, 105, 2, 50, 0, 51, 1])  # runs: slots 0-2, 50-51, 90
        assert torch.equal(store.get(wanted), rows_for(wanted))
        assert reads.calls == 3 and copies.calls == 1


# ---- disk full --------------------------------------------------------------------------

def test_disk_full_raises_and_keeps_the_store_consistent(tmp_path, monkeypatch):
    store = make_store(tmp_path, ram_rows=4)
    first = ids_of(range(4))
    store.put(first, rows_for(first))

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(DiskFullError, match="disk is full"):
        store.put(ids_of([10, 11]), rows_for(ids_of([10, 11])))
    assert len(store) == 4 and 10 not in store and 11 not in store
    assert store.resident_bytes()["disk"] == 0
    assert torch.equal(store.get(first), rows_for(first))

    monkeypatch.undo()
    store.put(ids_of([10, 11]), rows_for(ids_of([10, 11])))
    assert torch.equal(store.get(ids_of([0, 1, 10, 11])), rows_for(ids_of([0, 1, 10, 11])))
    store.close()
    assert os.listdir(tmp_path) == []


def test_disk_failure_midway_through_a_batch_records_nothing(tmp_path, monkeypatch):
    with make_store(tmp_path, ram_rows=2, device_rows=1, disk_rows=5) as store:
        ids = ids_of(range(6))
        store.put(ids, rows_for(ids))  # ids 0..3 in disk slots 0..3
        store.free(ids_of([1]))  # slot 1 free: the next two spills go to slots 1 and 4
        real_pwrite, calls = os.pwrite, []

        def fail_second(fd, data, offset):
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.EIO, "I/O error")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", fail_second)
        with pytest.raises(DiskFullError, match="writing failed"):
            store.put(ids_of([6, 7]), rows_for(ids_of([6, 7])))
        assert calls == [1 * ROW, 4 * ROW]
        assert set(store._ram) == {4, 5} and set(store._disk) == {0, 2, 3}
        monkeypatch.undo()
        store.put(ids_of([6, 7]), rows_for(ids_of([6, 7])))  # the two slots were given back
        live = ids_of([0, 2, 3, 4, 5, 6, 7])
        assert torch.equal(store.get(live), rows_for(live))


def test_close_removes_the_disk_file_and_is_idempotent(tmp_path):
    store = make_store(tmp_path, ram_rows=1)
    store.put(ids_of(range(5)), rows_for(ids_of(range(5))))
    assert os.path.getsize(store.disk_path) == 4 * ROW
    store.close()
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        store.get(ids_of([0]))


# ---- prefetch ---------------------------------------------------------------------------

def test_prefetch_then_get_reads_each_row_once_and_counts_hits(tmp_path):
    with make_store(tmp_path, ram_rows=4, device_rows=16) as store:
        ids = ids_of(range(12))
        store.put(ids, rows_for(ids))  # 8 on disk, 4 in RAM
        store.reset_counters()
        store.prefetch(ids[2:10])
        got = store.get(ids)
        assert torch.equal(got, rows_for(ids))
        stats = store.stats()
        assert stats["prefetched_rows"] == 8 and stats["prefetch_hits"] == 8
        assert stats["device_hits"] == 8 and stats["device_misses"] == 4
        assert stats["bytes_read"]["disk"] + stats["bytes_read"]["ram"] == 12 * ROW  # nothing twice
        store.get(ids[2:4])
        assert store.stats()["prefetch_hits"] == 8  # a hit counts once per prefetched row


def test_a_prefetch_is_done_when_it_returns_and_takes_room_in_the_device_cache(tmp_path):
    with make_store(tmp_path, ram_rows=8, device_rows=6) as store:
        ids = ids_of(range(10))
        store.put(ids, rows_for(ids))  # 0, 1 spill to disk; 2..9 in RAM
        assert store.device_room() == 6
        assert store.prefetch(ids[4:8]) == 4  # copied before prefetch returns: the store runs no thread
        assert store.stats()["prefetched_rows"] == 4 and store.device_room() == 2
        assert store.prefetch(ids[0:2]) == 2  # disk rows the same way
        assert store.prefetch(ids[0:2]) == 0  # nothing twice
        assert store.device_room() == 0
        assert torch.equal(store.get(ids[0:8]), rows_for(ids[0:8]))
        stats = store.stats()
        assert stats["prefetch_hits"] == 6 and stats["device_misses"] == 2


# ---- reserve / fill / publish: a backend's own copies ----------------------------------------

def test_reserved_rows_are_read_only_once_published_and_get_waits_for_them(tmp_path):
    with make_store(tmp_path, ram_rows=4, device_rows=4) as store:
        ids = ids_of(range(6))
        store.put(ids, rows_for(ids))  # 0, 1 on disk
        res = store.reserve(ids_of([0, 3]))
        assert sorted(res.ids) == [0, 3] and torch.equal(res.rows, rows_for(ids_of(res.ids)))
        assert store.reserve(ids_of([0, 3])) is None  # arriving already
        assert store.device_room() == 2
        with store.cached_rows(ids_of([3])) as cached:
            assert cached is None  # not readable before publish
        got = []
        reader = threading.Thread(target=lambda: got.append(store.get(ids_of([3, 5]))))
        reader.start()
        reader.join(timeout=0.2)
        assert reader.is_alive()  # get waits for the arriving row
        store.fill(res)
        store.publish(res)
        reader.join(timeout=5)
        assert torch.equal(got[0], rows_for(ids_of([3, 5])))
        stats = store.stats()
        assert stats["prefetched_rows"] == 2 and stats["prefetch_hits"] == 1


def test_an_abandoned_reservation_gives_its_slots_back(tmp_path):
    with make_store(tmp_path, ram_rows=8, device_rows=3) as store:
        ids = ids_of(range(5))
        store.put(ids, rows_for(ids))
        res = store.reserve(ids)  # more than the cache holds: the last three
        assert res.ids == [2, 3, 4] and store.device_room() == 0
        store.abandon(res)
        assert store.device_room() == 3 and store.resident_bytes()["device"] == 0
        assert torch.equal(store.get(ids), rows_for(ids))


def test_device_tables_say_where_each_row_is(tmp_path):
    with TierStore(ROW, device_cache_bytes=3 * ROW, ram_bytes=4 * ROW, disk_dir=tmp_path, disk_bytes=100 * ROW,
                   id_space=16) as store:
        ids = ids_of(range(6))
        store.put(ids, rows_for(ids))  # 0, 1 spill to disk

        def check() -> None:  # the tables agree with the store's host-side placement
            for i in range(16):
                slot = store._dev.get(i)
                assert int(store.slot_table[i]) == (-1 if slot is None else slot), i
                ram = store._ram.get(i)
                assert int(store.ram_table[i]) == (-1 if ram is None else ram), i
                if slot is not None:
                    assert torch.equal(store.device_rows[slot], rows_for(ids_of([i]))[0])
                if ram is not None:
                    assert torch.equal(store.ram_rows[ram], rows_for(ids_of([i]))[0])

        check()
        assert (store.ram_table[:2] == -1).all() and store.has_disk_rows
        store.get(ids_of([0, 4, 5]))
        check()
        store.get(ids_of([1, 2]))  # evicts two of the three cached copies
        check()
        res = store.reserve(ids_of([3]))  # evicts one more; the new row reads -1 until published
        assert int(store.slot_table[3]) == -1
        store.fill(res)
        store.publish(res)
        check()
        store.free(ids_of([2, 3]))
        check()
        more = ids_of([8, 9, 10])
        store.put(more, rows_for(more))  # spills RAM rows to disk
        check()


def test_touch_makes_rows_read_in_place_the_most_recent(tmp_path):
    with make_store(tmp_path, ram_rows=8, device_rows=2) as store:
        ids = ids_of(range(4))
        store.put(ids, rows_for(ids))
        store.get(ids_of([0, 1]))  # cached; 0 is the older
        store.touch(ids_of([0, 99]))  # a reader used row 0 in place (99: no such row, skipped)
        store.get(ids_of([2]))  # evicts the least recently used copy: 1
        assert 0 in store._dev and 1 not in store._dev


def test_cached_rows_are_read_in_place_like_get_reads_them(tmp_path):
    with make_store(tmp_path, ram_rows=8, device_rows=6) as store:
        ids = ids_of(range(8))
        store.put(ids, rows_for(ids))
        store.get(ids[2:6])  # cached on the device
        store.reset_counters()
        with store.cached_rows(ids_of([5, 2, 3])) as cached:
            pool, slots = cached
            assert torch.equal(pool[slots], rows_for(ids_of([5, 2, 3])))
            held = threading.Thread(target=store.prefetch, args=(ids[6:8],))  # would evict while we read
            held.start()
            held.join(timeout=0.2)
            assert held.is_alive()  # the store's lock is ours until the block ends
        held.join()
        stats = store.stats()
        assert stats["device_hits"] == 3 and stats["bytes_read"]["device"] == 3 * ROW
        with store.cached_rows(ids_of([2, 0])) as cached:  # 0 is not cached: read it with get
            assert cached is None
        assert torch.equal(store.get(ids_of([2, 0])), rows_for(ids_of([2, 0])))


def test_prefetch_and_get_from_two_threads_stay_consistent(tmp_path):
    with make_store(tmp_path, ram_rows=20, device_rows=10, disk_rows=200) as store:
        ids = ids_of(range(100))
        store.put(ids, rows_for(ids))
        errors = []

        def worker(seed):
            rng = random.Random(seed)
            try:
                for step in range(150):
                    chosen = ids_of(rng.sample(range(100), rng.randint(1, 15)))
                    if step % 2:
                        store.prefetch(chosen)
                    assert torch.equal(store.get(chosen), rows_for(chosen))
                    if seed == 1 and step % 10 == 0:  # churn: free and re-put ids of its own
                        own = ids_of([100 + step])
                        store.put(own, rows_for(own))
                        assert torch.equal(store.get(own), rows_for(own))
                        store.free(own)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(store) == 100 and store.resident_bytes()["device"] <= 10 * ROW
        assert torch.equal(store.get(ids), rows_for(ids))


# ---- stats ------------------------------------------------------------------------------

def test_stats_count_the_bytes_each_tier_served(tmp_path):
    with make_store(tmp_path, ram_rows=6, device_rows=32) as store:
        ids = ids_of(range(20))
        store.put(ids, rows_for(ids))
        stats = store.stats()
        assert stats["bytes_written"]["disk"] == 14 * ROW
        store.reset_counters()
        store.get(ids_of([0, 1, 2, 15, 16]))  # 3 from disk, 2 from RAM
        stats = store.stats()
        assert stats["bytes_read"] == {"device": 0, "ram": 2 * ROW, "disk": 3 * ROW}
        assert stats["bytes_to_device"] == 0  # the device is the CPU: nothing crosses a bus
        assert (stats["device_hits"], stats["device_misses"]) == (0, 5)
        store.get(ids_of([0, 1, 3]))  # two cached, one more from disk
        stats = store.stats()
        assert stats["bytes_read"] == {"device": 2 * ROW, "ram": 2 * ROW, "disk": 4 * ROW}
        assert (stats["device_hits"], stats["device_misses"]) == (2, 6)
        assert set(stats["seconds"]) == set(stats["gbps"])
        assert all(stats["gbps"][tier] > 0 for tier in ("device", "ram", "disk"))  # each served bytes
        assert stats["gbps"]["to_device"] == 0  # nothing crossed a bus
        store.reset_counters()
        assert store.stats()["bytes_read"] == {"device": 0, "ram": 0, "disk": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_store_keeps_the_cache_on_the_gpu_and_ram_pinned(tmp_path):
    with TierStore(ROW, device_cache_bytes=8 * ROW, ram_bytes=16 * ROW, disk_dir=tmp_path,
                   disk_bytes=100 * ROW, device="cuda", pin_ram=True, id_space=64) as store:
        ids = ids_of(range(60))
        store.put(ids, rows_for(ids).cuda())
        assert store._ram_pool.rows.is_pinned()
        store.prefetch(ids[:8])
        got = store.get(ids)
        assert got.is_cuda and torch.equal(got.cpu(), rows_for(ids))
        assert torch.equal(store.get(ids[-8:]).cpu(), rows_for(ids[-8:]))  # all device-cache hits
        stats = store.stats()
        assert stats["bytes_to_device"] == 60 * ROW  # 8 prefetched + 52 misses, each copied once
        assert (stats["device_hits"], stats["prefetch_hits"]) == (16, 8)
