"""Tiered store of fixed-size byte rows: device hot cache, host RAM, disk.

A row is `row_bytes` uint8 bytes (one compressed KV block of one KV head; the store knows
nothing about its layout) named by a non-negative int64 id that the caller chooses.
Budgets are bytes; sizes given by users go through `edgekv.sizes.parse_size` ("512MiB", "2GiB").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import os
import re
import tempfile
import threading
import time
import weakref

import numpy as np
import torch

from edgekv.errors import BudgetError, DiskFullError, EdgekvError
from edgekv.lru import LruIndex
from edgekv.sizes import format_size

_IOV_MAX = 1024  # buffers per os.preadv call (the Linux limit)
_GROW_ROWS_MIN = 1 << 20  # bytes a growing pool adds at least, rounded to rows


def check_budgets(row_bytes: int, *, min_ram_rows: int, device_cache_bytes: int, ram_bytes: int,
                  disk_bytes: int, has_disk: bool) -> None:
    """Raise BudgetError, naming the minimum, when a budget cannot run at all.

    min_ram_rows: rows that must fit in RAM at once (the engine passes one layer's worth).
    """
    need_ram = min_ram_rows * row_bytes
    if ram_bytes < need_ram:
        raise BudgetError(
            f"RAM budget {format_size(ram_bytes)} is too small: at least {format_size(need_ram)} "
            f"({need_ram} bytes = {min_ram_rows} KV rows x {row_bytes} bytes) must fit in RAM; "
            f"raise --ram to at least {format_size(need_ram)}")
    if device_cache_bytes < row_bytes:
        raise BudgetError(
            f"device cache budget {format_size(device_cache_bytes)} is too small: it must hold at "
            f"least one KV row of {format_size(row_bytes)} ({row_bytes} bytes); raise --device-cache")
    if has_disk and disk_bytes < row_bytes:
        raise BudgetError(
            f"disk budget {format_size(disk_bytes)} holds no KV row of {format_size(row_bytes)} "
            f"({row_bytes} bytes): raise --disk-bytes or leave out --disk-dir")


class _Slots:
    """Slot numbers 0..max_slots-1 with a free list; the lowest free slots go out first, so
    rows stored together tend to sit in consecutive slots."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.high_water = 0  # slots >= high_water were never handed out
        self._free: list[int] = []  # heap

    def num_free(self) -> int:
        return self.max_slots - self.high_water + len(self._free)

    def take(self, n: int) -> list[int]:
        """n slots, ascending; the caller has checked num_free()."""
        assert n <= self.num_free(), (n, self.num_free())
        out = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        extra = n - len(out)
        out.extend(range(self.high_water, self.high_water + extra))
        self.high_water += extra
        return out

    def give_back(self, slots: list[int]) -> None:
        for slot in slots:
            heapq.heappush(self._free, slot)


class _RowPool:
    """One uint8 tensor `rows: [capacity, row_bytes]` on one device with a slot allocator.

    Grows geometrically (new tensor + copy) up to `max_rows` unless preallocated; a pinned
    pool waits for the GPU before it lets go of the old tensor (kernels read it in place)."""

    def __init__(self, row_bytes: int, max_rows: int, device: torch.device, *, pin: bool,
                 preallocate: bool):
        self.row_bytes, self.max_rows, self.device, self.pin = row_bytes, max_rows, device, pin
        self.slots = _Slots(max_rows)
        self.rows = self._alloc(max_rows if preallocate else 0)

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, self.row_bytes), dtype=torch.uint8, device=self.device,
                           pin_memory=self.pin)

    def take(self, n: int) -> list[int]:
        slots = self.slots.take(n)
        capacity = self.rows.shape[0]
        if slots and slots[-1] >= capacity:
            try:
                min_growth = max(1, _GROW_ROWS_MIN // self.row_bytes)
                new = self._alloc(min(self.max_rows, max(slots[-1] + 1, 2 * capacity, min_growth)))
            except BaseException:
                self.slots.give_back(slots)
                raise
            new[:capacity].copy_(self.rows)
            if self.pin:  # a GPU may be reading the old pinned pool in place: let it finish first
                torch.cuda.synchronize()
            self.rows = new
        return slots


def _runs(slots: list[int]):
    """(start, stop) index ranges of `slots` whose values are consecutive integers."""
    start = 0
    for k in range(1, len(slots) + 1):
        if k == len(slots) or slots[k] != slots[k - 1] + 1:
            yield start, k
            start = k


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data, offset = data[written:], offset + written


def _close_file(fd: int, path: str | None) -> None:
    with contextlib.suppress(OSError):
        if fd >= 0:
            os.close(fd)
        if path is not None:
            os.unlink(path)


def _word_dtype(row_bytes: int) -> torch.dtype:
    """The widest integer type that tiles a row: row gathers and scatters on uint8 [n, row_bytes]
    run much faster on a view of it (torch copies a uint8 row element by element)."""
    return next(d for d, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1))
                if row_bytes % size == 0)


