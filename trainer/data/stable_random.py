"""Random integers that stay the same across Python versions, for generated data and prompt orders."""

from __future__ import annotations

import random


def randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from ``rng.random()`` alone.

    ``random.random()`` is the one part of the module whose sequence Python promises to keep across
    versions (``randint``/``shuffle`` may change), so generated data and orders survive an upgrade.
    """
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)
