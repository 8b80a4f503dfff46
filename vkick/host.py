"""The public API: one emulated host, driven from any running event loop.

::

    async with vkick.Host.from_config("configs/multiqueue.toml", seed=3) as host:
        result = await host.run()          # the configured traffic, then drain
        assert result.ok, result.violations
        print(result.summary["delivered"])

The emulation runs in virtual time on its own event loop, in a thread of its own: the
caller's loop (asyncio, uvloop, or trio through anyio) only awaits it, so an embedding test
neither slows the emulation nor perturbs its interleavings — the same seed and config give
the same event stream, byte for byte, whoever awaits it.  Event sinks passed to the host run
in the emulation thread, synchronously, as every vkick consumer does.

``vkick run`` and ``vkick check`` are thin layers over this module and
:func:`vkick.scenario.check.check_files`.
"""

from __future__ import annotations

import concurrent.futures
import shlex
import tempfile
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypeVar

import anyio
import anyio.to_thread
import orjson

from vkick.errors import ConfigError, InvariantViolation
from vkick.obs.invariants import InvariantChecker, Violation
from vkick.obs.irqlife import IrqLife, attach
from vkick.obs.jsonl import JsonlWriter
from vkick.obs.stats import RunStats
from vkick.obs.tracepoints import Level
from vkick.runtime.clock import format_duration_ns, parse_duration_ns
from vkick.runtime.events import EventRecord, EventSink
from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.runtime.selfcheck import first_difference
from vkick.runtime.tasks import Runtime
from vkick.scenario.build import EmulatedHost, build_host
from vkick.scenario.config import (
    DEFAULT_SOURCE,
    HostConfig,
    load_config,
    parse_config,
    run_with,
)
from vkick.scenario.workload import RrFlow, rx_generator, tx_generator

T = TypeVar("T")

ConfigLike = str | Path | Mapping[str, Any] | HostConfig | None


@dataclass(slots=True)
class RunResult:
    """What a run produced: the summary (``vkick run --json``'s schema) and violations."""

    summary: dict[str, Any]
    violations: list[Violation] = field(default_factory=list)
    seed: int = 0
    source: str = ""
    duration_ns: int = 0
    policy: str = "none"

    @property
    def ok(self) -> bool:
        return not self.violations

    def raise_for_violations(self) -> None:
        """Raise :class:`~vkick.errors.InvariantViolation` if an invariant was broken (a
        test's one-line check, its message ending in the :meth:`reproduce` line)."""
        if self.violations:
            raise InvariantViolation(self.violations, self.reproduce())

    def reproduce(self) -> str:
        """The command line that replays this run: its config, seed, traffic duration and
        preemption policy.  A config given as a mapping or a model (source ``<dict>``,
        ``<config>``) has no file: the line says it must be written to one."""
        opts = (f"--seed {self.seed} --duration {format_duration_ns(self.duration_ns)} "
                f"--policy {self.policy}")
        if self.source == DEFAULT_SOURCE:
            return f"vkick run {opts}"
        if self.source.startswith("<"):
            return (f"vkick run CONFIG.toml {opts} (CONFIG.toml: the {self.source} this run "
                    "was given, written out as TOML)")
        return f"vkick run {shlex.quote(self.source)} {opts}"


def policy_from_config(cfg: HostConfig) -> PreemptPolicy:
    """The preemption policy a config's ``[run]`` section asks for."""
    run = cfg.run
    if run.policy == "none":
        return PreemptPolicy.none()
    sites = {name: SitePolicy(s.p, s.max_turns, s.max_delay_ns)
             for name, s in run.sites.items()}
    return PreemptPolicy.random(run.preempt.p, run.preempt.max_turns,
                                run.preempt.max_delay_ns, sites)


