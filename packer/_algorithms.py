"""Packing decisions on lengths only. Each algorithm takes items (id, length) in arrival order and
returns closed bins as lists of item ids; none ever puts more than `capacity` tokens or `max_images_per_seq`
items in a bin. Their state is plain JSON so that a stream can resume. ALGORITHMS registers them by the
name PackConfig.packer (--packer) takes; the first is the default."""
from __future__ import annotations

import bisect
import dataclasses
import gc
import math
from itertools import repeat
from typing import Callable, Iterable, Iterator, Optional, Sequence

# feasible(item, length, target) -> cost of re-planning item to exactly target tokens, or None.
Feasible = Callable[[int, int, int], Optional[float]]


class NextFit:
    """One open bin; an item that does not fit closes it (vit-pytorch NaViT, input order)."""

    def __init__(self, capacity: int, max_images_per_seq: int):
        self.capacity, self.max_images_per_seq = capacity, max_images_per_seq
        self._bin: list[int] = []
        self._room = capacity

    def push(self, item: int, length: int) -> list[list[int]]:
        out = []
        if length > self._room or len(self._bin) == self.max_images_per_seq:
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

    def __init__(self, capacity: int, max_images_per_seq: int):
        self.capacity, self.max_images_per_seq = capacity, max_images_per_seq
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
        if room == 0 or len(contents) == self.max_images_per_seq:
            self._set(pos, 0)
            self._bins[pos] = None
            return [contents]
        self._set(pos, room)
        return []

    def flush(self) -> list[list[int]]:
        out = [b for b in self._bins if b]
        self.__init__(self.capacity, self.max_images_per_seq)
        return out

    def state(self) -> dict:
        rooms = self._tree[self._size:self._size + len(self._bins)]
        return {"bins": [[b, r] for b, r in zip(self._bins, rooms) if b]}

    def restore(self, state: dict) -> None:
        self.__init__(self.capacity, self.max_images_per_seq)
        for contents, room in state["bins"]:
            self._open([room])
            self._bins[-1] = list(contents)


def best_fit_decreasing(items: list[tuple[int, int, int]], capacity: int, max_images_per_seq: int
                        ) -> tuple[list[list[tuple[int, int, int]]], list[int], list[int]]:
    """Best-fit-decreasing over (negated length, id, age) tuples. Returns the bins, their rooms and the
    oldest age in each.

    Each item, longest first, goes into the open bin with the least room that still fits it; bins are
    indexed by room in a bitmask so that the search is a few integer operations. Carried items (age > 0)
    are placed before new ones: short items carried from a round where nothing had room for them then
    meet the new long items' bins first, instead of ending in bins of short items alone that reach
    max_images_per_seq half empty (at L=4096 with token dropping: 96.6% -> 99.8% efficiency)."""
    items = sorted(it for it in items if it[2]) + sorted(it for it in items if not it[2])
    bins: list[list[tuple[int, int, int]]] = []
    rooms: list[int] = []
    oldest: list[int] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
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
            if it[2] > oldest[b]:
                oldest[b] = it[2]
        else:
            b, room = len(bins), capacity
            bins.append([])
            rooms.append(capacity)
            oldest.append(it[2])
        contents = bins[b]
        contents.append(it)
        room -= length
        rooms[b] = room
        if room and len(contents) < max_images_per_seq:
            stack = by_room[room]
            if not stack:
                mask |= 1 << room
            stack.append(b)
    return bins, rooms, oldest


class _Windowed:
    """What the windowed packers share: items collect until the window is full, then a round (`_round`)
    packs it; subclasses keep the window (`_held`, `_add`) their own way."""

    window: int

    def _held(self) -> int:
        raise NotImplementedError

    def _add(self, ids: Sequence[int], lengths: list[int]) -> None:
        raise NotImplementedError

    def _round(self, final: bool) -> list[list[int]]:
        raise NotImplementedError

    def push(self, item: int, length: int) -> list[list[int]]:
        self._add((item,), [length])
        return self._round(final=False) if self._held() >= self.window else []

    def push_many(self, first_item: int, lengths: list[int]) -> list[list[int]]:
        """push() for items first_item, first_item + 1, ... in window-sized slices: the same decisions, faster."""
        out: list[list[int]] = []
        start = 0
        while start < len(lengths):
            take = max(1, self.window - self._held())  # push() adds one item before each round
            chunk = lengths[start:start + take]
            self._add(range(first_item + start, first_item + start + len(chunk)), chunk)
            start += len(chunk)
            if self._held() >= self.window:
                out += self._round(final=False)
        return out

    def flush(self) -> list[list[int]]:
        return self._round(final=True) if self._held() else []


