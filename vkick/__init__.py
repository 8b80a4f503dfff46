"""vkick: the Linux v5.13 KVM interrupt-injection path, emulated as concurrent async tasks.

The stable surface is what this module exports, :mod:`vkick.testing`, the pytest plugin and
the ``vkick`` command; the mirror packages (``vkick.kernel``, ``vkick.kvm`` …) are internals.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
