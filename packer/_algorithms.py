"""Packing decisions on lengths only. Each algorithm takes items (id, length) in arrival order and
returns closed bins as lists of item ids; none ever puts more than `capacity` tokens or `max_items`
items in a bin. Their state is plain JSON so that a stream can resume."""
from __future__ import annotations

from typing import Iterable


class NextFit:
    """One open bin; an item that does not fit closes it (vit-pytorch NaViT, input order)."""

    def __init__(self, capacity: int, max_items: int):
        self.capacity, self.max_items = capacity, max_items
        self._bin: list[int] = []
        self._room = capacity

    def push(self, item: int, length: int) -> list[list[int]]:
        out = []
        if length > self._room or len(self._bin) == self.max_items:
            out.append(self._bin)
            self._bin, self._room = [], self.capacity
        self._bin.append(item)
        self._room -= length
        return out

    def flush(self) -> list[list[int]]:
        out = [self._bin] if self._bin else []
        self._bin, self._room = [], self.capacity
        return out

    def state(self) -> dict:
        return {"bin": self._bin, "room": self._room}

    def restore(self, state: dict) -> None:
        self._bin, self._room = list(state["bin"]), int(state["room"])


class FirstFit:
    """The paper's greedy (A.3): each item goes into the first open bin with room. Bins stay open
    until full, so memory grows with the stream: a baseline. A max-tree over bin rooms finds the
    first fitting bin in O(log bins)."""

    def __init__(self, capacity: int, max_items: int):
        self.capacity, self.max_items = capacity, max_items
        self._bins: list[list[int] | None] = []
        self._size = 1
        self._tree = [0, 0]  # implicit binary tree; leaves at [size, 2*size)

    def _set(self, pos: int, room: int) -> None:
        i = pos + self._size
        tree = self._tree
        tree[i] = room
        i >>= 1
        while i:
            v = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == v:
                break
            tree[i] = v
            i >>= 1

    def _grow(self) -> None:
        leaves = self._tree[self._size:] + [0] * self._size
        self._size *= 2
        self._tree = [0] * self._size + leaves
        for i in range(self._size - 1, 0, -1):
            self._tree[i] = max(self._tree[2 * i], self._tree[2 * i + 1])

    def _open(self, rooms: list[int]) -> None:
        for room in rooms:
            if len(self._bins) == self._size:
                self._grow()
            self._bins.append([])
            self._set(len(self._bins) - 1, room)

    def push(self, item: int, length: int) -> list[list[int]]:
        if self._tree[1] < length:
            self._open([self.capacity])
        tree = self._tree  # after _open, which may replace the list when it grows
        i = 1
        while i < self._size:
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        pos = i - self._size
        room = tree[i] - length
        contents = self._bins[pos]
        contents.append(item)
        if room == 0 or len(contents) == self.max_items:
            self._set(pos, 0)
            self._bins[pos] = None
            return [contents]
        self._set(pos, room)
        return []

    def flush(self) -> list[list[int]]:
        out = [b for b in self._bins if b]
        self.__init__(self.capacity, self.max_items)
        return out

    def state(self) -> dict:
        rooms = self._tree[self._size:self._size + len(self._bins)]
        return {"bins": [[b, r] for b, r in zip(self._bins, rooms) if b]}

    def restore(self, state: dict) -> None:
        self.__init__(self.capacity, self.max_items)
        for contents, room in state["bins"]:
            self._open([room])
            self._bins[-1] = list(contents)


def best_fit_decreasing(items: list[tuple[int, int, int]], capacity: int, max_items: int) -> tuple[list[list[tuple[int, int, int]]], list[int]]:
    """Offline best-fit-decreasing over (negated length, id, age) tuples. Returns bins and their rooms.

    Each item, longest first, goes into the open bin with the least room that still fits it; bins are
    indexed by room in a bitmask so that the search is a few integer operations."""
    items = sorted(items)
    bins: list[list[tuple[int, int, int]]] = []
    rooms: list[int] = []
    by_room: dict[int, list[int]] = {}
    mask = 0
    for it in items:
        length = -it[0]
        fits = mask >> length
        if fits:
            room = length + (fits & -fits).bit_length() - 1
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                mask ^= 1 << room
                del by_room[room]
        else:
            b, room = len(bins), capacity
            bins.append([])
            rooms.append(capacity)
        contents = bins[b]
        contents.append(it)
        room -= length
        rooms[b] = room
        if room and len(contents) < max_items:
            stack = by_room.get(room)
            if stack is None:
                by_room[room] = [b]
                mask |= 1 << room
            else:
                stack.append(b)
    return bins, rooms


class WindowBestFit:
    """The default streaming packer: best-fit-decreasing over a bounded window, with carry-over.

    Items collect in a window of `window` items. When it is full, the window is packed with
    best-fit-decreasing; bins that are exactly full (or at max_items) are emitted, and the items of
    the other bins are carried over into the next round to meet new items, unless one of them has
    already been carried `max_age` times, in which case its bin is emitted as it is. Memory is bounded
    by the window; every item leaves within max_age + 1 rounds."""

    def __init__(self, capacity: int, max_items: int, window: int = 1024, max_age: int = 1):
        self.capacity, self.max_items, self.window, self.max_age = capacity, max_items, window, max_age
        self._items: list[tuple[int, int, int]] = []  # (-length, id, age): sorts longest first, then by arrival

    def push(self, item: int, length: int) -> list[list[int]]:
        self._items.append((-length, item, 0))
        if len(self._items) < self.window:
            return []
        return self._round(final=False)

    def flush(self) -> list[list[int]]:
        return self._round(final=True) if self._items else []

    def _round(self, final: bool) -> list[list[int]]:
        bins, rooms = best_fit_decreasing(self._items, self.capacity, self.max_items)
        out, carried = [], []
        max_age, max_items = self.max_age, self.max_items
        for contents, room in zip(bins, rooms):
            if final or room == 0 or len(contents) == max_items or any(it[2] >= max_age for it in contents):
                out.append([it[1] for it in contents])
            else:
                carried.extend((n, i, a + 1) for n, i, a in contents)
        self._items = carried
        return out

    def state(self) -> dict:
        return {"items": [[-n, i, a] for n, i, a in self._items]}

    def restore(self, state: dict) -> None:
        self._items = [(-n, i, a) for n, i, a in state["items"]]


def make_algorithm(name: str, capacity: int, max_items: int, window: int = 1024):
    """The streaming packer called `name` ('bfd' is offline: it decides everything at flush)."""
    if name == "next-fit":
        return NextFit(capacity, max_items)
    if name == "first-fit":
        return FirstFit(capacity, max_items)
    if name == "window-bfd":
        return WindowBestFit(capacity, max_items, window)
    if name == "bfd":
        return WindowBestFit(capacity, max_items, window=2**62)
    raise ValueError(f"unknown packer {name!r}")


def pack_lengths(lengths: Iterable[int], name: str, capacity: int, max_items: int, window: int = 1024) -> list[list[int]]:
    """Bins of item indices for a sequence of lengths: the packing decisions alone (benchmarks, planning)."""
    algo = make_algorithm(name, capacity, max_items, window)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        bins.extend(algo.push(i, n))
    bins.extend(algo.flush())
    return bins