class WindowBestFit(_Windowed):
    """Packer window-bfd (the default before window-swap): best-fit-decreasing over a bounded window,
    with carry-over; a bin closes when it reaches max_images_per_seq items.

    Items collect in a window of `window` items. When it is full, the window is packed with
    best-fit-decreasing; bins that are exactly full, at max_images_per_seq, or with less room than the window's
    shortest item are emitted, and the items of the other bins are carried over into the next round to
    meet new items, unless one of them has already been carried `max_age` times, in which case its bin
    is emitted as it is. Memory is bounded
    by the window; every item leaves within max_age + 1 rounds."""

    def __init__(self, capacity: int, max_images_per_seq: int, window: int = 1024, max_age: int = 1):
        self.capacity, self.max_images_per_seq, self.window, self.max_age = capacity, max_images_per_seq, window, max_age
        self._items: list[tuple[int, int, int]] = []  # (-length, id, age): sorts longest first, then by arrival

    def _held(self) -> int:
        return len(self._items)

    def _add(self, ids: Sequence[int], lengths: list[int]) -> None:
        self._items.extend(zip([-n for n in lengths], ids, repeat(0)))

    def _round(self, final: bool) -> list[list[int]]:
        bins, rooms, oldest = best_fit_decreasing(self._items, self.capacity, self.max_images_per_seq)
        out, carried = [], []
        max_age, max_images_per_seq = self.max_age, self.max_images_per_seq
        shortest = -max(self._items)[0]  # a bin with less room than this takes no item of the window
        for contents, room, age in zip(bins, rooms, oldest):
            if final or room < shortest or age >= max_age or len(contents) == max_images_per_seq:
                out.append([it[1] for it in contents])
            else:
                carried += [(n, i, a + 1) for n, i, a in contents]
        self._items = carried
        return out

    def state(self) -> dict:
        return {"items": [[-n, i, a] for n, i, a in self._items]}

    def restore(self, state: dict) -> None:
        self._items = [(-n, i, a) for n, i, a in state["items"]]


def swap_best_fit(lengths: list[int], ages: list[int], capacity: int, max_images_per_seq: int,
                  stacks: list[list[int]] | None = None) -> tuple[list[list[int]], list[int], set[int], int]:
    """Best-fit-decreasing that meets max_images_per_seq by exact swaps. Returns the bins as lists of
    positions in `lengths`, their rooms, the bins that the swaps changed, and how many items had to move
    without a swap (0: every bin has the fill of best fit without the cap).

    First every item, carried ones (age > 0) first, then longest first, ties by position, goes into
    the open bin with the least room that still fits it, whatever the bin's count (the bitmask search
    of best_fit_decreasing). Decreasing order leaves the shortest items to the last bins, which then
    hold more than max_images_per_seq of them; each such bin gives k of its items (its k-1 shortest
    and one more) for one item of exactly their total length from a bin that can take k-1 more items,
    largest k first, so every bin keeps its fill and the window's packing stays that of best fit without
    the cap. An excess that no swap removes (rare) moves out, shortest first, into the bin with a free
    slot and the least room that fits it, else into new bins. `stacks` (capacity + 1 empty lists) may
    be passed to reuse; they are empty again on return."""
    n = len(lengths)
    C, E = capacity, max_images_per_seq
    if stacks is None:
        stacks = [[] for _ in range(C + 1)]
    shift = n.bit_length()
    low = (1 << shift) - 1
    new = 2 * C + 1  # keys: carried items in [0, C] << shift, new ones in [C + 1, 2C + 1] << shift
    keys = [((C - m) << shift | p) if a else ((new - m) << shift | p) for p, (m, a) in enumerate(zip(lengths, ages))]
    keys.sort()
    bins: list[list[int]] = []
    rooms: list[int] = []
    mask = 0  # bit r set: some bin has room r
    for k in keys:
        p = k & low
        m = lengths[p]
        fits = mask >> m
        if fits:
            room = m + (fits & -fits).bit_length() - 1
            stack = stacks[room]
            b = stack.pop()
            if not stack:
                mask ^= 1 << room
            bins[b].append(p)
            room -= m
            rooms[b] = room
        else:
            b = len(bins)
            bins.append([p])
            room = C - m
            rooms.append(room)
        if room:
            stack = stacks[room]
            if not stack:
                mask |= 1 << room
            stack.append(b)
    while mask:  # leave the stacks empty for the next call
        bit = mask & -mask
        stacks[bit.bit_length() - 1].clear()
        mask ^= bit
    touched: set[int] = set()
    unswapped = 0
    if bins and max(map(len, bins)) > E:
        unswapped = _swap_to_cap(bins, rooms, lengths, keys, shift, C, E, touched)
    return bins, rooms, touched, unswapped


