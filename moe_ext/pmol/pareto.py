"""Pareto fronts and hypervolume of score vectors (every coordinate: higher is better), the
way preference-mixing work (Rewarded Soups, Rewards-in-Context, MOD) compares methods:
each method's steering sweep gives a set of points, its front is the non-dominated subset,
and the hypervolume is the volume those points dominate above a reference point."""
from __future__ import annotations

from typing import Sequence

Point = Sequence[float]


def dominates(p: Point, q: Point) -> bool:
    """p is at least as good as q everywhere and better somewhere."""
    return all(a >= b for a, b in zip(p, q)) and any(a > b for a, b in zip(p, q))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume of the union of the boxes [reference, p] over the points (exact, by slicing
    along the last coordinate; fine for tens of points in a few dimensions). Points not
    above the reference in every coordinate add nothing."""
    d = len(reference)
    if any(len(p) != d for p in points):
        raise ValueError(f"every point needs {d} coordinates, like the reference")
    inside = [tuple(p) for p in points if all(a > r for a, r in zip(p, reference))]
    return _slice_volume(inside, tuple(reference))


def _slice_volume(points: list[tuple], reference: tuple) -> float:
    if not points:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in points) - reference[0]
    points = sorted(points, key=lambda p: p[-1], reverse=True)
    volume = 0.0
    for i, p in enumerate(points):  # slab between this point's last coordinate and the next's
        below = points[i + 1][-1] if i + 1 < len(points) else reference[-1]
        if p[-1] > below:
            volume += (p[-1] - below) * _slice_volume([q[:-1] for q in points[:i + 1]], reference[:-1])
    return volume
