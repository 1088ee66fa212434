"""The vectorised contour tracer against a plain-Python walk of the same rules, and its decimal text."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from node.write.contours import MIN_AREA_PX, mask_contours_px
from node.write.decimal_text import fixed3_groups


def _reference_contours(stack: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Contours by the module docstring's rules, one edge at a time.

    Directed boundary edges with the inside on their right, through pixel-edge midpoints; at a
    corner shared by two outgoing edges (pixels touching only at that corner) the walk turns right;
    each cycle starts at its first edge in the tracer's edge order (vertical edges in raster order,
    then horizontal ones); points on a straight run are dropped (not in contours of ≤ 3 points);
    contours of < 3 points or less than MIN_AREA_PX pixels are dropped; slice order, stable.
    """
    edges = []  # (slice, start corner, end corner, direction, midpoint): corners as (row, col) on the pixel grid
    slices, rows, cols = stack.shape
    inside = np.pad(stack, ((0, 0), (1, 1), (1, 1)))

    def pixel(k: int, i: int, j: int) -> bool:
        return bool(inside[k, i + 1, j + 1])

    for k in range(slices):
        for i in range(-1, rows + 1):
            for j in range(-1, cols):
                left, right = pixel(k, i, j), pixel(k, i, j + 1)
                if left != right:  # vertical edge on corner column j + 1; up if the right pixel is in
                    top, bottom = (i, j + 1), (i + 1, j + 1)
                    edges.append((k, bottom, top, 0, (i + 0.0, j + 0.5)) if right
                                 else (k, top, bottom, 2, (i + 0.0, j + 0.5)))
    for k in range(slices):
        for i in range(-1, rows):
            for j in range(-1, cols + 1):
                upper, lower = pixel(k, i, j), pixel(k, i + 1, j)
                if upper != lower:  # horizontal edge on corner row i + 1; east if the lower pixel is in
                    west, east = (i + 1, j), (i + 1, j + 1)
                    edges.append((k, west, east, 1, (i + 0.5, j + 0.0)) if lower
                                 else (k, east, west, 3, (i + 0.5, j + 0.0)))
    leaving: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for n, (k, start, _, _, _) in enumerate(edges):
        leaving.setdefault((k, start), []).append(n)

    def successor(n: int) -> int:
        k, _, end, direction, _ = edges[n]
        options = leaving[(k, end)]
        if len(options) == 1:
            return options[0]
        return next(m for m in options if edges[m][3] == (direction + 1) % 4)  # saddle: turn right

    seen: set[int] = set()
    found = []
    for n in range(len(edges)):
        if n in seen:
            continue
        cycle = [n]
        seen.add(n)
        m = successor(n)
        while m != n:
            cycle.append(m)
            seen.add(m)
            m = successor(m)
        points = np.array([edges[m][4] for m in cycle], dtype=np.float64)
        if len(points) > 3:
            straight = []
            for p in range(len(points)):
                back = points[p] - points[p - 1]
                ahead = points[(p + 1) % len(points)] - points[p]
                straight.append(abs(back[0] * ahead[1] - back[1] * ahead[0]) < 1e-9 and float(back @ ahead) > 0)
            points = points[~np.array(straight)]
        r, c = points[:, 0], points[:, 1]
        area = 0.5 * abs(float(np.dot(r, np.roll(c, -1)) - np.dot(c, np.roll(r, -1))))
        if len(points) >= 3 and area >= MIN_AREA_PX:
            found.append((edges[n][0], points))
    found.sort(key=lambda item: item[0])
    return found


@pytest.mark.parametrize("seed", range(4))
def test_tracer_gives_the_plain_walks_contours_point_for_point(seed: int) -> None:
    """Saddles, holes, islands, single pixels, masks touching the border, empty slices."""
    rng = np.random.default_rng(seed)
    stack = np.stack([rng.uniform(size=(13, 17)) > 0.55 for _ in range(3)]
                     + [ndimage.binary_opening(rng.uniform(size=(13, 17)) > 0.35) for _ in range(3)]
                     + [np.zeros((13, 17), dtype=bool)])
    stack[-2, 3:9, 4:12] = True
    stack[-2, 5:7, 6:8] = False  # a ring
    ours = mask_contours_px(stack)
    reference = _reference_contours(stack)
    assert [k for k, _ in ours] == [k for k, _ in reference]
    for (_, a), (_, b) in zip(ours, reference, strict=True):
        assert np.array_equal(a, b)


def test_tracer_of_an_empty_mask_and_of_one_pixel() -> None:
    assert mask_contours_px(np.zeros((2, 5, 5), dtype=bool)) == []
    one = np.zeros((1, 5, 5), dtype=bool)
    one[0, 2, 3] = True
    [(k, points)] = mask_contours_px(one)
    assert k == 0 and sorted(map(tuple, points.tolist())) == [(1.5, 3.0), (2.0, 2.5), (2.0, 3.5), (2.5, 3.0)]


def _printf(values: np.ndarray, sizes: list[int]) -> list[bytes]:
    """What the RTSTRUCT writer formatted value by value before ("%.3f", which format(v, ".3f") is)."""
    out, at = [], 0
    for size in sizes:
        out.append("\\".join(format(v, ".3f") for v in values[at : at + size].tolist()).encode())
        at += size
    return out


def test_decimal_text_is_printfs_for_coordinates_ties_signs_and_extremes() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([
        rng.uniform(-700, 700, 20_000),                       # patient coordinates
        np.round(rng.uniform(-700, 700, 2_000) * 2000) / 2000,  # exact half-thousandths: ties
        (np.arange(-2_000, 2_000) + 0.5) * 0.48828125,        # pixel-edge midpoints at 500/512 mm spacing
        rng.normal(0, 1e-3, 2_000),                           # around zero: "-0.000"
        [0.0, -0.0, 0.0005, -0.0005, 0.0015, 2.5005, 999_999.9995, -1e6, 123_456_789.0625, 1e11],
    ])
    sizes = [1, 2, 3] + [3 * 7] * ((len(values) - 6) // 21)
    sizes.append(len(values) - sum(sizes))
    assert fixed3_groups(values, np.array(sizes)) == _printf(values, sizes)


def test_decimal_text_of_non_finite_and_huge_values_and_bad_groups() -> None:
    values = np.array([np.inf, -np.nan, 1.0, 1e15, -2.25])
    assert fixed3_groups(values, np.array([2, 3])) == _printf(values, [2, 3])
    assert fixed3_groups(np.empty(0), np.empty(0, dtype=np.int64)) == []
    with pytest.raises(ValueError, match="do not split 3 values"):
        fixed3_groups(np.ones(3), np.array([2, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        fixed3_groups(np.ones(3), np.array([3, 0]))
