"""Run configurations (``vkick run CONFIG``): a TOML file describing a whole emulated host —
its physical CPUs and costs, VMs with vCPUs, vhost-net devices with queues, traffic — as
validated models.  The file format is documented in ``configs/README.md``.

Unknown fields and wrong types are errors; every error becomes one ``ConfigError`` line
naming the file, the dotted field path and what was expected.  Cross-field rules (pins
within ``host.pcpus``, queue vCPUs and vectors, workloads naming existing devices) are
checked here too, so a config that loads can be built.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from vkick.runtime.clock import parse_duration_ns
from vkick.runtime.windows import WINDOWS
from vkick.scenario.format import _FieldError, load_toml, validation_error_line
from vkick.scenario.toggles import KNOWN_TOGGLES, Toggle  # noqa: F401  (KNOWN_TOGGLES: re-exported)

DEFAULT_SOURCE = "<built-in default>"



def _duration(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a duration such as \"10ms\" or integer nanoseconds")
    if isinstance(v, (int, str)):
        try:
            ns = parse_duration_ns(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if ns < 0:
            raise ValueError("expected a duration ≥ 0")
        return ns
    raise ValueError("expected a duration such as \"10ms\" or integer nanoseconds")


Duration = Annotated[int, BeforeValidator(_duration)]
Ns = Annotated[int, Field(ge=0)]


def _power_of_two(v: int) -> int:
    if v < 2 or v > 32768 or v & (v - 1):
        raise ValueError(f"expected a power of two between 2 and 32768, got {v}")
    return v


def _vector(v: int | None) -> int | None:
    if v is not None and not 0x20 <= v <= 0xEF:
        raise ValueError(f"expected a device vector in 0x20..0xef, got {v:#x}")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HostCostsConfig(_Model):
    """Modelled host costs in emulated ns (``[host.costs]``)."""

    vmentry_ns: Ns = 1000
    vmexit_ns: Ns = 1000
    ipi_latency_ns: Ns = 500
    wakeup_ns: Ns = 2000
    timeslice_ns: int = Field(default=1_000_000, gt=0)


class HostSection(_Model):
    """``[host]``: the machine."""

    pcpus: int = Field(default=2, ge=1, le=1024)
    costs: HostCostsConfig = HostCostsConfig()


class GuestConfig(_Model):
    """``[vm.guest]``: the guest kernel's CPU costs (emulated ns) and driver settings."""

    handler_ns: Ns = 500  # hard IRQ handler (vring_interrupt + irq entry/exit)
    napi_poll_ns: Ns = 300
    rx_packet_ns: Ns = 400
    tx_packet_ns: Ns = 600
    tx_reclaim_ns: Ns = 50
    refill_ns: Ns = 50
    napi_weight: int = Field(default=64, ge=1, le=4096)
    napi_tx: bool = True
    rx_buf_len: int = Field(default=1536, ge=64, le=65536)


class QueueConfig(_Model):
    """``[[vm.net.queue]]``: one queue pair's interrupt affinity and MSI-X vectors."""

    index: int = Field(ge=0)
    vcpu: int | None = Field(default=None, ge=0)
    rx_vector: Annotated[int | None, AfterValidator(_vector)] = None
    tx_vector: Annotated[int | None, AfterValidator(_vector)] = None


class NetConfig(_Model):
    """``[[vm.net]]``: a virtio-net device backed by vhost-net (one vhost device and worker
    per queue pair) and a multiqueue tap."""

    name: str = Field(default="net0", min_length=1)
    queues: int = Field(default=1, ge=1, le=64)
    ring_size: Annotated[int, AfterValidator(_power_of_two)] = 256
    event_idx: bool = True  # VIRTIO_RING_F_EVENT_IDX negotiated
    notify_on_empty: bool = False  # VIRTIO_F_NOTIFY_ON_EMPTY negotiated
    rx_packet_ns: Ns = 400  # vhost worker: copy one packet into the guest
    tx_packet_ns: Ns = 300  # vhost worker: send one guest packet to the tap
    tap_queue_len: int = Field(default=500, ge=1)
    queue: list[QueueConfig] = Field(default_factory=list)