def _id_list(ids: torch.Tensor) -> list[int]:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        raise TypeError(f"ids must be an int64 tensor [n], got {getattr(ids, 'dtype', type(ids))} "
                        f"{list(getattr(ids, 'shape', []))}")
    out = ids.tolist()
    if len(set(out)) != len(out):
        raise ValueError("ids must be unique")
    if out and min(out) < 0:
        raise ValueError("ids must be non-negative")
    return out


@dataclasses.dataclass
class _Counters:
    bytes_read: dict = dataclasses.field(default_factory=lambda: dict(device=0, ram=0, disk=0))
    bytes_written: dict = dataclasses.field(default_factory=lambda: dict(disk=0))
    bytes_to_device: int = 0
    seconds: dict = dataclasses.field(default_factory=lambda: dict(
        device=0.0, ram=0.0, disk=0.0, disk_write=0.0, to_device=0.0))
    device_hits: int = 0
    device_misses: int = 0
    prefetched_rows: int = 0
    prefetch_hits: int = 0


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Device-cache slots taken for rows on their way there (`TierStore.reserve`).

    ids: the rows; slots: int64 [n] device-cache slots, on the store's device;
    rows: uint8 [n, row_bytes], their bytes gathered on the host (pinned with a pinned RAM
    home), row j for ids[j]. Until `publish`, the rows are *arriving*: get() waits for
    them and the device tables still say they are not on the device.
    """

    ids: list[int]
    slots: torch.Tensor
    rows: torch.Tensor


class TierStore:
    """Rows of `row_bytes` bytes kept in RAM or on disk, with hot copies on the device.

    Where a row can live (every row has exactly one home, RAM or disk; the device cache
    only holds copies, so evicting from it loses nothing):

        put(ids, rows) ──► RAM home ── LRU spill, one pwrite per run of slots ──► disk home
                           uint8 [capacity, row_bytes]              file: slot k at k*row_bytes
                           (pinned with pin_ram, grows x2)                     │
                              │ one index_select                  one preadv per run of slots
                              ▼                                                ▼
                           host staging [misses, row_bytes] = [RAM misses | disk misses]
                              │ one copy to the device (get, prefetch), or the caller's own
                              ▼ copy between reserve() and publish()
        get(ids) ◄──────── device hot cache, LRU copies
                           uint8 [capacity, row_bytes] (on the GPU with CUDA, else RAM)

    The store owns placement and bytes: which tier holds a row, the pools, the budgets,
    the LRU orders and the counters. It runs nothing in the background and knows no
    streams: a decode backend (`edgekv.backends`) decides when rows move. `prefetch`
    copies rows to the device cache at once; `reserve` / `publish` let a backend do that
    copy itself, outside the store's lock (on a CUDA copy stream): reserve takes device
    slots (evicting least recently used copies) and gathers the rows' bytes on the host,
    publish makes the copied rows readable.

    With ``id_space`` the store also keeps its placement as two device tensors that a
    backend reads with a gather instead of asking the host:

        slot_table  int32 [id_space]   device-cache slot of each id, -1 = not there
        ram_table   int32 [id_space]   RAM-home slot of each id, -1 = not in RAM

    They are updated (stream-ordered, on the calling thread's current stream) wherever
    placement changes; an evicted slot reads -1 before anything new is copied into it.

    Both the device cache and the RAM home are LRU (`edgekv.lru.LruIndex`: a read stamps
    its slots in one array write); get() touches both, `touch` records reads a backend
    did in place. All methods are thread-safe (one lock).

    With ``scratch_rows`` the first device-cache slots (`scratch_slots`) are held apart
    for rows a backend writes there itself (K/V rows recomputed on the device,
    `edgekv.recompute`): no id names them, nothing evicts them, and the cache's room for
    copies is that much smaller.
    """

    def __init__(self, row_bytes: int, *, device_cache_bytes: int, ram_bytes: int,
                 disk_dir: str | os.PathLike | None, disk_bytes: int,
                 device: torch.device | str = "cpu", pin_ram: bool = False, id_space: int | None = None,
                 scratch_rows: int = 0):
        if row_bytes <= 0 or min(device_cache_bytes, ram_bytes, disk_bytes) < 0:
            raise ValueError("row_bytes must be positive and budgets non-negative")
        has_disk = disk_dir is not None
        check_budgets(row_bytes, min_ram_rows=0, device_cache_bytes=device_cache_bytes,
                      ram_bytes=ram_bytes, disk_bytes=disk_bytes, has_disk=has_disk)
        self.row_bytes = row_bytes
        self.device = torch.device(device)
        self._word = _word_dtype(row_bytes)
        self._pin = pin_ram and torch.cuda.is_available()
        self._budgets = dict(device=device_cache_bytes, ram=ram_bytes, disk=disk_bytes if has_disk else 0)
        self._dev_pool = _RowPool(row_bytes, device_cache_bytes // row_bytes, self.device,
                                  pin=False, preallocate=self.device.type == "cuda")
        if scratch_rows >= self._dev_pool.max_rows:
            raise BudgetError(f"device cache budget {format_size(device_cache_bytes)} holds no row besides the "
                              f"{scratch_rows} scratch rows ({format_size(scratch_rows * row_bytes)}); "
                              f"raise --device-cache")
        self.scratch_slots = torch.tensor(self._dev_pool.take(scratch_rows), dtype=torch.int64, device=self.device)
        self._dev_capacity = self._dev_pool.max_rows - scratch_rows  # slots for cached copies
        self._ram_pool = _RowPool(row_bytes, ram_bytes // row_bytes, torch.device("cpu"),
                                  pin=self._pin, preallocate=False)
        self._disk_slots = _Slots(self._budgets["disk"] // row_bytes)
        self._dev = LruIndex()  # id -> device slot, in order of last use
        self._ram = LruIndex()  # id -> RAM slot, in order of last use
        self._disk: dict[int, int] = {}  # id -> disk slot
        self._fd, self.disk_path = -1, None
        if has_disk:
            try:
                os.makedirs(disk_dir, exist_ok=True)
                self._fd, self.disk_path = tempfile.mkstemp(prefix="edgekv-", suffix=".tier", dir=disk_dir)
            except OSError as e:
                raise EdgekvError(f"cannot create the KV disk tier file in {disk_dir}: "
                                  f"{e.strerror or e}; pass a writable --disk-dir") from e
        self._finalizer = weakref.finalize(self, _close_file, self._fd, self.disk_path)
        self._lock = threading.RLock()
        self._published = threading.Condition(self._lock)  # notified when arriving rows land
        self._arriving: dict[int, int] = {}  # id -> reserved device slot, until publish()
        self._prefetched: set[int] = set()  # cached by a prefetch and not yet read
        self.slot_table = self.ram_table = None
        if id_space is not None:
            self.slot_table = torch.full((id_space,), -1, dtype=torch.int32, device=self.device)
            self.ram_table = torch.full((id_space,), -1, dtype=torch.int32, device=self.device)
        self._counters = _Counters()
        self._closed = False

    # ---- public API -------------------------------------------------------------------

    def put(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Store new rows. ids: int64 [n], not stored yet; rows: uint8 [n, row_bytes], any device.

        New rows go to RAM; the least recently used RAM rows (older ones first, then the
        first of these) spill to disk in one batched write. Raises BudgetError when RAM and
        disk cannot hold them, DiskFullError when the write fails; either way nothing changed.
        """
        id_list, rb = _id_list(ids), self.row_bytes
        if rows.dtype != torch.uint8 or tuple(rows.shape) != (len(id_list), rb):
            raise ValueError(f"rows must be uint8 [{len(id_list)}, {rb}], got {rows.dtype} {list(rows.shape)}")
        host = rows.to("cpu").contiguous()
        with self._lock:
            self._check_open()
            stored = [i for i in id_list if i in self._ram or i in self._disk]
            if stored:
                raise ValueError(f"ids already stored (free them first): {stored[:8]}")
            num_spill = max(0, len(self._ram) + len(id_list) - self._ram_pool.max_rows)
            spilled_new: dict[int, int] = {}
            if num_spill:
                self._check_disk_room(num_spill, len(id_list))
                old = self._ram.oldest(num_spill)
                num_new = num_spill - len(old)
                buf = torch.empty((num_spill, rb), dtype=torch.uint8)
                old_slots = [self._ram[i] for i in old]
                if old:
                    torch.index_select(self._w(self._ram_pool.rows), 0, torch.tensor(old_slots),
                                       out=self._w(buf[:len(old)]))
                buf[len(old):] = host[:num_new]
                disk_slots = self._write_disk(buf)
                for i in old:
                    self._ram.pop(i)
                self._set_table(self.ram_table, old, -1)
                self._ram_pool.slots.give_back(old_slots)
                self._disk.update(zip(old, disk_slots))
                spilled_new = dict(zip(id_list[:num_new], disk_slots[len(old):]))
                id_list, host = id_list[num_new:], host[num_new:]
            if id_list:
                try:
                    slots = self._ram_pool.take(len(id_list))
                except BaseException:
                    self._disk_slots.give_back(list(spilled_new.values()))
                    raise
                self._w(self._ram_pool.rows).index_copy_(0, torch.tensor(slots), self._w(host))
                self._ram.add(id_list, slots)
                self._set_table(self.ram_table, id_list, slots)
            self._disk.update(spilled_new)

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        """uint8 [n, row_bytes] on the store's device, rows in the order of ids (int64 [n]).

        Device-cache hits are gathered there; misses come from RAM (one index_select) and
        disk (one preadv per run of slots) into one host buffer, go to the device in one
        copy and enter the device cache. Waits for arriving rows (`reserve`) of these
        ids. Unknown id: KeyError.
        """
        id_list, rb = _id_list(ids), self.row_bytes
        with self._lock:
            self._wait_arrivals(id_list)
            self._check_open()
            dev, c = self._dev, self._counters
            slots = dev.slots_of(id_list)
            if slots is not None:  # every row cached (a decode step's usual case): no per-row branching
                return self._get_cached(id_list, slots)
            slots = [dev.get(i) for i in id_list]
            self._check_known([i for i, slot in zip(id_list, slots) if slot is None])  # a cached row is stored
            self._touch_ram(id_list)
            hit_pos, hit_slots, miss_pos, miss_ids = [], [], [], []
            for pos, (i, slot) in enumerate(zip(id_list, slots)):
                if slot is None:
                    miss_pos.append(pos)
                    miss_ids.append(i)
                    continue
                hit_pos.append(pos)
                hit_slots.append(slot)
                if i in self._prefetched:
                    self._prefetched.discard(i)
                    c.prefetch_hits += 1
            dev.touch(hit_slots)
            c.device_hits += len(hit_pos)
            c.device_misses += len(miss_ids)
            c.bytes_read["device"] += len(hit_pos) * rb
            with self._timed("device"):
                hits = self._w(self._dev_pool.rows).index_select(0, self._index(hit_slots))
            if not miss_ids:
                return hits.view(torch.uint8)
            out = torch.empty((len(id_list), rb), dtype=torch.uint8, device=self.device)
            if hit_pos:
                self._w(out).index_copy_(0, self._index(hit_pos), hits)
            fetched, rows = self._fetch(miss_ids)
            rows = self._to_device(rows)
            pos_of = dict(zip(miss_ids, miss_pos))
            self._w(out).index_copy_(0, self._index([pos_of[i] for i in fetched]), self._w(rows))
            self._cache_insert(fetched, rows)
            return out

    def _get_cached(self, id_list: list[int], slots: list[int]) -> torch.Tensor:
        """get() of rows all in the device cache (lock held): the same LRU updates and counts."""
        self._touch_cached(id_list, slots)
        with self._timed("device"):
            rows = self._w(self._dev_pool.rows).index_select(0, self._index(slots))
        return rows.view(torch.uint8)

    def _touch_cached(self, id_list: list[int], slots: list[int]) -> None:
        """Count a read of cached ids at device slots (lock held): most recent in both LRU
        orders, device hits."""
        c = self._counters
        self._dev.touch(slots)
        self._touch_ram(id_list)
        self._count_prefetch_hits(id_list)
        c.device_hits += len(id_list)
        c.bytes_read["device"] += len(id_list) * self.row_bytes

    def _count_prefetch_hits(self, id_list: list[int]) -> None:
        if self._prefetched:
            first_reads = self._prefetched.intersection(id_list)
            self._prefetched -= first_reads
            self._counters.prefetch_hits += len(first_reads)

    @contextlib.contextmanager
    def cached_rows(self, ids: torch.Tensor):
        """Read rows where they lie in the device cache, without copying them out.

        Yields ``(pool, slots)``: pool uint8 ``[capacity, row_bytes]`` (the device cache)
        and slots int64 ``[n]``, row ``ids[j]`` being ``pool[slots[j]]``, with the LRU
        updates and counts of a get(); or None when some id is not cached (then call
        get()). The store's lock is held until the block ends, so nothing evicts or
        moves a row while the caller reads it: keep the block short.
        """
        id_list = _id_list(ids)
        with self._lock:
            self._check_open()
            slots = self._dev.slots_of(id_list)
            if slots is None or (self._arriving and any(i in self._arriving for i in id_list)):
                yield None
                return
            self._touch_cached(id_list, slots)
            yield self._dev_pool.rows, self._index(slots)

    def prefetch(self, ids: torch.Tensor) -> int:
        """Copy the rows of ids (int64 [n]) that are not cached yet into the device cache,
        now (least recently used copies make room); returns how many were copied.
        Unknown id: KeyError. Background prefetching is the decode backend's to schedule
        (`edgekv.backends`); this is the copy it schedules."""
        id_list = _id_list(ids)
        with self._lock:
            self._check_open()
            self._check_known(id_list)
            todo = [i for i in id_list if i not in self._dev and i not in self._arriving]
            if not todo:
                return 0
            fetched, rows = self._fetch(todo)
            cached = self._cache_insert(fetched, self._to_device(rows))
            self._prefetched.update(cached)
            self._counters.prefetched_rows += len(cached)
            return len(cached)

    def reserve(self, ids: torch.Tensor) -> Reservation | None:
        """Take device-cache slots for the ids (int64 [n]) not cached or arriving yet and
        gather their bytes on the host; None when there are none (or the cache holds no
        row). The caller copies `Reservation.rows` into ``device_rows[slots]`` (e.g. on a
        copy stream, outside the store's lock), then calls `publish` once the copy is
        complete (or `abandon`). Evicted copies read -1 in `slot_table` from here on
        (stream-ordered on the calling thread's current stream: make the copy wait for it).
        At most the device cache's capacity of ids, the last ones. Unknown id: KeyError."""
        id_list = _id_list(ids)
        with self._lock:
            self._check_open()
            self._check_known(id_list)
            todo = [i for i in id_list if i not in self._dev and i not in self._arriving]
            capacity = self._dev_capacity - len(self._arriving)
            todo = todo[max(0, len(todo) - capacity):]
            if not todo:
                return None
            slots = self._take_device_slots(len(todo))
            fetched, rows = self._fetch(todo)
            self._arriving.update(zip(fetched, slots))
            return Reservation(fetched, self._index(slots), rows)

    def fill(self, reservation: Reservation) -> None:
        """Copy a reservation's rows into their device-cache slots, on the calling thread's
        current stream (no wait; the slots are the reservation's alone until publish)."""
        rows = reservation.rows.to(self.device, non_blocking=True)
        self._w(self._dev_pool.rows).index_copy_(0, reservation.slots, self._w(rows))

    def publish(self, reservation: Reservation) -> None:
        """The reserved rows' bytes are in the device cache: make them readable (they count
        as prefetched rows; `slot_table` gets their slots)."""
        with self._lock:
            ids = [i for i in reservation.ids if i in self._arriving]
            slots = [self._arriving.pop(i) for i in ids]
            live = [(i, s) for i, s in zip(ids, slots) if i in self._ram or i in self._disk]
            dead = [s for i, s in zip(ids, slots) if not (i in self._ram or i in self._disk)]
            self._dev_pool.slots.give_back(dead)  # freed while arriving
            if live:
                ids, slots = map(list, zip(*live))
                self._dev.add(ids, slots)
                self._set_table(self.slot_table, ids, slots)
                self._prefetched.update(ids)
                self._counters.prefetched_rows += len(ids)
            self._published.notify_all()

    def abandon(self, reservation: Reservation) -> None:
        """Give back a reservation's slots without publishing its rows."""
        with self._lock:
            slots = [self._arriving.pop(i) for i in reservation.ids if i in self._arriving]
            self._dev_pool.slots.give_back(slots)
            self._published.notify_all()

    def touch(self, ids: torch.Tensor) -> None:
        """Record that the rows of ids (int64 [n]) were just read in place by the caller
        (a backend reading the pools through the device tables): most recent in both LRU
        orders; first reads of prefetched rows count as prefetch hits. Ids no longer
        stored are skipped. Traffic counts stay the reader's (it knows where it read)."""
        id_list = ids.tolist()
        with self._lock:
            if self._closed:
                return
            slots = [slot for slot in map(self._dev.get, id_list) if slot is not None]
            self._dev.touch(slots)
            self._touch_ram(id_list)
            self._count_prefetch_hits(id_list)

    def device_room(self) -> int:
        """Rows the device cache can take now without evicting a cached copy (arriving
        rows count as taken)."""
        with self._lock:
            return max(0, self._dev_capacity - len(self._dev) - len(self._arriving))

    @property
    def has_disk_rows(self) -> bool:
        """Whether some row's home is the disk (a reader must ask the store for it)."""
        return bool(self._disk)

    @property
    def device_rows(self) -> torch.Tensor:
        """The device cache: uint8 [capacity, row_bytes] (read it with `slot_table`)."""
        return self._dev_pool.rows

    @property
    def ram_rows(self) -> torch.Tensor:
        """The RAM home: uint8 [capacity, row_bytes] on the host, pinned with pin_ram
        (read it with `ram_table`; it moves when it grows)."""
        return self._ram_pool.rows

    def free(self, ids: torch.Tensor) -> None:
        """Forget the rows of ids (int64 [n]); their slots in every tier become reusable."""
        id_list = _id_list(ids)
        with self._lock:
            self._check_open()
            self._check_known(id_list)
            ram_slots, disk_slots, dev_ids, dev_slots = [], [], [], []
            for i in id_list:
                if i in self._ram:
                    ram_slots.append(self._ram.pop(i))
                else:
                    disk_slots.append(self._disk.pop(i))
                if i in self._dev:
                    dev_ids.append(i)
                    dev_slots.append(self._dev.pop(i))
                self._prefetched.discard(i)
            self._set_table(self.ram_table, id_list, -1)
            self._set_table(self.slot_table, dev_ids, -1)
            self._ram_pool.slots.give_back(ram_slots)
            self._disk_slots.give_back(disk_slots)
            self._dev_pool.slots.give_back(dev_slots)

    def __contains__(self, row_id) -> bool:
        with self._lock:
            return int(row_id) in self._ram or int(row_id) in self._disk

    def __len__(self) -> int:
        with self._lock:
            return len(self._ram) + len(self._disk)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held now per tier: rows x row_bytes (the device tier counts cached copies)."""
        with self._lock:
            return {name: len(table) * self.row_bytes
                    for name, table in (("device", self._dev), ("ram", self._ram), ("disk", self._disk))}

    def stats(self) -> dict:
        """Counters since creation or reset_counters().

        bytes_read {device, ram, disk}: bytes gathered from each tier (device = cache hits);
        bytes_written {disk}; bytes_to_device: host->device bytes; seconds {device, ram, disk,
        disk_write, to_device} (host time of the store's own copies; a copy to a GPU is
        waited for); gbps: the same keys as seconds, in GB/s (1e9 bytes); device_hits /
        device_misses, prefetched_rows, prefetch_hits: rows; allocated_bytes {device, ram,
        disk}: pool tensors and disk file extent, budgets {device, ram, disk}: bytes;
        row_bytes.
        """
        with self._lock:
            c = self._counters
            moved = dict(c.bytes_read, disk_write=c.bytes_written["disk"], to_device=c.bytes_to_device)
            return dict(
                bytes_read=dict(c.bytes_read), bytes_written=dict(c.bytes_written),
                bytes_to_device=c.bytes_to_device, seconds=dict(c.seconds),
                gbps={k: moved[k] / s / 1e9 if s > 0 else 0.0 for k, s in c.seconds.items()},
                device_hits=c.device_hits, device_misses=c.device_misses,
                prefetched_rows=c.prefetched_rows, prefetch_hits=c.prefetch_hits,
                allocated_bytes=dict(device=self._dev_pool.rows.nbytes, ram=self._ram_pool.rows.nbytes,
                                     disk=self._disk_slots.high_water * self.row_bytes),
                budgets=dict(self._budgets), row_bytes=self.row_bytes)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = _Counters()

    def close(self) -> None:
        """Drop every row and remove the disk file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()
            for table in (self._dev, self._ram, self._disk, self._arriving, self._prefetched):
                table.clear()
            self._dev_pool.rows = self._ram_pool.rows = torch.empty((0, self.row_bytes), dtype=torch.uint8)
            self._published.notify_all()

    def __enter__(self) -> TierStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals (called with the lock held) ----------------------------------------

    def _wait_arrivals(self, id_list: list[int]) -> None:
        """Block until none of the ids is arriving (a reservation not yet published)."""
        while self._arriving and not self._closed and any(i in self._arriving for i in id_list):
            self._published.wait()

    def _set_table(self, table: torch.Tensor | None, ids: list[int], values: list[int] | int) -> None:
        """Write placement into a device table (no host wait: the indices cross as one
        non-blocking copy)."""
        if table is None or not ids:
            return
        index = self._index(ids)
        if isinstance(values, int):
            table.index_fill_(0, index, values)
        else:
            table.index_copy_(0, index, self._index(values).to(torch.int32))

    def _touch_ram(self, id_list: list[int]) -> None:
        """Make the ids with a RAM home the most recent there, in the order given."""
        ram = self._ram
        slots = ram.slots_of(id_list)
        if slots is None:  # some live on disk
            slots = [slot for slot in map(ram.get, id_list) if slot is not None]
        ram.touch(slots)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("TierStore is closed")

    def _check_known(self, id_list: list[int]) -> None:
        missing = [i for i in id_list if i not in self._ram and i not in self._disk]
        if missing:
            raise KeyError(f"{len(missing)} ids are not stored, e.g. {missing[:8]}")

    def _check_disk_room(self, num_spill: int, num_new: int) -> None:
        free = self._disk_slots.num_free()
        if num_spill <= free:
            return
        where = (f"the disk budget ({format_size(self._budgets['disk'])}) has room for {free} more"
                 if self._fd >= 0 else "there is no disk tier")
        raise BudgetError(
            f"cannot store {num_new} more KV rows ({format_size(num_new * self.row_bytes)}): the RAM "
            f"budget ({format_size(self._budgets['ram'])}) is full and {where}; "
            f"raise --ram or --disk-dir/--disk-bytes")

    def _w(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [n, row_bytes] viewed as [n, row_bytes / word size] words."""
        return rows.view(self._word)

    def _index(self, values: list[int]) -> torch.Tensor:
        """int64 [n] on the store's device (through numpy on the CPU: a third of torch.tensor's
        time; through pinned memory and a non-blocking copy on a GPU: no host wait)."""
        host = torch.from_numpy(np.asarray(values, dtype=np.int64))
        if self.device.type == "cpu":
            return host
        if torch.cuda.is_available():
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def _timed(self, key: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._counters.seconds[key] += time.perf_counter() - start

    def _write_disk(self, buf: torch.Tensor) -> list[int]:
        """Write buf: uint8 [k, row_bytes] (CPU) to k free disk slots, one pwrite per run of
        consecutive slots; returns the slots. On OSError nothing is recorded: DiskFullError."""
        slots, rb = self._disk_slots.take(buf.shape[0]), self.row_bytes
        data = memoryview(buf.numpy()).cast("B")
        try:
            with self._timed("disk_write"):
                for start, stop in _runs(slots):
                    _pwrite_all(self._fd, data[start * rb:stop * rb], slots[start] * rb)
        except OSError as e:
            self._disk_slots.give_back(slots)
            reason = ("the disk is full" if e.errno == errno.ENOSPC
                      else f"writing failed ({e.strerror or e})")
            raise DiskFullError(
                f"{reason} while moving {format_size(len(slots) * rb)} of KV cache to "
                f"{self.disk_path}; rows stored before are intact, the new ones were not stored. "
                f"Free space there, point --disk-dir at a larger disk, or raise --ram") from e
        self._counters.bytes_written["disk"] += len(slots) * rb
        return slots

    def _read_disk(self, slots: list[int], out: torch.Tensor) -> None:
        """Read disk slots into out: uint8 [k, row_bytes] (CPU, contiguous), row j <- slots[j];
        one os.preadv per run of consecutive slots (at most _IOV_MAX rows each)."""
        rb = self.row_bytes
        data = memoryview(out.numpy()).cast("B")
        order = sorted(range(len(slots)), key=slots.__getitem__)
        by_slot = [slots[j] for j in order]
        try:
            with self._timed("disk"):
                for start, stop in _runs(by_slot):
                    for first in range(start, stop, _IOV_MAX):
                        last = min(stop, first + _IOV_MAX)
                        bufs = [data[order[j] * rb:(order[j] + 1) * rb] for j in range(first, last)]
                        if os.preadv(self._fd, bufs, by_slot[first] * rb) != (last - first) * rb:
                            raise OSError(errno.EIO, "short read: the file was truncated")
        except OSError as e:
            raise EdgekvError(f"cannot read the KV disk tier file {self.disk_path}: {e.strerror or e}") from e

    def _fetch(self, ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """Gather rows not in the device cache on the host: (ids in the gathered order, uint8
        [n, row_bytes], pinned with a pinned RAM home). RAM rows first (one index_select),
        then disk rows."""
        ram_ids = [i for i in ids if i in self._ram]
        disk_ids = [i for i in ids if i not in self._ram]
        rb, c = self.row_bytes, self._counters
        staging = torch.empty((len(ids), rb), dtype=torch.uint8, pin_memory=self._pin)
        if ram_ids:
            with self._timed("ram"):
                torch.index_select(self._w(self._ram_pool.rows), 0, torch.tensor([self._ram[i] for i in ram_ids]),
                                   out=self._w(staging[:len(ram_ids)]))
            c.bytes_read["ram"] += len(ram_ids) * rb
        if disk_ids:
            self._read_disk([self._disk[i] for i in disk_ids], staging[len(ram_ids):])
            c.bytes_read["disk"] += len(disk_ids) * rb
        return ram_ids + disk_ids, staging

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The one host->device copy of a get or prefetch (none when the device is the CPU);
        waited for, so its time is the copy's."""
        if self.device.type == "cpu":
            return host
        self._counters.bytes_to_device += host.numel()
        with self._timed("to_device"):
            rows = host.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        return rows

    def _take_device_slots(self, n: int) -> list[int]:
        """n free device-cache slots (n <= capacity - arriving), evicting the least recently
        used copies; their ids read -1 in slot_table."""
        evicted = self._dev.oldest(len(self._dev) + len(self._arriving) + n - self._dev_capacity)
        self._dev_pool.slots.give_back([self._dev.pop(i) for i in evicted])
        self._set_table(self.slot_table, evicted, -1)
        self._prefetched.difference_update(evicted)
        return self._dev_pool.take(n)

    def _cache_insert(self, ids: list[int], rows: torch.Tensor) -> list[int]:
        """Copy rows (uint8 [n, row_bytes], device) of uncached ids into the device cache,
        evicting least recently used copies; keeps the last ones if n exceeds the cache.
        Returns the ids cached."""
        capacity = self._dev_capacity - len(self._arriving)
        if len(ids) > capacity:
            ids, rows = ids[len(ids) - capacity:], rows[len(ids) - capacity:]
        if not ids:
            return []
        slots = self._take_device_slots(len(ids))
        self._w(self._dev_pool.rows).index_copy_(0, self._index(slots), self._w(rows))
        self._dev.add(ids, slots)
        self._set_table(self.slot_table, ids, slots)
        return ids