def _swap_to_cap(bins: list[list[int]], rooms: list[int], lengths: list[int], keys: list[int], shift: int,
                 C: int, E: int, touched: set[int], max_probes: int = 64) -> int:
    """Bring every bin to at most E items (see swap_best_fit); `keys` are the sorted keys of the packing.
    Each swap tries at most `max_probes` total lengths. Returns the number of items moved without a swap."""
    low = (1 << shift) - 1
    where = [0] * len(lengths)
    for b, contents in enumerate(bins):
        for p in contents:
            where[p] = b
    over = [b for b, contents in enumerate(bins) if len(contents) > E]
    is_over = set(over)
    present = set(lengths)
    fewest = min((len(c) for b, c in enumerate(bins) if b not in is_over), default=E)  # no host takes more than E - fewest
    length_of = lengths.__getitem__
    leftover: list[int] = []

    def host(y: int, k: int, a: int) -> int | None:
        """The first position (in packing order) of an item of length y in a bin other than `a`, not over
        the cap, that can take k - 1 more items."""
        for top in (C, 2 * C + 1):
            i = bisect.bisect_left(keys, (top - y) << shift)
            end = bisect.bisect_left(keys, (top - y + 1) << shift, i)
            for j in range(i, end):
                q = keys[j] & low
                h = where[q]
                if h != a and h not in is_over and len(bins[h]) + k - 1 <= E:
                    return q
        return None

    for a in over:
        A = bins[a]
        touched.add(a)
        while len(A) > E:
            A.sort(key=length_of)
            probes = 0  # host searches for this swap
            excess = len(A) - E
            found = None
            for k in range(min(excess + 1, E - fewest + 1, len(A)), 1, -1):
                pre = sum(map(length_of, A[:k - 1]))
                tried = set()
                for c in range(len(A) - 1, k - 2, -1):  # the longest completion first
                    s = pre + lengths[A[c]]
                    if s in tried or s not in present:
                        continue
                    tried.add(s)
                    probes += 1
                    q = host(s, k, a)
                    if q is not None:
                        found = (k, c, q)
                        break
                    if probes >= max_probes:
                        break
                if found or probes >= max_probes:
                    break
            if found is None:  # the shortest excess items leave the bin
                leftover += A[:excess]
                rooms[a] += sum(map(length_of, A[:excess]))
                del A[:excess]
                break
            k, c, q = found
            h = where[q]
            moved = A[:k - 1] + [A[c]]
            del A[c]
            del A[:k - 1]
            A.append(q)
            where[q] = a
            H = bins[h]
            H.remove(q)
            H += moved
            for p in moved:
                where[p] = h
            touched.add(h)
    if leftover:
        leftover.sort(key=length_of, reverse=True)
        for p in leftover:
            m = lengths[p]
            best = None
            for b, contents in enumerate(bins):
                if len(contents) < E and m <= rooms[b] and (best is None or rooms[b] < rooms[best]):
                    best = b
            if best is None:
                best = len(bins)
                bins.append([])
                rooms.append(C)
            bins[best].append(p)
            rooms[best] -= m
            touched.add(best)
    return len(leftover)