class WorkloadConfig(_Model):
    """``[[vm.workload]]``: traffic on one queue (or every queue) of a device.

    ``rx``: the host sends to the guest; ``tx``: a guest application sends; ``rr``: the
    guest sends a request, the host answers after ``think_ns`` with ``response_size``
    bytes, and the guest sends the next request when the answer arrives (``outstanding``
    requests in flight; ``rate_pps`` is not used).
    """

    net: str = "net0"
    queue: int | Literal["all"] = 0
    direction: Literal["rx", "tx", "rr"]
    pattern: Literal["constant", "poisson", "burst"] = "poisson"
    rate_pps: float = Field(default=10_000.0, gt=0, le=1e9)
    size: int = Field(default=1500, ge=14, le=65535)
    size_max: int | None = Field(default=None, ge=14, le=65535)
    burst_on: Duration = 100_000
    burst_off: Duration = 400_000
    start: Duration = 0
    response_size: int = Field(default=64, ge=14, le=65535)
    think_ns: Ns = 0
    outstanding: int = Field(default=1, ge=1, le=1024)

    @model_validator(mode="after")
    def _sizes(self) -> WorkloadConfig:
        if self.size_max is not None and self.size_max < self.size:
            raise _FieldError("size_max", f"a size ≥ size ({self.size})", str(self.size_max))
        if self.pattern == "burst" and self.burst_on <= 0:
            raise _FieldError("burst_on", "a duration > 0", str(self.burst_on))
        return self


