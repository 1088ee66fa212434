"""Which frames a SEG holds (every one, or only the non-empty ones as highdicom's ``omit_empty_frames`` chooses
them) and their pixel data, for node/write/seg.py's fast path.

highdicom's rule, reproduced here: the planes (source slices, in plane order) on which nothing at all is
segmented are dropped, and the position dimension index counts the planes kept; a BINARY segment then has a
frame on each kept plane where its mask is non-empty (segment after segment), a LABELMAP one frame per kept
plane. When nothing is segmented anywhere every frame is kept (a SEG cannot be empty).

Both the frames and their pixels are found within each segment's bounding box (scipy's ``find_objects``, one
pass over the volume): a hundred organs cost about what their boxes hold, not a hundred passes over the CT.
BINARY frames are bit-packed box by box when a row is a whole number of bytes (columns a multiple of 8, as
for every CT and MR matrix); otherwise whole frames are packed, a chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.write.contours import Box, label_boxes, structure_box

#: Frames bit-packed per numpy call on the whole-frame path (a multiple of 8: every chunk ends on a byte).
PACK_CHUNK_FRAMES = 32


@dataclass(frozen=True)
class Frames:
    """The frames of a SEG, in order: each one's segment (1-based index into the segment numbers; 0 for a
    LABELMAP), its position's dimension index (1-based, among the planes kept) and its source slice."""

    segment_index: np.ndarray
    dimension: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def kept_slices(self) -> np.ndarray:
        """The source slices of the planes kept, in source (header) order."""
        return np.unique(self.slices)


def _mask(block: np.ndarray, group: tuple[int, ...]) -> np.ndarray:
    if len(group) == 1:
        return np.asarray(block == group[0])
    lut = np.zeros(256, dtype=bool)
    lut[list(group)] = True
    return np.asarray(lut[block])


def plan_frames(segments: np.ndarray, order: np.ndarray, segment_numbers: list[int] | None,
                members: dict[int, tuple[int, ...]] | None = None,
                boxes: dict[int, Box] | None = None, *, omit: bool = True) -> tuple[Frames, dict[int, Box]]:
    """The non-empty frames (every frame unless ``omit``) of ``segments`` (slices, rows, cols; segment numbers, 0
    for none) whose planes lie in ``order`` (source slice of each plane position); ``segment_numbers`` None for a
    LABELMAP. Also the boxes of the segment numbers (``boxes`` when given, else found here; for
    :func:`pixel_data`)."""
    boxes = label_boxes(segments) if boxes is None else boxes
    count = len(segments)
    if not omit:
        present = np.ones((1 if segment_numbers is None else len(segment_numbers), count), dtype=bool)
    elif segment_numbers is None:
        present = np.zeros((1, count), dtype=bool)
        present[0] = segments.reshape(count, -1).any(axis=1)
    else:
        present = np.zeros((len(segment_numbers), count), dtype=bool)
        for i, number in enumerate(segment_numbers):
            group = members.get(number, (number,)) if members else (number,)
            box = structure_box(boxes, group)
            if box is not None:
                present[i, box[0]] = _mask(segments[box], group).any(axis=(1, 2))
    kept = order[present[:, order].any(axis=0)]
    if kept.size == 0:  # nothing anywhere: highdicom then keeps every frame
        kept, present = order, np.ones_like(present)
    index, position = np.nonzero(present[:, kept])  # segment-major, then plane order
    return Frames(index + 1 if segment_numbers is not None else np.zeros_like(index), position + 1,
                  kept[position]), boxes


def pixel_data(segments: np.ndarray, frames: Frames, segment_numbers: list[int] | None, bits: int,
               boxes: dict[int, Box], members: dict[int, tuple[int, ...]] | None = None) -> bytes:
    """The frames' pixels in order: bit-packed masks (BINARY; ``members`` maps a segment number to the segment
    numbers making up its mask, default itself) or the segment numbers (LABELMAP), padded to even length."""
    if segment_numbers is None:
        dtype = np.uint8 if bits == 8 else np.uint16
        data = np.ascontiguousarray(segments[frames.slices], dtype=dtype).tobytes()
    elif segments.shape[2] % 8 == 0:
        data = _packed_by_box(segments, frames, segment_numbers, boxes, members).tobytes()
    else:
        data = _packed_whole(segments, frames, segment_numbers, members).tobytes()
    # highdicom pads an odd length with an ASCII "0" (pydicom would otherwise add a NUL)
    return data + b"0" if len(data) % 2 else data


def _packed_by_box(segments: np.ndarray, frames: Frames, segment_numbers: list[int], boxes: dict[int, Box],
                   members: dict[int, tuple[int, ...]] | None) -> np.ndarray:
    """Whole-byte rows: each segment's frames packed within its box (widened to whole bytes), the rest zero."""
    _, rows, cols = segments.shape
    packed = np.zeros((len(frames), rows, cols // 8), dtype=np.uint8)
    for i, number in enumerate(segment_numbers, start=1):
        at = np.flatnonzero(frames.segment_index == i)
        group = members.get(number, (number,)) if members else (number,)
        box = structure_box(boxes, group)
        if at.size == 0 or box is None:
            continue
        first, stop = box[2].start // 8, -(-box[2].stop // 8)
        for start in range(0, at.size, PACK_CHUNK_FRAMES):  # a BODY's box is the whole CT: in chunks
            chunk = at[start : start + PACK_CHUNK_FRAMES]
            block = segments[:, box[1], first * 8 : stop * 8][frames.slices[chunk]]
            packed[chunk, box[1], first:stop] = np.packbits(_mask(block, group), axis=-1, bitorder="little")
    return packed


def _packed_whole(segments: np.ndarray, frames: Frames, segment_numbers: list[int],
                  members: dict[int, tuple[int, ...]] | None) -> np.ndarray:
    """Any matrix: whole frames packed, PACK_CHUNK_FRAMES at a time (rows may end within a byte)."""
    rows, cols = segments.shape[1:]
    packed = np.empty((len(frames) * rows * cols + 7) // 8, dtype=np.uint8)
    step = PACK_CHUNK_FRAMES * rows * cols // 8
    for n, start in enumerate(range(0, len(frames), PACK_CHUNK_FRAMES)):
        index = frames.segment_index[start : start + PACK_CHUNK_FRAMES]
        slices = frames.slices[start : start + PACK_CHUNK_FRAMES]
        masks = np.empty((len(index), rows, cols), dtype=bool)
        for i in np.unique(index):  # one comparison per segment in the chunk; its frames are consecutive
            at = np.flatnonzero(index == i)
            number = segment_numbers[int(i) - 1]
            group = members.get(number, (number,)) if members else (number,)
            masks[at[0] : at[-1] + 1] = _mask(segments[slices[at]], group)
        bits_out = np.packbits(masks, bitorder="little")
        packed[n * step : n * step + len(bits_out)] = bits_out
    return packed
