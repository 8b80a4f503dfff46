"""The vkick error hierarchy: errors a user can act on, each one line that says what to do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class VkickError(Exception):
    """Base of every error vkick raises on purpose."""

    exit_code = 1


class ConfigError(VkickError):
    """A config or scenario file is invalid: ``FILE: field.path: expected …, got …``."""

    exit_code = 2

    def __init__(self, file: str, field: str, expected: str, got: str) -> None:
        self.file, self.field, self.expected, self.got = file, field, expected, got
        super().__init__(f"{file}: {field}: expected {expected}, got {got}".replace("\n", " "))


class ScenarioError(VkickError):
    """A scenario could not be run as written."""


class LogFormatError(VkickError):
    """A log file could not be read."""

    def __init__(self, file: str, line: int, what: str) -> None:
        self.file, self.line = file, line
        super().__init__(f"{file}:{line}: {what}")


class InvariantViolation(VkickError):  # noqa: N818  (the name the design uses)
    """A guest-visible invariant (spec §17) was broken (``RunResult.raise_for_violations``):
    the violations, the first one's causal trace, and the line that replays the run."""

    def __init__(self, violations: Sequence[Any], reproduce: str) -> None:
        first = violations[0]
        self.violations = list(violations)
        self.invariant, self.detail, self.trace = first.invariant, first.detail, first.trace
        self.reproduce = reproduce
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"invariant {first.invariant} violated: {first.detail}{more}; "
                         f"reproduce: {reproduce}")


class VkickInternalError(VkickError):
    """vkick itself is broken: please report it with the seed and config."""

    exit_code = 3