class Host:
    """A whole emulated host built from a run configuration.

    Use it as an async context manager; :meth:`run` runs the configured workload to its
    end, :meth:`run_for` advances emulated time by a given amount, :meth:`call` runs your
    own coroutine function inside the emulation (in virtual time, with the built host as
    its argument).
    """

    def __init__(self, config: HostConfig, *, source: str = "<config>",
                 seed: int | None = None, duration: int | str | None = None,
                 policy: Literal["none", "random"] | None = None,
                 log: str | Path | None = None, log_level: Level | None = None,
                 log_max_bytes: int | None = None, sinks: tuple[EventSink, ...] = ()) -> None:
        # The keyword overrides replace the config's [run] fields and are validated as they
        # are (one ConfigError line naming the field); the preemption parameters of
        # ``policy = "random"`` are the config's [run.preempt] and [run.sites].
        run = run_with(config.run, seed=seed, duration=duration, policy=policy, log=log,
                       log_level=log_level, log_max_bytes=log_max_bytes)
        if run is not config.run:
            config = config.model_copy(update={"run": run})
        self.config = config
        self.source = source
        self.seed = run.seed
        self.duration_ns = run.duration
        self.policy = policy_from_config(config)
        self.stats = RunStats()
        self.checker = InvariantChecker(stall_ns=run.stall)
        self._sinks = sinks
        # Made when the host is entered (``async with``): nothing to leak before that.
        self._rt: Runtime | None = None
        self._writer: JsonlWriter | None = None
        self._life: IrqLife | None = None
        self.host: EmulatedHost | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight = 0  # calls running on the emulation thread
        self._started = False
        self._finished = False
        self._quiescent = False
        self._t_start = 0

    @classmethod
    def from_config(cls, config: ConfigLike = None, **overrides: Any) -> Host:
        """A host from a config file path, a mapping (a parsed TOML document), a
        :class:`HostConfig`, or None for the built-in default; ``overrides`` are the
        keyword arguments of :class:`Host` (``seed``, ``duration``, ``log`` …)."""
        if config is None or isinstance(config, (str, Path)):
            cfg, source = load_config(config)
        elif isinstance(config, HostConfig):
            cfg, source = config, "<config>"
        else:
            cfg, source = parse_config(config, "<dict>"), "<dict>"
        overrides.setdefault("source", source)
        return cls(cfg, **overrides)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._rt is not None:
            raise RuntimeError("a Host runs once: make a new one")
        rt = self._rt = Runtime(seed=self.seed, policy=self.policy)
        run = self.config.run
        try:
            if run.log is not None:
                try:
                    self._writer = JsonlWriter(run.log, run.log_level,
                                               max_bytes=run.log_max_bytes)
                except OSError as exc:  # a directory, no permission …
                    raise ConfigError(run.log, "(log)", "a writable file",
                                      exc.strerror or str(exc)) from None
            # The lifecycle tracker emits from inside the fan-out: it must come last.
            self._life = attach(rt.bus, *(s for s in (self.stats, self._writer, *self._sinks,
                                                      self.checker) if s is not None))
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="vkick-host")
            await self._submit(self._build)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel every emulated task, close the log (whole lines only), stop the thread.
        Closes whatever exists, however far entering got; a no-op when never entered."""
        executor = self._executor
        with anyio.CancelScope(shield=True):
            if executor is None:
                if self._rt is not None:
                    await anyio.to_thread.run_sync(self._close)  # not on a running loop
                return
            fut = executor.submit(self._close)
            await anyio.to_thread.run_sync(fut.result)
            executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        try:
            if self._rt is not None:
                self._rt.close()
        finally:
            if self._writer is not None:
                self._writer.close()

    # ------------------------------------------------------------------ driving

    async def run(self) -> RunResult:
        """Run the configured traffic for ``duration``, let the host drain, check.

        Returns the summary and the invariant violations (the same as
        ``vkick run --json`` prints).
        """
        return await self._submit(self._run_all)

    async def run_for(self, duration: int | str) -> None:
        """Advance emulated time by ``duration`` (traffic runs if it has not ended)."""
        ns = parse_duration_ns(duration)
        await self._submit(self._advance, ns)

    async def wait_quiescent(self, timeout: int | str | None = None) -> bool:
        """Return True once every emulated task is blocked and no timer is pending, or False
        when ``timeout`` of emulated time (``"1ms"``, ns) passed first."""
        ns = None if timeout is None else parse_duration_ns(timeout)
        rt = self.rt
        return await self._submit(lambda: rt.call(rt.wait_quiescent, ns))

    async def call(self, fn: Callable[[EmulatedHost], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn(host)`` inside the emulation (virtual time) and return its result."""
        return await self._submit(self._call_in, fn)

    def result(self) -> RunResult:
        """The summary and violations so far (complete after :meth:`run`).  Not while a
        call (:meth:`run`, :meth:`run_for` …) is in progress: the statistics are the
        emulation thread's until it returns."""
        if self._in_flight:
            raise RuntimeError("Host.result() while a run()/run_for()/call() is in "
                               "progress: await it first")
        return self._result()

    def _result(self) -> RunResult:
        summary = self.stats.to_json()  # adds the batched counts in: emulation thread only
        summary["violations"] = [v.to_json() for v in self.checker.violations]
        return RunResult(summary, list(self.checker.violations), self.seed, self.source,
                         self.duration_ns, self.config.run.policy)

    @property
    def rt(self) -> Runtime:
        """The emulation's runtime (once the host is entered)."""
        rt = self._rt
        if rt is None:
            raise RuntimeError("use the Host as `async with Host(...) as host:`")
        return rt

    @property
    def now_ns(self) -> int:
        """Emulated time (ns; 0 before the host is entered); safe to read while a call is
        in progress."""
        return 0 if self._rt is None else self._rt.now_ns()

    @property
    def traffic_elapsed_ns(self) -> int:
        """Emulated time since the configured traffic started (0 before it has); safe to
        read while a call is in progress."""
        return max(0, self.now_ns - self._t_start) if self._started else 0

    # ------------------------------------------------------------------ the thread

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if executor is None:
            raise RuntimeError("use the Host as `async with Host(...) as host:`")
        fut = executor.submit(fn, *args)
        self._in_flight += 1
        try:
            return await anyio.to_thread.run_sync(fut.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            self.rt.interrupt()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(fut.exception)
            raise
        finally:
            self._in_flight -= 1

    def _build(self) -> None:
        async def build() -> None:
            bus = self.rt.bus
            if bus.on:
                bus.emit("vkick_run_start", seed=self.seed, config=self.source,
                         duration_ns=self.duration_ns, stall_ns=self.config.run.stall)
            self.host = await build_host(self.rt, self.config)
            await self.rt.wait_quiescent()  # the guests have opened their devices

        self.rt.call(build)

    def _start_traffic(self) -> None:
        if self._started:
            return
        self._started = True
        host = self.host
        assert host is not None
        rt = self.rt
        self._t_start = t0 = rt.now_ns()
        t_end = t0 + self.duration_ns
        for vm in host.vms.values():
            for w in vm.config.workload:
                dev = vm.nets[w.net]
                queues = dev.queues if w.queue == "all" else [dev.queues[w.queue]]
                for qp in queues:
                    name = f"{vm.name}/{w.net}/q{qp.index}.{w.direction}"
                    if w.direction == "rx":
                        rt.spawn(name, rx_generator, rt, qp, w, t_end)
                    elif w.direction == "tx":
                        rt.spawn(name, tx_generator, rt, qp, w, t_end)
                    else:
                        RrFlow(rt, qp, w, t_end).start()

    def _advance(self, ns: int) -> None:
        async def advance() -> None:
            self._start_traffic()
            await self.rt.sleep_ns(ns)

        self.rt.call(advance)

    def _call_in(self, fn: Callable[[EmulatedHost], Coroutine[Any, Any, T]]) -> T:
        host = self.host
        assert host is not None
        return self.rt.call(fn, host)

    def _run_all(self) -> RunResult:
        rt = self.rt

        async def run() -> None:
            self._start_traffic()
            left = self._t_start + self.duration_ns - rt.now_ns()
            if left > 0:
                await rt.sleep_ns(left)
            # Traffic has stopped: let the rings drain and the vCPUs go idle.
            self._quiescent = await rt.wait_quiescent(self.config.run.drain)

        if not self._finished:
            rt.call(run)
            self._finish()
        return self._result()

    def _finish(self) -> None:
        self._finished = True
        assert self._life is not None
        self._life.finish()  # sources never delivered get their vkick_irq record now
        bus = self.rt.bus
        if bus.on:
            bus.emit("vkick_run_end", duration_ns=self.rt.now_ns() - self._t_start,
                     quiescent=self._quiescent)


async def self_check(config: ConfigLike = None, **overrides: Any) -> str | None:
    """Run the same seed twice in this process and compare the two event streams byte for
    byte: None when identical, else the first difference.

    Both runs share this process's ``str`` hash salt, so an order that depends on
    ``hash()`` (a set of names iterated) comes out the same twice and this check cannot see
    it; :func:`vkick.runtime.selfcheck.self_check_across_processes` (``vkick run
    --self-check``) runs each copy in its own interpreter.  The streams go to temporary
    files, so memory does not grow with the run.
    """
    with tempfile.TemporaryDirectory(prefix="vkick-selfcheck-") as tmp:
        paths = [Path(tmp) / f"run{i + 1}.jsonl" for i in range(2)]
        for path in paths:
            with path.open("wb") as fh:
                async with Host.from_config(config, sinks=(_line_writer(fh),),
                                            **overrides) as host:
                    await host.run()
        with paths[0].open("rb") as a, paths[1].open("rb") as b:
            return first_difference(a, b)


def _line_writer(fh: IO[bytes]) -> EventSink:
    def write(rec: EventRecord) -> None:
        fh.write(orjson.dumps(rec) + b"\n")

    return write