class VmConfig(_Model):
    """``[[vm]]``: a VM (``count`` > 1 makes that many alike: ``name0``, ``name1`` …)."""

    name: str = Field(default="vm0", min_length=1)
    count: int = Field(default=1, ge=1, le=4096)
    vcpus: int = Field(default=1, ge=1, le=256)
    apicv: bool = True
    x2apic: bool = False
    halt_poll_ns: Ns = 200_000  # the VM's max_halt_poll_ns (0: no halt polling)
    pin: list[int] | None = None  # the pCPU of each vCPU (default: round robin)
    toggles: list[Toggle] = Field(default_factory=list)
    guest: GuestConfig = GuestConfig()
    net: list[NetConfig] = Field(default_factory=list)
    workload: list[WorkloadConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_check(self) -> VmConfig:
        if self.pin is not None and len(self.pin) != self.vcpus:
            raise _FieldError("pin", f"{self.vcpus} pCPU numbers (one per vCPU)",
                              str(self.pin))
        names = [n.name for n in self.net]
        for i, n in enumerate(self.net):
            if n.name in names[:i]:
                raise _FieldError(f"net[{i}].name", "a device name unique in the VM",
                                  repr(n.name))
            seen: set[int] = set()
            for j, q in enumerate(n.queue):
                where = f"net[{i}].queue[{j}]"
                if q.index >= n.queues:
                    raise _FieldError(f"{where}.index", f"a queue index < {n.queues}",
                                      str(q.index))
                if q.index in seen:
                    raise _FieldError(f"{where}.index", "each queue configured once",
                                      str(q.index))
                seen.add(q.index)
                if q.vcpu is not None and q.vcpu >= self.vcpus:
                    raise _FieldError(f"{where}.vcpu", f"a vCPU index < {self.vcpus}",
                                      str(q.vcpu))
        vectors: dict[tuple[int, int], str] = {}
        for i, n in enumerate(self.net):
            for qi in range(n.queues):
                vcpu, rxv, txv = queue_placement(self, i, qi)
                for kind, vec in (("rx_vector", rxv), ("tx_vector", txv)):
                    key = (vcpu, vec)
                    where = f"net[{i}] queue {qi} {kind}"
                    if key in vectors:
                        raise _FieldError(f"net[{i}].queue", f"distinct vectors on vCPU {vcpu}"
                                          f" ({where} and {vectors[key]} both use {vec:#x})",
                                          f"{vec:#x}")
                    vectors[key] = where
        for i, w in enumerate(self.workload):
            if w.net not in names:
                raise _FieldError(f"workload[{i}].net", f"one of the VM's devices {names}",
                                  repr(w.net))
            n = self.net[names.index(w.net)]
            if isinstance(w.queue, int) and w.queue >= n.queues:
                raise _FieldError(f"workload[{i}].queue", f"a queue index < {n.queues} or "
                                  "\"all\"", str(w.queue))
        return self


def queue_placement(vm: VmConfig, net_index: int, queue: int) -> tuple[int, int, int]:
    """(vCPU, RX vector, TX vector) of queue pair ``queue`` of ``vm.net[net_index]``.

    Defaults: queue q on vCPU q mod vcpus; vectors 0x41 + 2q (RX) and 0x42 + 2q (TX),
    offset by 0x20 per further device.
    """
    n = vm.net[net_index]
    override = next((q for q in n.queue if q.index == queue), None)
    vcpu = override.vcpu if override is not None and override.vcpu is not None \
        else queue % vm.vcpus
    base = 0x41 + 0x20 * net_index + 2 * queue
    rxv = override.rx_vector if override is not None and override.rx_vector is not None \
        else base
    txv = override.tx_vector if override is not None and override.tx_vector is not None \
        else base + 1
    return vcpu, rxv, txv


class SiteConfig(_Model):
    """A preemption window's behaviour under the ``random`` policy."""

    p: float = Field(default=0.2, ge=0.0, le=1.0)
    max_turns: int = Field(default=3, ge=1)
    max_delay_ns: Ns = 0


class RunSection(_Model):
    """``[run]``: how long, which seed, which interleavings, what to log and check."""

    duration: Duration = 10_000_000
    seed: int = 0
    policy: Literal["none", "random"] = "none"
    preempt: SiteConfig = SiteConfig()
    sites: dict[str, SiteConfig] = Field(default_factory=dict)
    log: str | None = None
    log_level: Literal["info", "debug"] = "info"
    log_max_bytes: int | None = Field(default=None, gt=0)
    stall: Duration = 10_000_000  # the oracle's bound on signal → handler latency
    drain: Duration = 100_000_000  # at most this long after traffic stops, to settle

    @model_validator(mode="after")
    def _sites(self) -> RunSection:
        for name in self.sites:
            if name not in WINDOWS:
                raise _FieldError(f"sites.{name}", "a preemption window "
                                  "(vkick/runtime/windows.py)", repr(name))
        return self


class HostConfig(_Model):
    """A whole run configuration file."""

    name: str = ""
    description: str = ""
    run: RunSection = RunSection()
    host: HostSection = HostSection()
    vm: list[VmConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_check(self) -> HostConfig:
        names: list[str] = []
        for i, vm in enumerate(self.vm):
            for name in vm_names(vm):
                if name in names:
                    raise _FieldError(f"vm[{i}].name", "VM names unique across the host",
                                      repr(name))
                names.append(name)
            for j, p in enumerate(vm.pin or ()):
                if not 0 <= p < self.host.pcpus:
                    raise _FieldError(f"vm[{i}].pin[{j}]", f"a pCPU < host.pcpus "
                                      f"({self.host.pcpus})", str(p))
        return self


OVERRIDES_SOURCE = "<overrides>"


def run_with(run: RunSection, source: str = OVERRIDES_SOURCE, **overrides: Any) -> RunSection:
    """``run`` with ``overrides`` (``seed=``, ``duration=`` …; None keeps the config's)
    validated as a config file's ``[run]`` table is: a bad value is one ConfigError line
    naming ``source`` and the field."""
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
             for k, v in overrides.items() if v is not None}
    if not given:
        return run
    try:
        return RunSection.model_validate({**run.model_dump(), **given})
    except ValidationError as exc:
        raise validation_error_line(source, exc) from None


def vm_names(vm: VmConfig) -> list[str]:
    """The names of the VMs one ``[[vm]]`` table stands for."""
    return [vm.name] if vm.count == 1 else [f"{vm.name}{i}" for i in range(vm.count)]


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> HostConfig:
    """Validate a config given as a mapping (a parsed TOML file); ConfigError on error."""
    try:
        return HostConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise validation_error_line(source, exc) from None


def load_config(path: str | Path | None = None) -> tuple[HostConfig, str]:
    """Load and validate a run configuration (the built-in default when ``path`` is None).

    Returns the config and its source name (for messages and reproduction lines).
    """
    if path is None:
        text = files("vkick").joinpath("_data/default.toml").read_text()
        return parse_config(tomllib.loads(text), DEFAULT_SOURCE), DEFAULT_SOURCE
    p = Path(path)
    return parse_config(load_toml(p), str(p)), str(p)
