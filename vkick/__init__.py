"""vkick: the Linux v5.13 KVM interrupt-injection path, emulated as concurrent async tasks.

The stable surface is what this module exports, :mod:`vkick.testing`, the pytest plugin and
the ``vkick`` command; the mirror packages (``vkick.kernel``, ``vkick.kvm`` …) are internals.

* :class:`Host` — a whole emulated host from a run configuration, driven from any running
  event loop (``vkick run`` is a thin layer over it);
* :func:`load_config` / :func:`parse_config` / :class:`HostConfig` — run configurations;
* :func:`check_scenarios` — behaviour scenarios against their expectations (``vkick check``).

Names are imported on first use, so ``import vkick`` (and the pytest plugin, which lives
in this package) stays cheap for code that does not run an emulation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str]] = {
    "CheckResult": ("vkick.scenario.check", "CheckResult"),
    "ConfigError": ("vkick.errors", "ConfigError"),
    "Host": ("vkick.host", "Host"),
    "HostConfig": ("vkick.scenario.config", "HostConfig"),
    "InvariantViolation": ("vkick.errors", "InvariantViolation"),
    "RunResult": ("vkick.host", "RunResult"),
    "ScenarioError": ("vkick.errors", "ScenarioError"),
    "VkickError": ("vkick.errors", "VkickError"),
    "check_scenarios": ("vkick.scenario.check", "check_files"),
    "load_config": ("vkick.scenario.config", "load_config"),
    "parse_config": ("vkick.scenario.config", "parse_config"),
    "self_check": ("vkick.host", "self_check"),
}

__all__ = [
    "CheckResult",
    "ConfigError",
    "Host",
    "HostConfig",
    "InvariantViolation",
    "RunResult",
    "ScenarioError",
    "VkickError",
    "__version__",
    "check_scenarios",
    "load_config",
    "parse_config",
    "self_check",
]

if TYPE_CHECKING:
    from vkick.errors import ConfigError as ConfigError
    from vkick.errors import InvariantViolation as InvariantViolation
    from vkick.errors import ScenarioError as ScenarioError
    from vkick.errors import VkickError as VkickError
    from vkick.host import Host as Host
    from vkick.host import RunResult as RunResult
    from vkick.host import self_check as self_check
    from vkick.scenario.check import CheckResult as CheckResult
    from vkick.scenario.check import check_files as check_scenarios
    from vkick.scenario.config import HostConfig as HostConfig
    from vkick.scenario.config import load_config as load_config
    from vkick.scenario.config import parse_config as parse_config


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'vkick' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
