"""An id -> slot table that knows the order of last use, for the tier store's caches.

A decode step reads tens of rows per layer, all usually cached: with an ``OrderedDict``
that is one ``move_to_end`` call per row in each of two tables, per layer and token. Here
a read stamps its slots in one numpy assignment instead:
every slot carries the clock value of its last use, and ``oldest`` sorts stamps only
when something must be evicted. Stamps are unique, so the order is exactly the one
``move_to_end`` in call order would give.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np


class LruIndex:
    """Ids (non-negative ints) -> slots (ints in ``[0, capacity)``), least recently used first.

    ``add`` and ``touch`` make slots the most recent, in the order given.
    """

    def __init__(self) -> None:
        self._slot_of: dict[int, int] = {}
        self._stamp = np.zeros(0, dtype=np.int64)  # [capacity] last use of each slot
        self._id_at = np.zeros(0, dtype=np.int64)  # [capacity] id held by each slot, -1: none
        self._clock = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._slot_of

    def __iter__(self):
        """Ids, least recently used first."""
        return iter(self.oldest(len(self)))

    def __getitem__(self, row_id: int) -> int:
        return self._slot_of[row_id]

    def get(self, row_id: int) -> int | None:
        return self._slot_of.get(row_id)

    def slots_of(self, ids: list[int]) -> list[int] | None:
        """The slots of ids, or None when some id is absent (one C-level lookup when all are
        present: a decode step's usual case)."""
        if not ids:
            return []
        try:
            found = itemgetter(*ids)(self._slot_of)
        except KeyError:
            return None
        return list(found) if len(ids) > 1 else [found]

    def add(self, ids: list[int], slots: list[int]) -> None:
        """Record new ids at their slots, most recent last."""
        if not ids:
            return
        self._slot_of.update(zip(ids, slots))
        top = max(slots) + 1
        if top > self._stamp.shape[0]:
            grow = max(top, 2 * self._stamp.shape[0], 1024)
            self._stamp = np.concatenate((self._stamp, np.zeros(grow - self._stamp.shape[0], np.int64)))
            self._id_at = np.concatenate((self._id_at, np.full(grow - self._id_at.shape[0], -1, np.int64)))
        where = np.asarray(slots, dtype=np.int64)
        self._id_at[where] = ids
        self.touch(where)

    def touch(self, slots: np.ndarray | list[int]) -> None:
        """Make the rows at slots (in use) the most recent, in the order given."""
        n = len(slots)
        self._stamp[slots] = np.arange(self._clock, self._clock + n)
        self._clock += n

    def pop(self, row_id: int) -> int:
        """Forget row_id; returns its slot. KeyError when absent."""
        slot = self._slot_of.pop(row_id)
        self._id_at[slot] = -1
        return slot

    def oldest(self, n: int) -> list[int]:
        """The min(n, len) least recently used ids, oldest first."""
        n = min(n, len(self._slot_of))
        if n <= 0:
            return []
        used = np.flatnonzero(self._id_at >= 0)
        stamps = self._stamp[used]
        if n < used.shape[0]:
            part = np.argpartition(stamps, n - 1)[:n]
            used, stamps = used[part], stamps[part]
        return self._id_at[used[np.argsort(stamps)]].tolist()

    def clear(self) -> None:
        self._slot_of.clear()
        self._id_at[:] = -1
