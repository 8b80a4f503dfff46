"""Run configurations: every shipped config validates, the built-in default is configs/
default.toml, and bad input is one line naming the file, the field and the expectation."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from vkick.cli import main
from vkick.errors import ConfigError
from vkick.scenario.config import (
    KNOWN_TOGGLES,
    HostConfig,
    load_config,
    parse_config,
    queue_placement,
    vm_names,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_configs_folder_has_the_required_scenarios() -> None:
    """configs/ holds at least default, multiqueue, overcommit, idle-halt, no-apicv,
    no-event-idx and a large host of at least 32 VMs."""
    names = {p.stem for p in CONFIGS}
    assert {"default", "multiqueue", "overcommit", "idle-halt", "no-apicv", "no-event-idx",
            "large"} <= names
    large, _ = load_config(ROOT / "configs" / "large.toml")
    assert sum(len(vm_names(vm)) for vm in large.vm) >= 32


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path: Path) -> None:
    """Each shipped config validates (cross-field rules included)."""
    cfg, source = load_config(path)
    assert isinstance(cfg, HostConfig) and source == str(path)


def test_the_built_in_default_is_configs_default() -> None:
    """``vkick run`` without CONFIG runs the packaged copy of configs/default.toml."""
    packaged = files("vkick").joinpath("_data/default.toml").read_text()
    assert packaged == (ROOT / "configs" / "default.toml").read_text()
    assert load_config(None)[0] == load_config(ROOT / "configs" / "default.toml")[0]


def test_configs_readme_format_example_parses() -> None:
    """configs/README.md's format example is a valid config as printed, and with its
    commented-out ``# field = value`` lines switched on."""
    import re  # noqa: PLC0415
    import tomllib  # noqa: PLC0415

    text = (ROOT / "configs" / "README.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    parse_config(tomllib.loads(example), "configs/README.md")
    switched_on = re.sub(r"^# (\w+ = )", r"\1", example, flags=re.M)
    assert switched_on.count("\n# ") < example.count("\n# ")
    parse_config(tomllib.loads(switched_on), "configs/README.md")


def test_queue_placement_defaults_and_overrides() -> None:
    """Queue q defaults to vCPU q mod vcpus with vectors 0x41 + 2q / 0x42 + 2q; a
    ``[[vm.net.queue]]`` entry overrides them."""
    cfg = parse_config({"vm": [{"vcpus": 2, "net": [{"queues": 3, "queue": [
        {"index": 1, "vcpu": 0, "rx_vector": 0x90}]}]}]})
    vm = cfg.vm[0]
    assert queue_placement(vm, 0, 0) == (0, 0x41, 0x42)
    assert queue_placement(vm, 0, 1) == (0, 0x90, 0x44)
    assert queue_placement(vm, 0, 2) == (0, 0x45, 0x46)


BASE = 'name = "x"\n[[vm]]\nname = "vm0"\nvcpus = 2\n[[vm.net]]\nname = "net0"\nqueues = 2\n'
BAD = {
    "unknown-field": ('[[vm]]\nbogus = 1\n', "vm[0].bogus", "unknown field"),
    "wrong-type": ('[[vm]]\nvcpus = "two"\n', "vm[0].vcpus", "expected"),
    "no-vm": ('name = "x"\n', "vm", "expected"),
    "bad-duration": ('[run]\nduration = "ten ms"\n[[vm]]\n', "run.duration", "expected"),
    "ring-size": (BASE + 'ring_size = 100\n', "vm[0].net[0].ring_size", "power of two"),
    "pin-range": ('[host]\npcpus = 2\n[[vm]]\nvcpus = 1\npin = [5]\n', "vm[0].pin[0]",
                  "pCPU < host.pcpus"),
    "pin-count": ('[[vm]]\nvcpus = 2\npin = [0]\n', "vm[0].pin", "one per vCPU"),
    "queue-vcpu": (BASE + '[[vm.net.queue]]\nindex = 0\nvcpu = 7\n',
                   "vm[0].net[0].queue[0].vcpu", "vCPU index < 2"),
    "queue-index": (BASE + '[[vm.net.queue]]\nindex = 9\n', "vm[0].net[0].queue[0].index",
                    "queue index < 2"),
    "vector-range": (BASE + '[[vm.net.queue]]\nindex = 0\nrx_vector = 0x10\n',
                     "vm[0].net[0].queue[0].rx_vector", "device vector"),
    "vector-clash": (BASE + '[[vm.net.queue]]\nindex = 1\nvcpu = 0\nrx_vector = 0x41\n',
                     "vm[0].net[0].queue", "distinct vectors on vCPU 0"),
    "workload-net": (BASE + '[[vm.workload]]\nnet = "eth9"\ndirection = "rx"\n',
                     "vm[0].workload[0].net", "one of the VM's devices"),
    "workload-queue": (BASE + '[[vm.workload]]\nqueue = 5\ndirection = "rx"\n',
                       "vm[0].workload[0].queue", "queue index < 2"),
    "workload-direction": (BASE + '[[vm.workload]]\ndirection = "sideways"\n',
                           "vm[0].workload[0].direction", "expected"),
    "toggle": ('[[vm]]\ntoggles = ["no-such-bug"]\n', "vm[0].toggles[0]", "one of"),
    "window": ('[run]\npolicy = "random"\n[run.sites.W-NOPE]\np = 0.5\n[[vm]]\n',
               "run.sites.W-NOPE", "a preemption window"),
    "duplicate-vm": ('[[vm]]\nname = "a"\n[[vm]]\nname = "a"\n', "vm[1].name", "unique"),
    "toml-syntax": ('[[vm]\n', "(syntax)", "valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_gives_one_line_error_and_exit_2(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vkick run BAD.toml``: exit 2 and one stderr line naming the file, the dotted field
    path and what was expected — no traceback, nothing run."""
    text, field, expected = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert str(path) in err and field in err and expected in err, err


def test_bad_command_line_duration_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad ``--duration`` names the option."""
    assert main(["run", "--duration", "soon"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--duration" in err and "\n" not in err


def test_parse_config_errors_are_config_errors() -> None:
    """The library raises ConfigError (the CLI's one line) for a mapping too."""
    with pytest.raises(ConfigError) as info:
        parse_config({"vm": [{"vcpus": 0}]}, "<test>")
    assert str(info.value).startswith("<test>: vm[0].vcpus: expected")


def test_every_toggle_the_code_reads_is_registered_and_documented() -> None:
    """Each toggle name the kernel-mirroring code tests (``"name" in ….toggles``) is in the
    one registry with a one-line description, and every registered toggle has its row in
    docs/bug-toggles.md."""
    import re  # noqa: PLC0415

    used: set[str] = set()
    for path in (ROOT / "vkick").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r'"([a-z0-9]+(?:-[a-z0-9]+)+)" (?:not )?in [\w.]*toggles', text))
        used |= set(re.findall(r'TOGGLE\w*: Final = "([a-z0-9-]+)"', text))
    assert len(used) >= 20
    assert used <= set(KNOWN_TOGGLES), sorted(used - set(KNOWN_TOGGLES))
    assert all(isinstance(d, str) and d for d in KNOWN_TOGGLES.values())
    doc = (ROOT / "docs" / "bug-toggles.md").read_text()
    assert [t for t in KNOWN_TOGGLES if f"| `{t}` |" not in doc] == []


def test_validation_error_line_says_a_missing_field_is_required() -> None:
    """A missing required field reads "expected a value (required field), got nothing", not
    the parent table as what was got."""
    with pytest.raises(ConfigError) as info:
        parse_config({}, "<test>")
    assert str(info.value) == "<test>: vm: expected a value (required field), got nothing"
    with pytest.raises(ConfigError) as info:
        parse_config({"vm": [{"workload": [{}]}]}, "<test>")
    assert str(info.value) == ("<test>: vm[0].workload[0].direction: expected a value "
                               "(required field), got nothing")


def test_validation_error_line_names_the_bound_and_the_value_once() -> None:
    """A range error drops pydantic's "Input should be" and a validator's own "got …" is
    not repeated: each line has one "expected" and one "got"."""
    with pytest.raises(ConfigError) as info:
        parse_config({"vm": [{"guest": {"handler_ns": -1}}]}, "<test>")
    assert str(info.value) == ("<test>: vm[0].guest.handler_ns: expected a value greater "
                               "than or equal to 0, got -1")
    with pytest.raises(ConfigError) as info:
        parse_config({"vm": [{"net": [{"ring_size": 100}]}]}, "<test>")
    assert str(info.value) == ("<test>: vm[0].net[0].ring_size: expected a power of two "
                               "between 2 and 32768, got 100")
    with pytest.raises(ConfigError) as info:
        parse_config({"vm": [{"toggles": ["no-such-bug"]}]}, "<test>")
    assert str(info.value).startswith("<test>: vm[0].toggles[0]: expected one of [")
    assert str(info.value).endswith("], got 'no-such-bug'")


def test_load_toml_of_a_directory_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vkick run DIR/``: exit 2 and one line saying a readable TOML file was expected —
    not an internal error with a crash file."""
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vkick: {tmp_path}: (file): expected a readable TOML file, got Is a directory"