class WindowSwap(_Windowed):
    """The default streaming packer: best-fit-decreasing over a bounded window, as if there were no
    image cap, then exact swaps that bring every sequence to at most max_images_per_seq images
    (swap_best_fit), with carry-over.

    Closing a sequence when it reaches max_images_per_seq images (WindowBestFit) leaves the round's shortest items,
    which decreasing order places last, in sequences that reach the cap with room left; here those
    items are swapped, several at a time, for one item of the same total length from a sequence with
    free slots, so the window's fills stay those of best fit without the cap.

    Items collect in a window of `window` items. When it is full, the window is packed; bins whose room
    is less than the window's shortest item, or that hold an item already carried `max_age` times, are
    emitted, and the items of the other bins (also those at max_images_per_seq: the next round's swaps can
    make room in them) are carried over into the next round. Every item leaves within max_age + 1 rounds,
    so the window never holds more than window + max_age items (plus capacity + 1 reusable lists).
    Decisions depend on the lengths and their arrival order only."""

    def __init__(self, capacity: int, max_images_per_seq: int, window: int = 1024, max_age: int = 3):
        self.capacity, self.max_images_per_seq, self.window, self.max_age = capacity, max_images_per_seq, window, max_age
        self._lengths: list[int] = []  # the window in arrival order: carried items first
        self._ids: list[int] = []
        self._ages: list[int] = []  # rounds each item has been carried
        self._stacks: list[list[int]] = [[] for _ in range(capacity + 1)]
        self.unswapped = 0  # items moved into another bin without a swap (a statistic, not part of the state)

    def _held(self) -> int:
        return len(self._lengths)

    def _add(self, ids: Sequence[int], lengths: list[int]) -> None:
        self._lengths += lengths
        self._ids += ids
        self._ages += repeat(0, len(lengths))

    def _round(self, final: bool) -> list[list[int]]:
        lengths, ids, ages = self._lengths, self._ids, self._ages
        bins, rooms, touched, unswapped = swap_best_fit(lengths, ages, self.capacity, self.max_images_per_seq, self._stacks)
        self.unswapped += unswapped
        max_age, shortest = self.max_age, min(lengths)
        out: list[list[int]] = []
        keep: list[int] = []
        get_id = ids.__getitem__
        for b, (contents, room) in enumerate(zip(bins, rooms)):
            # carried items go first, so only a bin opened by one holds any, unless swaps moved them
            if final or room < shortest or ((ages[contents[0]] or b in touched)
                                            and max(map(ages.__getitem__, contents)) >= max_age):
                out.append(list(map(get_id, contents)))
            else:
                keep += contents
        keep.sort()  # arrival order
        self._lengths = [lengths[p] for p in keep]
        self._ids = [ids[p] for p in keep]
        self._ages = [ages[p] + 1 for p in keep]
        return out

    def state(self) -> dict:
        return {"items": [[n, i, a] for n, i, a in zip(self._lengths, self._ids, self._ages)]}

    def restore(self, state: dict) -> None:
        items = state["items"]
        self._lengths = [int(n) for n, _, _ in items]
        self._ids = [int(i) for _, i, _ in items]
        self._ages = [int(a) for _, _, a in items]


