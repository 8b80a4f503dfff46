"""Per-purpose random streams derived from the one run seed.

Each consumer asks for a stream by name; a stream's sequence depends only on (seed, name), so
adding a new consumer never shifts the numbers another consumer sees.  No ``hash()`` (salted
per process for str), no global ``random``.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, name: str) -> int:
    """A 64-bit seed for stream ``name`` of run ``seed``, stable across processes."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RngStreams:
    """Lazily created ``random.Random`` instances keyed by purpose."""

    __slots__ = ("_streams", "seed")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def stream(self, name: str) -> random.Random:
        rng = self._streams.get(name)
        if rng is None:
            rng = self._streams[name] = random.Random(derive_seed(self.seed, name))
        return rng
