"""The behaviour-scenario file format (shared/scenarios/FORMAT.md) as validated models.

Unknown fields and wrong types are errors; every error becomes one ``ConfigError`` line
naming the file, the dotted field path and what was expected.  vkick's additions (IOAPIC
routes, resampling irqfds, ``ioapic`` and ``line`` steps, ``toggles`` and the expectations
on resamplefds, TMR and IOAPIC state) are described in docs/scenario-format.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vkick.errors import ConfigError
from vkick.kvm.kvm_host import KVM_IOAPIC_NUM_PINS
from vkick.scenario.toggles import Toggle


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Topology(_Model):
    vcpus: int = Field(ge=1, le=256)
    apicv: Literal["on", "off", "both"] = "both"
    apic_mode: Literal["xapic", "x2apic"] = "xapic"
    eoi: Literal["auto", "manual"] = "auto"
    # None: "kernel" (KVM_CREATE_IRQCHIP) when the scenario uses the IOAPIC, else "split".
    irqchip: Literal["kernel", "split"] | None = None


def _check_msi_data(data: int) -> int:
    if not 0 <= data <= 0xFFFFFFFF:
        raise ValueError("expected a 32-bit MSI data value")
    if data & 0xFF < 16:
        raise ValueError(f"expected an MSI vector ≥ 16 in bits 7:0, got {data & 0xFF:#x}")
    if (data >> 8) & 7 in (3, 7):
        raise ValueError("expected a delivery mode other than 3 (reserved) or 7 (ExtINT, "
                         "not modelled) in bits 10:8")
    return data


MsiData = Annotated[int, AfterValidator(_check_msi_data)]
MsiAddress = Annotated[int, Field(ge=0, le=0xFFFFFFFFFFFFFFFF)]


IOAPIC_PINS = KVM_IOAPIC_NUM_PINS
Pin = Annotated[int, Field(ge=0, lt=IOAPIC_PINS)]


def _check_route_type(v: str) -> str:
    if v not in ("msi", "irqchip"):
        raise ValueError('expected "msi" or "irqchip" (other route types are not modelled '
                         'yet)')
    return v


def _check_irqchip(v: str) -> str:
    if v != "ioapic":
        raise ValueError('expected "ioapic" (the PIC is not modelled)')
    return v


RouteType = Annotated[str, AfterValidator(_check_route_type)]
IrqchipName = Annotated[str, AfterValidator(_check_irqchip)]


class Route(_Model):
    """An MSI route (``address``, ``data``) or an IRQCHIP route (``pin``; ``irqchip`` is
    "ioapic") — which fields go with which type is checked in Scenario._cross_check."""

    gsi: int = Field(ge=0, lt=4096)
    type: RouteType = "msi"
    address: MsiAddress | None = None
    data: MsiData | None = None
    irqchip: IrqchipName | None = None
    pin: Pin | None = None


class Irqfd(_Model):
    name: str = Field(min_length=1)
    gsi: int = Field(ge=0, lt=4096)
    assign: bool = True
    resample: bool = False  # KVM_IRQFD_FLAG_RESAMPLE with a resamplefd "<name>.resample"


class _VcpuStep(_Model):
    vcpu: int = Field(ge=0)


class SignalStep(_Model):
    do: Literal["signal"]
    irqfd: str
    count: int = Field(default=1, ge=1)


class MsiStep(_Model):
    do: Literal["msi"]
    address: MsiAddress
    data: MsiData


class IpiStep(_VcpuStep):
    do: Literal["ipi"]
    icr: int = Field(ge=0, le=0xFFFFFFFFFFFFFFFF)


class CliStep(_VcpuStep):
    do: Literal["cli"]


class StiStep(_VcpuStep):
    do: Literal["sti"]


class TprStep(_VcpuStep):
    do: Literal["tpr"]
    value: int = Field(ge=0, le=0xFF)


class EoiStep(_VcpuStep):
    do: Literal["eoi"]


class HaltStep(_VcpuStep):
    do: Literal["halt"]


class ApicStep(_VcpuStep):
    do: Literal["apic"]
    id: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    ldr: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    dfr: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    svr: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)


class AssignStep(_Model):
    do: Literal["assign"]
    irqfd: str


class DeassignStep(_Model):
    do: Literal["deassign"]
    irqfd: str


class RouteStep(Route):
    """Replace one route (KVM_SET_GSI_ROUTING with the table changed): a route's fields."""

    do: Literal["route"]


def _check_ioapic_vector(v: int) -> int:
    if not 16 <= v <= 0xFF:
        raise ValueError(f"expected a vector 16..255, got {v}")
    return v


class IoapicStep(_VcpuStep):
    """The guest writes one IOAPIC redirection entry (IOREGSEL/IOWIN, high half first)."""

    do: Literal["ioapic"]
    pin: Pin
    vector: Annotated[int, AfterValidator(_check_ioapic_vector)]
    trigger: Literal["edge", "level"] = "edge"
    mask: bool = False
    dest: int = Field(default=0, ge=0, le=0xFF)
    dest_mode: Literal["physical", "logical"] = "physical"
    delivery: Literal["fixed", "lowest"] = "fixed"


