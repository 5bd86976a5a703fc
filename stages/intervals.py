"""Time intervals as sorted, disjoint (start, end) lists: the arithmetic that attribution,
filters and the stats funnel share."""

from __future__ import annotations

Intervals = list[tuple[float, float]]


def union(intervals: Intervals) -> Intervals:
    """Sorted, disjoint cover of the input; empty intervals dropped."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def covered(intervals: Intervals, start: float, end: float) -> float:
    """Seconds of [start, end) inside a sorted, disjoint interval list."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals if b > start and a < end)


def subtract(intervals: Intervals, taken: Intervals) -> Intervals:
    """Parts of a sorted, disjoint list not inside another sorted, disjoint list (one merge pass)."""
    out, j, n = [], 0, len(taken)
    for a, b in intervals:
        while j < n and taken[j][1] <= a:
            j += 1
        cur, k = a, j
        while k < n and taken[k][0] < b:
            c, d = taken[k]
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def complement(intervals: Intervals, start: float, end: float) -> Intervals:
    """Parts of [start, end) not inside a sorted, disjoint interval list."""
    return subtract([(start, end)], intervals) if end > start else []


def intersect(intervals: Intervals, other: Intervals) -> Intervals:
    return subtract(intervals, subtract(intervals, other))


def length(intervals: Intervals) -> float:
    return float(sum(b - a for a, b in intervals))
