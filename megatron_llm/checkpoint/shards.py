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


def assign(held: list[list[Held]], rank: int) -> dict[str, tuple[int, int]]:
    """{name: the flat range of its box that ``rank`` writes}, from every rank's fragments
    (``held[r]``). The same on every rank. Refuses fragments that do not tile each tensor
    exactly once (a slicing rule or a ZeRO mapping this code does not know)."""
    holders: dict[tuple, list[int]] = defaultdict(list)
    for r, fragments in enumerate(held):
        for h in fragments:
            if h.stop > h.start:
                holders[(h.name, h.shape, h.box, h.start, h.stop)].append(r)
    _check_tiling(holders)
    mine: dict[str, tuple[int, int]] = {}
    for turn, (key, ranks) in enumerate(sorted(holders.items())):
        if rank not in ranks:
            continue
        start, stop = key[3], key[4]
        parts = max(1, min(len(ranks), (stop - start) // SPLIT_MIN))
        # Part i goes to holder (turn + i) mod holders: small fragments rotate among them.
        index = (ranks.index(rank) - turn) % len(ranks)
        if index < parts:
            n = stop - start
            mine[key[0]] = (start + n * index // parts, start + n * (index + 1) // parts)
    return mine


def _check_tiling(holders: Mapping[tuple, list[int]]) -> None:
    by_name: dict[str, list[tuple]] = defaultdict(list)
    for key in holders:
        by_name[key[0]].append(key)
    for name, keys in by_name.items():
        shape = keys[0][1]
        boxes = sorted({k[2] for k in keys})
        problem = None
        if any(k[1] != shape for k in keys):
            problem = f"ranks disagree on its shape ({sorted({k[1] for k in keys})})"
        elif any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            problem = "ranks hold overlapping boxes"
        elif any(_ranges_overlap(sorted((k[3], k[4]) for k in keys if k[2] == b)) for b in boxes):
            problem = "ranks hold overlapping flat ranges of one box"
        elif sum(k[4] - k[3] for k in keys) != math.prod(shape):
            held = sum(k[4] - k[3] for k in keys)
            problem = f"the ranks hold {held} of its {math.prod(shape)} elements"
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


def _ranges_overlap(ranges: list[tuple[int, int]]) -> bool:
    return any(stop > nxt for (_, stop), (nxt, _) in zip(ranges, ranges[1:]))


def pieces_of(h: Held, start: int, stop: int, file: str) -> list[dict[str, Any]]:
    """Manifest entries for elements [start, stop) of fragment ``h``'s box, stored flat in
    ``file`` under ``h.name`` from element 0: each piece's global box and where it starts."""
    out, at = [], 0
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