class LineStep(_Model):
    """KVM_IRQ_LINE: the VMM drives a GSI's line (userspace source id)."""

    do: Literal["line"]
    gsi: int = Field(ge=0, lt=4096)
    level: int = Field(ge=0, le=1)


class WaitStep(_Model):
    do: Literal["wait"]
    ns: int = Field(ge=0)


class ExpectStep(_VcpuStep):
    do: Literal["expect"]
    vectors: list[int]
    irr: list[int] | None = None
    isr: list[int] | None = None
    tmr: list[int] | None = None
    resamples: dict[str, Annotated[int, Field(ge=0)]] | None = None
    ioapic_irr: list[Pin] | None = None
    remote_irr: list[Pin] | None = None


Step = Annotated[
    SignalStep | MsiStep | IpiStep | CliStep | StiStep | TprStep | EoiStep | HaltStep
    | ApicStep | AssignStep | DeassignStep | RouteStep | WaitStep | ExpectStep | IoapicStep
    | LineStep,
    Field(discriminator="do")]

STEP_TAGS = frozenset(get_args(step.model_fields["do"].annotation)[0]
                     for step in get_args(get_args(Step)[0]))


class VcpuExpect(_Model):
    vectors: list[int] | None = None
    irr: list[int] | None = None
    isr: list[int] | None = None
    tmr: list[int] | None = None
    count: int | None = Field(default=None, ge=0)


class TotalExpect(_Model):
    count: int | None = Field(default=None, ge=0)


class IrqfdExpect(_Model):
    resamples: int | None = Field(default=None, ge=0)  # times its resamplefd was signalled


class IoapicExpect(_Model):
    irr: list[Pin] | None = None  # pins pending as KVM_GET_IRQCHIP reports them
    remote_irr: list[Pin] | None = None  # level pins waiting for their EOI


class Expect(_Model):
    vcpu: dict[int, VcpuExpect] = Field(default_factory=dict)
    total: TotalExpect | None = None
    irqfd: dict[str, IrqfdExpect] = Field(default_factory=dict)
    ioapic: IoapicExpect | None = None

    @field_validator("vcpu", mode="before")
    @classmethod
    def _int_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out: dict[int, Any] = {}
            for k, val in v.items():
                try:
                    out[int(k)] = val
                except (TypeError, ValueError):
                    raise ValueError(f"expected vCPU indices as keys, got {k!r}") from None
            return out
        return v


class Scenario(_Model):
    name: str = Field(min_length=1)
    source: str = ""
    description: str = ""
    topology: Topology
    toggles: list[Toggle] = Field(default_factory=list)  # Kvm.toggles (scenario/toggles.py)
    routes: list[Route] = Field(default_factory=list)
    irqfds: list[Irqfd] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    expect: Expect | None = None

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        names = [f.name for f in self.irqfds]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _FieldError(f"irqfds[{i}].name", "a unique irqfd name", repr(name))
        gsis = [r.gsi for r in self.routes]
        for i, g in enumerate(gsis):
            if g in gsis[:i]:
                raise _FieldError(f"routes[{i}].gsi", "a GSI not already routed", str(g))
        split = self.topology.irqchip == "split"
        for i, r in enumerate(self.routes):
            _check_route_fields(f"routes[{i}]", r, split)
        for i, fd in enumerate(self.irqfds):
            if fd.resample and split:
                raise _FieldError(f"irqfds[{i}].resample", "false on a split irqchip "
                                  "(KVM_IRQFD refuses KVM_IRQFD_FLAG_RESAMPLE with -EINVAL "
                                  "without the in-kernel IOAPIC)", "true")
        resampling = {f.name for f in self.irqfds if f.resample}
        n = self.topology.vcpus
        for i, step in enumerate(self.steps):
            irqfd = getattr(step, "irqfd", None)
            if irqfd is not None and irqfd not in names:
                raise _FieldError(f"steps[{i}].irqfd", f"one of the irqfds {names}",
                                  repr(irqfd))
            vcpu = getattr(step, "vcpu", None)
            if vcpu is not None and vcpu >= n:
                raise _FieldError(f"steps[{i}].vcpu", f"a vCPU index < {n}", str(vcpu))
            if isinstance(step, RouteStep):
                _check_route_fields(f"steps[{i}]", step, split)
            elif isinstance(step, IoapicStep) and split:
                raise _FieldError(f"steps[{i}].do", "no IOAPIC step on a split irqchip "
                                  "(the IOAPIC is not in the kernel)", '"ioapic"')
            elif isinstance(step, ExpectStep):
                _check_resamples(f"steps[{i}].resamples", step.resamples or {}, resampling)
                if split and (step.ioapic_irr is not None or step.remote_irr is not None):
                    raise _FieldError(f"steps[{i}].ioapic_irr", "no IOAPIC expectation on a "
                                      "split irqchip", "a list")
        if self.expect is not None:
            for idx in self.expect.vcpu:
                if not 0 <= idx < n:
                    raise _FieldError(f"expect.vcpu.{idx}", f"a vCPU index < {n}", str(idx))
            _check_resamples("expect.irqfd", {k: v.resamples for k, v in
                                              self.expect.irqfd.items()}, resampling)
            if split and self.expect.ioapic is not None:
                raise _FieldError("expect.ioapic", "no IOAPIC expectation on a split irqchip",
                                  "a table")
        return self

    def irqchip_mode(self) -> str:
        """``topology.irqchip``, or "kernel" when the scenario uses the IOAPIC (an irqchip
        route, a resampling irqfd, an ``ioapic`` step, an IOAPIC expectation), else
        "split"."""
        if self.topology.irqchip is not None:
            return self.topology.irqchip
        uses = (any(r.type == "irqchip" for r in self.routes)
                or any(f.resample for f in self.irqfds)
                or any(isinstance(s, IoapicStep)
                       or (isinstance(s, RouteStep) and s.type == "irqchip")
                       or (isinstance(s, ExpectStep)
                           and (s.ioapic_irr is not None or s.remote_irr is not None))
                       for s in self.steps)
                or (self.expect is not None and self.expect.ioapic is not None))
        return "kernel" if uses else "split"


