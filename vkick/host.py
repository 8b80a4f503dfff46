"""The public async API: a whole emulated host (VMs, vCPUs, vhost-net devices, traffic).

``Host`` is a thin composition over the runtime, the scenario builder and the observability
consumers.  The emulation runs on its own virtual-time event loop; the async methods drive
that loop from a worker thread (``anyio.to_thread``), so a Host works inside *any* running
event loop — an application's, or pytest-asyncio's — without touching it::

    async with vkick.Host.from_config("configs/multiqueue.toml", seed=7) as host:
        result = await host.run("5ms")
        assert result.summary.delivered > 0

The synchronous twins (``run_sync``) are for scripts and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

from vkick.runtime import PreemptPolicy, Runtime, parse_duration_ns


@dataclass(slots=True)
class RunResult:
    """What a run produced: the summary, the invariant violations and where the log went."""

    summary: Any  # vkick.obs.stats.Summary
    violations: list[Any] = field(default_factory=list)
    log_path: Path | None = None
    t_ns: int = 0
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class Host:
    """An emulated host built from a run config (see ``configs/`` and the README)."""

    def __init__(self, config: Any, *, seed: int | None = None, log: str | Path | None = None,
                 log_level: str | None = None, policy: PreemptPolicy | None = None,
                 source: str = "<config>") -> None:
        self.config = config
        self.source = source
        run = config.run
        self.seed = run.seed if seed is None else seed
        self.log_path = Path(log) if log is not None else (
            Path(run.log) if run.log else None)
        self.log_level = log_level or run.log_level
        self.policy = policy or _policy_from_config(run)
        self.rt: Runtime | None = None
        self._model: Any = None

    @classmethod
    def from_config(cls, config: str | Path | dict[str, Any] | Any | None = None, *,
                    seed: int | None = None, **kwargs: Any) -> Host:
        """Load and validate ``config`` (a TOML path, a dict, a RunConfig, or None for the
        built-in default) and return an un-started Host."""
        from vkick.scenario.config import RunConfig, load_config, load_default_config  # noqa: PLC0415

        if config is None:
            cfg, source = load_default_config(), "<built-in default>"
        elif isinstance(config, RunConfig):
            cfg, source = config, "<RunConfig>"
        elif isinstance(config, dict):
            cfg, source = load_config(config, source_name="<dict>"), "<dict>"
        else:
            cfg, source = load_config(Path(config)), str(config)
        return cls(cfg, seed=seed, source=source, **kwargs)

    # ------------------------------------------------------------------ synchronous core

    def start_sync(self) -> None:
        """Build the host on a fresh runtime (idempotent)."""
        if self.rt is not None:
            return
        from vkick.scenario.build import build_host  # noqa: PLC0415

        self.rt = Runtime(seed=self.seed, policy=self.policy)
        rt = self.rt
        self._model = rt.call(build_host, rt, self.config,
                              log_path=self.log_path, log_level=self.log_level)

    def run_sync(self, duration: str | int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> RunResult:
        """Run for ``duration`` of emulated time (default: the config's) and summarise."""
        self.start_sync()
        assert self.rt is not None
        total = parse_duration_ns(duration) if duration is not None else (
            self.config.run.duration_ns)
        model = self._model
        self.rt.call(model.run_for, total, progress)
        return model.result(seed=self.seed)

    def close_sync(self) -> None:
        """Stop every task, flush and close the log (whole lines only)."""
        model, rt = self._model, self.rt
        try:
            if model is not None:
                model.close()
        finally:
            if rt is not None:
                rt.close()
            self._model = None

    # ------------------------------------------------------------------ async front door

    async def __aenter__(self) -> Host:
        await anyio.to_thread.run_sync(self.start_sync)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await anyio.to_thread.run_sync(self.close_sync)

    async def run(self, duration: str | int | None = None) -> RunResult:
        """Advance the emulation by ``duration`` (emulated time) and return the result."""
        return await anyio.to_thread.run_sync(self.run_sync, duration)


def _policy_from_config(run: Any) -> PreemptPolicy:
    pol = run.policy
    if pol.kind == "none":
        return PreemptPolicy.none()
    from vkick.runtime.sched import SitePolicy  # noqa: PLC0415

    sites = {name: SitePolicy(s.p, s.max_turns, s.max_delay_ns)
             for name, s in (pol.windows or {}).items()}
    return PreemptPolicy.random(pol.p, pol.max_turns, pol.max_delay_ns, sites)
