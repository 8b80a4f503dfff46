"""The scenario format's IOAPIC additions (docs/scenario-format.md): every bad input is one
ConfigError line naming the file, the field and what was expected; good input loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vkick.errors import ConfigError
from vkick.scenario.format import load_scenario

HEAD = 'name = "x"\n[topology]\nvcpus = 1\n'
IRQCHIP_ROUTE = '[[routes]]\ngsi = 5\ntype = "irqchip"\npin = 5\n'
RESAMPLE_FD = '[[irqfds]]\nname = "intx"\ngsi = 5\nresample = true\n'

BAD = {
    "route-type": (HEAD + '[[routes]]\ngsi = 5\ntype = "hv_sint"\n', "routes[0].type",
                   '"msi" or "irqchip"'),
    "pic": (HEAD + '[[routes]]\ngsi = 5\ntype = "irqchip"\nirqchip = "pic-master"\npin = 5\n',
            "routes[0].irqchip", "PIC is not modelled"),
    "pin-range": (HEAD + '[[routes]]\ngsi = 5\ntype = "irqchip"\npin = 24\n', "routes[0].pin",
                  "less than 24"),
    "pin-missing": (HEAD + '[[routes]]\ngsi = 5\ntype = "irqchip"\n', "routes[0].pin",
                    "an IOAPIC pin 0..23"),
    "irqchip-address": (HEAD + IRQCHIP_ROUTE + "address = 0xfee00000\n", "routes[0].address",
                        'type = "msi"'),
    "msi-no-data": (HEAD + '[[routes]]\ngsi = 1\naddress = 0xfee00000\n', "routes[0].data",
                    "a value for an MSI route"),
    "msi-pin": (HEAD + '[[routes]]\ngsi = 1\naddress = 0xfee00000\ndata = 0x41\npin = 3\n',
                "routes[0].pin", 'type = "irqchip"'),
    "split-route": ('name = "x"\n[topology]\nvcpus = 1\nirqchip = "split"\n' + IRQCHIP_ROUTE,
                    "routes[0].type", "split irqchip"),
    "split-resample": ('name = "x"\n[topology]\nvcpus = 1\nirqchip = "split"\n' + RESAMPLE_FD,
                       "irqfds[0].resample", "-EINVAL"),
    "split-ioapic-step": ('name = "x"\n[topology]\nvcpus = 1\nirqchip = "split"\n'
                          '[[steps]]\ndo = "ioapic"\nvcpu = 0\npin = 1\nvector = 0x41\n',
                          "steps[0].do", "no IOAPIC step"),
    "ioapic-vector": (HEAD + '[[steps]]\ndo = "ioapic"\nvcpu = 0\npin = 1\nvector = 8\n',
                      "steps[0].vector", "16..255"),
    "ioapic-pin": (HEAD + '[[steps]]\ndo = "ioapic"\nvcpu = 0\npin = 30\nvector = 0x41\n',
                   "steps[0].pin", "less than 24"),
    "ioapic-trigger": (HEAD + '[[steps]]\ndo = "ioapic"\nvcpu = 0\npin = 1\nvector = 0x41\n'
                       'trigger = "pulse"\n', "steps[0].trigger", "'edge' or 'level'"),
    "line-level": (HEAD + '[[steps]]\ndo = "line"\ngsi = 1\nlevel = 2\n', "steps[0].level",
                   "less than or equal to 1"),
    "toggle": ('name = "x"\ntoggles = ["fix-everything"]\n[topology]\nvcpus = 1\n',
               "toggles[0]", "fix-eoi-exitmap-uninitialized"),
    "expect-irqfd": (HEAD + IRQCHIP_ROUTE + '[[irqfds]]\nname = "plain"\ngsi = 5\n'
                     '[expect.irqfd.plain]\nresamples = 1\n', "expect.irqfd.plain",
                     "resample = true"),
    "expect-step-resamples": (HEAD + IRQCHIP_ROUTE + RESAMPLE_FD + '[[steps]]\ndo = "expect"\n'
                              'vcpu = 0\nvectors = []\nresamples = { nope = 1 }\n',
                              "steps[0].resamples.nope", "resample = true"),
    "split-expect-ioapic": ('name = "x"\n[topology]\nvcpus = 1\nirqchip = "split"\n'
                            '[expect.ioapic]\nirr = []\n', "expect.ioapic",
                            "no IOAPIC expectation"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_load_scenario_rejects_bad_ioapic_input_with_one_line(case: str,
                                                              tmp_path: Path) -> None:
    """Each bad IOAPIC-related field gives one ConfigError line naming file and field."""
    text, field, expected = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: expected "), msg
    assert expected in msg, msg


def test_load_scenario_irqchip_mode_follows_what_the_scenario_uses(tmp_path: Path) -> None:
    """No topology.irqchip: "kernel" when an irqchip route, resampling irqfd or IOAPIC step
    is used, else "split"; an explicit value wins."""
    cases = {
        HEAD: "split",
        HEAD + IRQCHIP_ROUTE: "kernel",
        HEAD + '[[routes]]\ngsi = 5\naddress = 0xfee00000\ndata = 0x41\n' + RESAMPLE_FD:
            "kernel",
        HEAD + '[[steps]]\ndo = "ioapic"\nvcpu = 0\npin = 1\nvector = 0x41\n': "kernel",
        HEAD + '[[steps]]\ndo = "line"\ngsi = 1\nlevel = 1\n': "split",
        'name = "x"\n[topology]\nvcpus = 1\nirqchip = "kernel"\n': "kernel",
    }
    for i, (text, mode) in enumerate(cases.items()):
        path = tmp_path / f"ok{i}.toml"
        path.write_text(text)
        assert load_scenario(path).irqchip_mode() == mode, text
