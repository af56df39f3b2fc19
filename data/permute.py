"""Seeded permutations that never change across numpy versions or platforms.

numpy's `Generator` only promises stream compatibility within a release, and a resumed run may
use another one; the loader's epoch order and the validation split must not move when it does.
So the order is the argsort of a keyed hash: splitmix64 (Steele, Lea, Flood 2014, "Fast
splittable pseudorandom number generators") of (key..., index), pure uint64 arithmetic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["keyed_permutation"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of `x + golden`, elementwise on a uint64 array (wraps mod 2**64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def keyed_permutation(n: int, *key: int) -> np.ndarray:
    """Permutation of `range(n)` determined by the non-negative integers `key` (e.g. seed, epoch).

    Returns:
        int64 array `[n]`.

    Raises:
        ValueError: a key outside [0, 2**64).
    """
    state = np.zeros(1, dtype=np.uint64)
    for part in key:
        if not 0 <= part < 2**64:
            raise ValueError(f"permutation key {part}: must be in [0, 2**64)")
        state = _splitmix64(state ^ np.uint64(part))
    scores = _splitmix64(state ^ np.arange(n, dtype=np.uint64))
    return np.argsort(scores, kind="stable").astype(np.int64)