class _Donors:
    """Items that may be moved into a bin being closed, searched by length."""

    def __init__(self, items: Iterable[tuple[int, int]]):
        pairs = sorted(items)  # (length, id)
        self.lengths = [n for n, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.taken: set[int] = set()

    def give(self, length: int, item: int) -> None:
        """Add an item (one swapped out of a bin being closed), or return a taken one."""
        if item in self.taken:
            self.taken.discard(item)
            return
        pos = bisect.bisect_right(self.lengths, length)
        self.lengths.insert(pos, length)
        self.ids.insert(pos, item)

    def __bool__(self) -> bool:
        return len(self.taken) < len(self.ids)

    def nearest(self, target: int) -> Iterator[tuple[float, int, int]]:
        """(|log(target / length)|, length, id) in increasing order of the first, skipping taken items."""
        lengths, ids, taken = self.lengths, self.ids, self.taken
        right = bisect.bisect_left(lengths, target)
        left = right - 1
        while left >= 0 or right < len(lengths):
            if right >= len(lengths) or (left >= 0 and target / lengths[left] <= lengths[right] / target):
                pos, left = left, left - 1
            else:
                pos, right = right, right + 1
            if ids[pos] not in taken:
                yield abs(math.log(target / lengths[pos])), lengths[pos], ids[pos]

    def largest_at_most(self, limit: int) -> tuple[int, int] | None:
        """(length, id) of the longest item not taken with length <= limit (the earliest among equals)."""
        pos = bisect.bisect_right(self.lengths, limit) - 1
        while pos >= 0:
            if self.ids[pos] not in self.taken:
                n = self.lengths[pos]
                first = bisect.bisect_left(self.lengths, n)
                for j in range(first, pos + 1):  # the earliest-arrived among equal lengths
                    if self.ids[j] not in self.taken:
                        return n, self.ids[j]
            pos -= 1
        return None

    def smallest_above(self, limit: int) -> tuple[int, int] | None:
        """(length, id) of the shortest item not taken with length > limit."""
        for pos in range(bisect.bisect_right(self.lengths, limit), len(self.lengths)):
            if self.ids[pos] not in self.taken:
                return self.lengths[pos], self.ids[pos]
        return None


class ExactFillWindow(WindowBestFit):
    """WindowBestFit that closes, instead of emitting non-full, every bin but at most the last one of
    the stream, by re-planning one item to an exact new length (fill="exact").

    `feasible(item, length, target)` is the cost of re-planning `item` (now `length` long) to exactly
    `target` tokens, or None when its policy does not allow it; the cost must be at least
    bound_weight * |log(target/length)| (the donor search stops on that bound). A bin with room r is
    closed by the cheapest of: (a) growing one of its items by r; (b) moving in a donor item re-planned
    to exactly r (as it is when its length is r); (c) moving in the shortest donor longer than r as it
    is, and shrinking one of the bin's items to make room for it; (d) swapping one of its items (of
    length n) back to the donors for a donor re-planned to n + r (as it is when its length is n + r).
    While none is feasible, the longest donor that fits moves in as it is. Donors are the items the
    round carries over. A bin that cannot be closed goes back to the window for up to max_defer more
    rounds (so every item leaves within max_age + max_defer + 1 rounds). At the end of the stream the
    items of the non-full bins are re-packed, longest first, one bin at a time, each bin closed as
    above with the rest as donors, so only the last bin may be non-full. Chosen lengths: take_refits()."""

    def __init__(self, capacity: int, max_images_per_seq: int, window: int, feasible: Feasible, max_age: int = 1,
                 max_defer: int = 2, max_probes: int = 64, bound_weight: float = 0.25, swap_probes: int = 8):
        super().__init__(capacity, max_images_per_seq, window, max_age)
        self.swap_probes = swap_probes
        self._ages: dict[int, int] = {}
        self.feasible, self.max_defer, self.max_probes, self.bound_weight = feasible, max_defer, max_probes, bound_weight
        self.refits: dict[int, int] = {}
        self.unfilled = 0  # bins emitted non-full that were not the stream's last (no feasible re-plan)

    def take_refits(self) -> dict[int, int]:
        """{item: new length} for the items of the bins returned since the last call."""
        out, self.refits = self.refits, {}
        return out

    def _plan(self) -> tuple[list[list[tuple[int, int, int]]], list[int], list[int]]:
        """The round's bins of (-length, id, age) items, their rooms and their oldest ages."""
        return best_fit_decreasing(self._items, self.capacity, self.max_images_per_seq)

    def _round(self, final: bool) -> list[list[int]]:
        bins, rooms, oldest = self._plan()
        emit: list[list] = []  # [[[id, length], ...], room]
        carried = []
        max_age, max_images_per_seq = self.max_age, self.max_images_per_seq
        for contents, room, age in zip(bins, rooms, oldest):
            if room == 0 or len(contents) == max_images_per_seq or (not final and age >= max_age):
                emit.append([[[i, -n] for n, i, _ in contents], room])
            else:
                carried.extend(contents)
        donors = _Donors((-n, i) for n, i, _ in carried)
        ages = self._ages = {i: a for _, i, a in self._items}
        deferred = []
        for entry in emit:
            if entry[1] and not self._close(entry, donors):
                if not final and max(ages[i] for i, _ in entry[0]) < max_age + self.max_defer:
                    deferred.extend((-n, i, ages[i]) for i, n in entry[0])  # back to the window
                    entry[0] = []
                else:
                    self.unfilled += 1
        if final:
            self._repack_final(emit, donors)
        self._items = [(-n, i, ages[i] + 1) for n, i in zip(donors.lengths, donors.ids) if i not in donors.taken]
        self._items += [(n, i, a + 1) for n, i, a in deferred]
        return [[i for i, _ in contents] for contents, _ in emit if contents]

    def _repack_final(self, emit: list[list], donors: _Donors) -> None:
        """End of stream: the donors left make bins one at a time, longest first, each closed exactly."""
        while donors:
            contents, room = [], self.capacity
            while room and len(contents) < self.max_images_per_seq:
                found = donors.largest_at_most(room)
                if found is None:
                    break
                n, item = found
                donors.taken.add(item)
                contents.append([item, n])
                room -= n
            entry = [contents, room]
            if room and donors and not self._close(entry, donors):
                self.unfilled += 1
            emit.append(entry)

    def _close(self, entry: list, donors: _Donors) -> bool:
        """Close the bin `entry` (room > 0) with the cheapest feasible re-plan, moving in the longest
        donor that fits as it is while there is none; False if it cannot be closed."""
        while not self._close_once(entry, donors):
            found = donors.largest_at_most(entry[1]) if len(entry[0]) < self.max_images_per_seq else None
            if found is None:
                return False
            donors.taken.add(found[1])
            entry[0].append([found[1], found[0]])
            entry[1] -= found[0]
            if not entry[1]:
                return True
        return True

    def _close_once(self, entry: list, donors: _Donors) -> bool:
        contents, room = entry
        feasible = self.feasible
        best = None  # (cost, position of the re-planned item in the bin or -1, its new length, donor or None)
        for pos, (item, n) in enumerate(contents):
            cost = feasible(item, n, n + room)
            if cost is not None and (best is None or cost < best[0]):
                best = (cost, pos, n + room, None)
        if len(contents) < self.max_images_per_seq:
            for probes, (bound, n, item) in enumerate(donors.nearest(room)):
                if probes == self.max_probes or (best is not None and self.bound_weight * bound >= best[0]):
                    break
                cost = 0.0 if n == room else feasible(item, n, room)  # an exact fit moves as it is
                if cost is not None and (best is None or cost < best[0]):
                    best = (cost, -1, room, (item, n))
            above = donors.smallest_above(room)
            if above is not None:
                m, donor = above
                for pos, (item, n) in enumerate(contents):
                    if n + room - m >= 1 and (best is None or self.bound_weight * abs(math.log((n + room - m) / n)) < best[0]):
                        cost = feasible(item, n, n + room - m)
                        if cost is not None and (best is None or cost < best[0]):
                            best = (cost, pos, n + room - m, (donor, m))
        swap_age = self.max_age + self.max_defer
        for pos, (item, n) in enumerate(contents):  # (d) swap: a donor takes the place of an item, grown by r
            if best is not None and best[0] == 0:
                break
            if self._ages.get(item, swap_age) >= swap_age:
                continue
            for probes, (bound, m, donor) in enumerate(donors.nearest(n + room)):
                if probes == self.swap_probes or (best is not None and self.bound_weight * bound >= best[0]):
                    break
                cost = 0.0 if m == n + room else feasible(donor, m, n + room)
                if cost is not None and (best is None or cost < best[0]):
                    best = (cost, -1, n + room, (donor, m), pos)
        if best is None:
            return False
        if len(best) == 5:  # swap
            _, _, length, (donor, m), pos = best
            item, n = contents[pos]
            donors.taken.add(donor)
            donors.give(n, item)
            contents[pos] = [donor, length]
            if length != m:
                self.refits[donor] = length
            entry[1] = 0
            return True
        _, pos, length, donor = best
        if donor is not None:
            donors.taken.add(donor[0])
            contents.append(list(donor))
        if pos >= 0:
            contents[pos][1] = length
            self.refits[contents[pos][0]] = length
        elif length != donor[1]:
            contents[-1][1] = length
            self.refits[donor[0]] = length
        entry[1] = 0
        return True


class ExactFillSwap(ExactFillWindow):
    """ExactFillWindow on the rounds of WindowSwap (swap_best_fit) instead of best-fit-decreasing with
    the cap: fewer sequences reach max_images_per_seq with room left, so fewer images are re-planned."""

    def __init__(self, capacity: int, max_images_per_seq: int, window: int, feasible: Feasible, **kw):
        super().__init__(capacity, max_images_per_seq, window, feasible, **kw)
        self._stacks: list[list[int]] = [[] for _ in range(capacity + 1)]

    def _plan(self) -> tuple[list[list[tuple[int, int, int]]], list[int], list[int]]:
        items = self._items
        bins, rooms, _, _ = swap_best_fit([-n for n, _, _ in items], [a for _, _, a in items], self.capacity,
                                       self.max_images_per_seq, self._stacks)
        contents = [[items[p] for p in b] for b in bins]
        return contents, rooms, [max(a for _, _, a in c) for c in contents]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered packer: `make(capacity, max_images_per_seq, window)` builds it; `make_filling(capacity,
    max_images_per_seq, window, feasible)` its exact-fill variant, where it has one."""

    name: str
    doc: str
    make: Callable[[int, int, int], object]
    make_filling: Optional[Callable[[int, int, int, Feasible], object]] = None


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("window-swap", "best fit over a window without the image cap, then exact swaps that bring every "
              "sequence under it; sequences carried up to 3 rounds (the default)",
              lambda c, e, w: WindowSwap(c, e, w), lambda c, e, w, f: ExactFillSwap(c, e, w, f)),
    Algorithm("window-bfd", "streaming best-fit-decreasing over a window of images, with carry-over",
              lambda c, e, w: WindowBestFit(c, e, w), lambda c, e, w, f: ExactFillWindow(c, e, w, f)),
    Algorithm("next-fit", "one open sequence; an image that does not fit closes it (vit-pytorch NaViT)",
              lambda c, e, w: NextFit(c, e)),
    Algorithm("first-fit", "each image into the first open sequence with room (the paper's greedy, A.3)",
              lambda c, e, w: FirstFit(c, e)),
    Algorithm("bfd", "offline best-fit-decreasing: decides everything at the end",
              lambda c, e, w: WindowBestFit(c, e, window=2**62), lambda c, e, w, f: ExactFillWindow(c, e, 2**62, f)),
)}


def make_algorithm(name: str, capacity: int, max_images_per_seq: int, window: int = 1024, feasible: Feasible | None = None):
    """The packer registered as `name`; with `feasible`, its exact-fill variant (see ExactFillWindow)."""
    algo = ALGORITHMS.get(name)
    if algo is None:
        raise ValueError(f"unknown packer {name!r}; one of {', '.join(ALGORITHMS)}")
    if feasible is None:
        return algo.make(capacity, max_images_per_seq, window)
    if algo.make_filling is None:
        raise ValueError(f"exact fill needs packer {' or '.join(n for n, a in ALGORITHMS.items() if a.make_filling)}, "
                         f"got {name!r}")
    return algo.make_filling(capacity, max_images_per_seq, window, feasible)


def pack_lengths(lengths: Iterable[int], name: str, capacity: int, max_images_per_seq: int, window: int = 1024,
                 feasible: Feasible | None = None) -> list[list[int]]:
    """Bins of item indices for a sequence of lengths: the packing decisions alone (benchmarks, planning).
    With `feasible` (a model of which re-plans are allowed), the exact-fill decisions; see fill_lengths."""
    if feasible is not None:
        return fill_lengths(lengths, name, capacity, max_images_per_seq, window, feasible)[0]
    lengths = [int(n) for n in lengths]
    bad = next((i for i, n in enumerate(lengths) if not 1 <= n <= capacity), None) \
        if lengths and not (1 <= min(lengths) and max(lengths) <= capacity) else None
    if bad is not None:
        raise ValueError(f"item {bad} has length {lengths[bad]}, outside [1, {capacity}]")
    algo = make_algorithm(name, capacity, max_images_per_seq, window)
    # Hundreds of thousands of small lists and no reference cycles: the cyclic garbage collector would
    # rescan the growing output again and again (a third of the time at 1M items), so pause it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if type(algo) in (WindowBestFit, WindowSwap):
            bins = algo.push_many(0, lengths)
        else:
            bins = [b for i, n in enumerate(lengths) for b in algo.push(i, n)]
        bins.extend(algo.flush())
    finally:
        if collecting:
            gc.enable()
    return bins


def fill_lengths(lengths: Iterable[int], name: str, capacity: int, max_images_per_seq: int, window: int,
                 feasible: Feasible) -> tuple[list[list[int]], list[int], int]:
    """Exact-fill packing on lengths: (bins of item indices, each item's final length, number of bins
    emitted non-full that were not the stream's last)."""
    algo = make_algorithm(name, capacity, max_images_per_seq, window, feasible)
    final = [int(n) for n in lengths]
    bins: list[list[int]] = []
    for i, n in enumerate(final):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        bins.extend(algo.push(i, n))
        for item, length in algo.take_refits().items():
            final[item] = length
    bins.extend(algo.flush())
    for item, length in algo.take_refits().items():
        final[item] = length
    return bins, final, algo.unfilled
