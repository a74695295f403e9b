"""Sharded checkpoint tensors: which rank writes which elements, and reading any box back.

A checkpoint (format version 2) holds every tensor of the single-device model (a weight and its
AdamW moments) as *pieces*: boxes of the whole tensor, each with its global offsets, written by
the rank that held those elements. A rank holds a **fragment** of each of its parameters:

- its **box**, the slice the one slicing rule gives its layout (``parallel/layers.py``
  ``local_part``, through ``state.local_slice``: its tp shard, its experts);
- a **flat range** ``[start, stop)`` of that box in row-major order: the part of DeepSpeed's
  flat fp32 buffers this rank's ZeRO partition covers (ZeRO 1/2 and the bf16 optimizer map a
  parameter to ``lp_fragment_address``; ZeRO 3 to ``ds_tensor``'s partition), or all of it.

Every rank writes what it holds and nothing more, so no tensor is gathered whole anywhere and
bytes per rank are ~ state / world. Fragments held identically by several ranks (a tp-replicated
norm, every dp rank under ZeRO 0) are split among their holders (:func:`assign`), large ones in
parts, small ones whole to one holder in turn. A flat range of a box is stored as at most
``2 * ndim - 1`` boxes (:func:`range_boxes`) so that the manifest speaks only of boxes, and a
reader at any layout intersects the box it needs with the stored ones (:class:`Stored`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from megatron_llm.checkpoint.errors import CheckpointError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes), one entry per dimension
# A fragment held by several ranks is split among them in parts of at least this many elements
# (16 MiB of fp32): smaller ones go whole to one holder, which keeps the manifest short.
SPLIT_MIN = 1 << 22


def box_of_view(view: torch.Tensor, shape: tuple[int, ...]) -> Box:
    """The box a view of a contiguous tensor of ``shape`` covers (``view`` is usually on the
    meta device: the slicing rule applied to nothing). Refuses a view that is not a box."""
    strides = _row_major(shape)
    offset = view.storage_offset()
    offsets = tuple((offset // s) % n if n else 0 for s, n in zip(strides, shape))
    sizes = tuple(view.shape)
    a_box = all(st == s for st, s, n in zip(view.stride(), strides, sizes) if n > 1)
    if not a_box or sum(o * s for o, s in zip(offsets, strides)) != offset:
        raise CheckpointError(
            f"the slice rule gave a view of shape {sizes} and strides {view.stride()} of a "
            f"tensor of shape {shape}, which is not a box; checkpoint/shards.py stores boxes only"
        )
    return offsets, sizes


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def range_boxes(sizes: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Boxes (offsets relative to a box of ``sizes``) covering its row-major elements
    ``[start, stop)``, in order: each is a contiguous run of those elements."""
    if start >= stop:
        return []
    if len(sizes) <= 1:
        return [((start,), (stop - start,))] if sizes else [((), ())]
    inner = math.prod(sizes[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # within one row: the rest of the box, one row deep
        inside = range_boxes(sizes[1:], start - first * inner, stop - first * inner)
        return [((first, *o), (1, *s)) for o, s in inside]
    full_from, full_to = -(-start // inner), stop // inner
    out = range_boxes(sizes, start, full_from * inner)  # a partial first row
    if full_to > full_from:
        out.append(((full_from, *[0] * (len(sizes) - 1)), (full_to - full_from, *sizes[1:])))
    return out + range_boxes(sizes, full_to * inner, stop)  # a partial last row


@dataclasses.dataclass(frozen=True)
class Held:
    """One rank's fragment of one tensor: elements [start, stop) of ``box`` in row-major order."""

    name: str
    shape: tuple[int, ...]  # the single-device tensor's
    box: Box
    start: int
    stop: int


Ranges = list[tuple[int, int]]


def assign(held: list[list[Held]], rank: int) -> dict[str, Ranges]:
    """{name: the flat ranges of its box that ``rank`` writes, in order}, from every rank's
    fragments (``held[r]``); the same on every rank. Ranges that several ranks hold are cut at
    every holder's boundaries (the two stages holding a tied embedding partition it differently)
    and each cut goes to its holders in turn (:func:`_share`). Refuses fragments that do not tile
    each tensor exactly once (a slicing rule or a ZeRO mapping this code does not know)."""
    by_box: dict[tuple, list[tuple[int, int, int]]] = defaultdict(list)
    for r, fragments in enumerate(held):
        for h in fragments:
            if h.stop > h.start:
                by_box[(h.name, h.shape, h.box)].append((h.start, h.stop, r))
    _check_tiling(by_box)
    mine: dict[str, Ranges] = defaultdict(list)
    turn = 0
    for (name, _, _), ranges in sorted(by_box.items()):
        for start, stop, holders in _cuts(ranges):
            if rank in holders:
                mine[name] += _share(start, stop, holders, holders.index(rank), turn)
            turn += 1
    return {name: _merged(ranges) for name, ranges in mine.items() if ranges}


def _cuts(ranges: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, list[int]]]:
    # (start, stop, the ranks holding all of it) between consecutive boundaries of any range.
    bounds = sorted({b for start, stop, _ in ranges for b in (start, stop)})
    for start, stop in zip(bounds, bounds[1:]):
        holders = sorted(r for a, b, r in ranges if a <= start and stop <= b)
        if holders:
            yield start, stop, holders


def _share(start: int, stop: int, holders: list[int], index: int, turn: int) -> Ranges:
    # Large cuts are split among their holders in parts of at least SPLIT_MIN elements; part i
    # goes to holder (turn + i) mod holders, so small ones rotate among them.
    parts = max(1, min(len(holders), (stop - start) // SPLIT_MIN))
    i = (index - turn) % len(holders)
    if i >= parts:
        return []
    n = stop - start
    return [(start + n * i // parts, start + n * (i + 1) // parts)]


def _merged(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for start, stop in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


def _check_tiling(by_box: Mapping[tuple, list[tuple[int, int, int]]]) -> None:
    by_name: dict[str, list[tuple]] = defaultdict(list)
    for key, ranges in by_box.items():
        by_name[key[0]].append((key, ranges))
    for name, entries in by_name.items():
        shapes = sorted({key[1] for key, _ in entries})
        boxes = sorted(key[2] for key, _ in entries)
        problem = None
        if len(shapes) > 1:
            problem = f"ranks disagree on its shape ({shapes})"
        elif any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            problem = "ranks hold overlapping boxes"
        else:
            covered = sum(stop - start for _, ranges in entries for start, stop, _ in _cuts(ranges))
            if covered != math.prod(shapes[0]):
                problem = f"the ranks hold {covered} of its {math.prod(shapes[0])} elements"
        if problem:
            raise CheckpointError(
                f"checkpoint: {name} cannot be written as shards: {problem}; the slice rule "
                "(parallel/layers.py local_part) or the ZeRO mapping (checkpoint/state.py "
                "held_fragments) does not match this layout"
            )


def _overlap(a: Box, b: Box) -> bool:
    return all(
        oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1], strict=True)
    )


def pieces_of(h: Held, ranges: Ranges, file: str) -> list[dict[str, Any]]:
    """Manifest entries for the elements ``ranges`` of fragment ``h``'s box, stored flat and
    one after the other in ``file`` under ``h.name``: each piece's global box and where it
    starts there."""
    out, at = [], 0
    for start, stop in ranges:
        for rel, sizes in range_boxes(h.box[1], start, stop):
            offset = [o + r for o, r in zip(h.box[0], rel)]
            out.append({"file": file, "at": at, "offset": offset, "size": list(sizes)})
            at += math.prod(sizes)
    return out


def whole_pieces(file: str, shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """The one piece of a tensor stored whole (format 1 checkpoints, weights-only ones)."""
    return [{"file": file, "at": 0, "offset": [0] * len(shape), "size": list(shape)}]


class Stored:
    """One tensor of a checkpoint (a weight or one AdamW moment), read by boxes: only the
    stored pieces a box meets are touched (the files are memory-mapped)."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        pieces: list[dict[str, Any]],
        flat: Callable[[str, str], torch.Tensor],
    ) -> None:
        self.name, self.shape, self.pieces = name, torch.Size(shape), pieces
        self._flat = flat  # (file, name) -> that file's flat tensor for this name

    def box(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The elements of the box ``offsets`` + ``sizes`` (fp32, a fresh tensor)."""
        out = torch.empty(sizes, dtype=torch.float32)
        found = 0
        for piece, (mine, theirs) in self._meeting(offsets, sizes):
            n = math.prod(piece["size"])
            flat = self._flat(piece["file"], self.name).reshape(-1)
            src = flat[piece["at"] : piece["at"] + n].view(piece["size"])
            out[mine].copy_(src[theirs])
            found += out[mine].numel()
        if found != out.numel():
            raise CheckpointError(
                f"checkpoint: {self.name}: the stored pieces cover {found} of the "
                f"{out.numel()} elements asked for; the manifest is incomplete"
            )
        return out

    def whole(self) -> torch.Tensor:
        return self.box((0,) * len(self.shape), tuple(self.shape))

    def __getitem__(self, index: tuple[slice, ...] | slice) -> torch.Tensor:
        """``stored[a:b, c:d]``: that box, read alone. Only unit-step slices, as the slice rule
        (``layers.part_index``) makes, so ``local_part(stored, p, ctx)`` reads just the part."""
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.shape) - len(index))
        if len(index) != len(self.shape) or not all(
            isinstance(i, slice) and i.step in (None, 1) for i in index
        ):
            raise TypeError(f"{self.name}: a stored tensor reads boxes only, not {index}")
        ranges = [i.indices(n)[:2] for i, n in zip(index, self.shape)]
        return self.box(tuple(a for a, _ in ranges), tuple(max(b - a, 0) for a, b in ranges))

    def _meeting(
        self, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> Iterator[tuple[dict[str, Any], tuple[tuple[slice, ...], tuple[slice, ...]]]]:
        for piece in self.pieces:
            lo = [max(a, b) for a, b in zip(offsets, piece["offset"])]
            hi = [
                min(a + n, b + m)
                for a, n, b, m in zip(offsets, sizes, piece["offset"], piece["size"])
            ]
            if all(h > low for h, low in zip(hi, lo)) or not sizes:
                mine = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offsets))
                theirs = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, piece["offset"]))
                yield piece, (mine, theirs)