def _check_route_fields(where: str, r: Route | RouteStep, split: bool) -> None:
    """Which fields go with which route type (one ConfigError line naming the field)."""
    if r.type == "msi":
        for name in ("address", "data"):
            if getattr(r, name) is None:
                raise _FieldError(f"{where}.{name}", "a value for an MSI route", "nothing")
        for name in ("irqchip", "pin"):
            if getattr(r, name) is not None:
                raise _FieldError(f"{where}.{name}", 'no such field on an MSI route (it '
                                  'belongs to type = "irqchip")', repr(getattr(r, name)))
        return
    if split:
        raise _FieldError(f"{where}.type", '"msi" on a split irqchip (KVM_SET_GSI_ROUTING '
                          'refuses IRQCHIP routes with -EINVAL)', '"irqchip"')
    if r.pin is None:
        raise _FieldError(f"{where}.pin", f"an IOAPIC pin 0..{IOAPIC_PINS - 1} for an "
                          "irqchip route", "nothing")
    for name in ("address", "data"):
        if getattr(r, name) is not None:
            raise _FieldError(f"{where}.{name}", 'no such field on an irqchip route (it '
                              'belongs to type = "msi")', hex(getattr(r, name)))


def _check_resamples(where: str, counts: Mapping[str, int | None], resampling: set[str]) -> None:
    for name in counts:
        if name not in resampling:
            raise _FieldError(f"{where}.{name}", "the name of an irqfd with resample = true "
                              f"({sorted(resampling)})", repr(name))


class _FieldError(ValueError):
    def __init__(self, field: str, expected: str, got: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field, self.expected, self.got = field, expected, got


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STEP_TAGS and out.startswith("steps"):
            continue  # the discriminator tag pydantic inserts
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error_line(file: str, exc: ValidationError) -> ConfigError:
    """The first pydantic error as one ConfigError line."""
    err = exc.errors()[0]
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _FieldError):
        # A cross-field rule of a nested table names its field relative to that table.
        prefix = _loc(tuple(err["loc"]))
        return ConfigError(file, f"{prefix}.{inner.field}" if prefix else inner.field,
                           inner.expected, inner.got)
    field = _loc(tuple(err["loc"])) or "(top level)"
    got: Any
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return ConfigError(file, field, "no such field (unknown field)", repr(err["input"]))
    if err["type"] == "union_tag_invalid":
        return ConfigError(file, field + ".do", "a known step (" + str(ctx.get("expected_tags"))
                           + ")", repr(ctx.get("tag")))
    if err["type"] == "missing":
        return ConfigError(file, field, "a value (required field)", "nothing")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a table"
    if msg.startswith("Value error, "):
        # Our validators' own wording: "expected …, got …" (the value as they show it).
        msg = msg.removeprefix("Value error, ")
        expected, sep, own = msg.rpartition(", got ")
        if sep:
            msg, shown = expected, own
    else:
        msg = msg.removeprefix("Input should be ")  # pydantic's wording
        if msg.startswith(("greater", "less")):
            msg = "a value " + msg
    msg = (msg[0].lower() + msg[1:]).removeprefix("expected ")  # ConfigError says it
    return ConfigError(file, field, msg, shown)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; syntax errors become one ConfigError line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "an existing file", "no such file") from None
    except OSError as exc:  # a directory, no permission …
        raise ConfigError(str(path), "(file)", "a readable TOML file",
                          exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", "valid TOML", str(exc)) from None


def load_scenario(path: Path | str) -> Scenario:
    """Load and validate a scenario file, or raise ConfigError (one line)."""
    path = Path(path)
    data = load_toml(path)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise validation_error_line(str(path), exc) from None
