"""The behaviour-scenario file format (shared/scenarios/FORMAT.md) as validated models.

Unknown fields and wrong types are errors; every error becomes one ``ConfigError`` line
naming the file, the dotted field path and what was expected.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Topology(_Model):
    vcpus: int = Field(ge=1, le=256)
    apicv: Literal["on", "off", "both"] = "both"
    apic_mode: Literal["xapic", "x2apic"] = "xapic"
    eoi: Literal["auto", "manual"] = "auto"


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


class Route(_Model):
    gsi: int = Field(ge=0, lt=4096)
    type: str = "msi"
    address: MsiAddress
    data: MsiData

    @field_validator("type")
    @classmethod
    def _msi_only(cls, v: str) -> str:
        if v != "msi":
            raise ValueError('expected "msi" (other route types are not modelled yet)')
        return v


class Irqfd(_Model):
    name: str = Field(min_length=1)
    gsi: int = Field(ge=0, lt=4096)
    assign: bool = True


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


class RouteStep(_Model):
    do: Literal["route"]
    gsi: int = Field(ge=0, lt=4096)
    address: MsiAddress
    data: MsiData


class WaitStep(_Model):
    do: Literal["wait"]
    ns: int = Field(ge=0)


class ExpectStep(_VcpuStep):
    do: Literal["expect"]
    vectors: list[int]
    irr: list[int] | None = None
    isr: list[int] | None = None


Step = Annotated[
    SignalStep | MsiStep | IpiStep | CliStep | StiStep | TprStep | EoiStep | HaltStep
    | ApicStep | AssignStep | DeassignStep | RouteStep | WaitStep | ExpectStep,
    Field(discriminator="do")]


class VcpuExpect(_Model):
    vectors: list[int] | None = None
    irr: list[int] | None = None
    isr: list[int] | None = None
    count: int | None = Field(default=None, ge=0)


class TotalExpect(_Model):
    count: int | None = Field(default=None, ge=0)


class Expect(_Model):
    vcpu: dict[int, VcpuExpect] = Field(default_factory=dict)
    total: TotalExpect | None = None

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
        n = self.topology.vcpus
        for i, step in enumerate(self.steps):
            irqfd = getattr(step, "irqfd", None)
            if irqfd is not None and irqfd not in names:
                raise _FieldError(f"steps[{i}].irqfd", f"one of the irqfds {names}",
                                  repr(irqfd))
            vcpu = getattr(step, "vcpu", None)
            if vcpu is not None and vcpu >= n:
                raise _FieldError(f"steps[{i}].vcpu", f"a vCPU index < {n}", str(vcpu))
        if self.expect is not None:
            for idx in self.expect.vcpu:
                if not 0 <= idx < n:
                    raise _FieldError(f"expect.vcpu.{idx}", f"a vCPU index < {n}", str(idx))
        return self


class _FieldError(ValueError):
    def __init__(self, field: str, expected: str, got: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field, self.expected, self.got = field, expected, got


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"signal", "msi", "ipi", "cli", "sti", "tpr", "eoi", "halt", "apic",
                      "assign", "deassign", "route", "wait", "expect"} and out.startswith(
                          "steps"):
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
        return ConfigError(file, inner.field, inner.expected, inner.got)
    field = _loc(tuple(err["loc"])) or "(top level)"
    got: Any
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return ConfigError(file, field, "no such field (unknown field)", repr(err["input"]))
    if err["type"] == "union_tag_invalid":
        return ConfigError(file, field + ".do", "a known step (" + str(ctx.get("expected_tags"))
                           + ")", repr(ctx.get("tag")))
    got = err.get("input")
    msg = msg.removeprefix("Value error, ")
    return ConfigError(file, field, msg[0].lower() + msg[1:], repr(got)
                       if not isinstance(got, dict) else "a table")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; syntax errors become one ConfigError line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "an existing file", "no such file") from None
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
